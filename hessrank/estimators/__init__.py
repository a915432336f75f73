"""The estimators behind :func:`hessrank.effective_rank`: named (curvature source, solver) pairs.

Each module of this package defines one :class:`~hessrank.estimators.base.Estimator` subclass and
registers it with :func:`~hessrank.estimators.base.register`; adding an estimator is adding a
module. The registry, in the order the methods are listed: :data:`ESTIMATORS`.
"""

from hessrank.estimators.base import (
    ESTIMATORS,
    BudgetError,
    Cost,
    Estimator,
    Settings,
    Spectrum,
    register,
)
from hessrank.estimators.exact import Exact
from hessrank.estimators.fisher import Fisher
from hessrank.estimators.ggn import GGN
from hessrank.estimators.lanczos import Lanczos

#: Method names in listing order.
METHODS: tuple[str, ...] = tuple(sorted(ESTIMATORS, key=lambda n: ESTIMATORS[n].listing_order))

__all__ = ["ESTIMATORS", "GGN", "METHODS", "BudgetError", "Cost", "Estimator", "Exact", "Fisher",
           "Lanczos", "Settings", "Spectrum", "register"]
