"""hessrank: rank and effective rank of a network's Hessian and of its approximations.

>>> res = hessrank.effective_rank(model, nn.CrossEntropyLoss(), (x, y), method="fisher")
>>> res.rank, res.ranks["numerical"], res.eigenvalues[:5]

The names below load on first use (PEP 562), so ``import hessrank`` is instant and a command
line built on it can handle Ctrl-C while torch loads.
"""

from __future__ import annotations

import importlib
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hessrank.api import (
        BACKENDS,
        METHODS,
        TiedEigenvaluesError,
        effective_rank,
        estimator_options,
        gradient_overlap,
        predict_exact_cost,
    )
    from hessrank.estimators import ESTIMATORS, BudgetError
    from hessrank.monitor import progress_bar
    from hessrank.ranks import RANK_NAMES, spectral_ranks
    from hessrank.results import RankResult
    from hessrank.tracker import Tracker

_HOMES = {
    "BACKENDS": "hessrank.api",
    "METHODS": "hessrank.api",
    "effective_rank": "hessrank.api",
    "estimator_options": "hessrank.api",
    "gradient_overlap": "hessrank.api",
    "TiedEigenvaluesError": "hessrank.api",
    "predict_exact_cost": "hessrank.api",
    "ESTIMATORS": "hessrank.estimators",
    "BudgetError": "hessrank.estimators",
    "progress_bar": "hessrank.monitor",
    "RANK_NAMES": "hessrank.ranks",
    "spectral_ranks": "hessrank.ranks",
    "RankResult": "hessrank.results",
    "Tracker": "hessrank.tracker",
}

__all__ = [
    "BACKENDS",
    "ESTIMATORS",
    "METHODS",
    "RANK_NAMES",
    "BudgetError",
    "RankResult",
    "TiedEigenvaluesError",
    "Tracker",
    "effective_rank",
    "estimator_options",
    "gradient_overlap",
    "predict_exact_cost",
    "progress_bar",
    "spectral_ranks",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        # The first use loads torch, rich and the rest, typically after the caller has seeded
        # its generators: rich draws from Python's global one when imported, so its state is
        # put back (a training loop must not change with hessrank in it).
        state = random.getstate()
        try:
            value = getattr(importlib.import_module(_HOMES[name]), name)
        finally:
            random.setstate(state)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hessrank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
