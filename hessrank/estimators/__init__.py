"""The estimators behind :func:`hessrank.effective_rank`: named (curvature source, solver) pairs.

Each module of this package defines one :class:`~hessrank.estimators.base.Estimator` subclass and
registers it with :func:`~hessrank.estimators.base.register`; adding an estimator is adding a
module. The registry, in the order the methods are listed: :data:`ESTIMATORS`.
"""

import dataclasses

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
from hessrank.estimators.factor_lanczos import FisherLanczos, GGNLanczos
from hessrank.estimators.fisher import Fisher
from hessrank.estimators.ggn import GGN
from hessrank.estimators.lanczos import Lanczos

#: The four methods of the paper, in listing order (``ESTIMATORS`` also holds further pairs).
METHODS: tuple[str, ...] = tuple(sorted((n for n, e in ESTIMATORS.items() if e.listed),
                                        key=lambda n: ESTIMATORS[n].listing_order))
#: Every registered method, in listing order: :data:`METHODS` and the further pairs.
ALL_METHODS: tuple[str, ...] = tuple(sorted(ESTIMATORS,
                                            key=lambda n: ESTIMATORS[n].listing_order))


def option_fields() -> dict[str, tuple[dataclasses.Field, tuple[str, ...]]]:
    """Every estimator option: name -> (its dataclass field, the methods that take it)."""
    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, estimator in ESTIMATORS.items():
        for option in dataclasses.fields(estimator.Options):
            fields.setdefault(option.name, (option, []))[1].append(name)
    return {key: (option, tuple(methods)) for key, (option, methods) in fields.items()}


__all__ = ["ALL_METHODS", "ESTIMATORS", "GGN", "METHODS", "BudgetError", "Cost", "Estimator",
           "Exact", "Fisher", "FisherLanczos", "GGNLanczos", "Lanczos", "Settings", "Spectrum",
           "option_fields", "register"]
