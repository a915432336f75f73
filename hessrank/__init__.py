"""hessrank: rank and effective rank of a network's Hessian and of its approximations.

>>> res = hessrank.effective_rank(model, nn.CrossEntropyLoss(), (x, y), method="fisher")
>>> res.rank, res.ranks["numerical"], res.eigenvalues[:5]
"""

from hessrank.api import BACKENDS, METHODS, effective_rank, gradient_overlap, predict_exact_cost
from hessrank.estimators import ESTIMATORS, BudgetError
from hessrank.monitor import progress_bar
from hessrank.ranks import RANK_NAMES, spectral_ranks
from hessrank.results import RankResult
from hessrank.tracker import Tracker

__all__ = [
    "BACKENDS",
    "METHODS",
    "RANK_NAMES",
    "ESTIMATORS",
    "BudgetError",
    "RankResult",
    "Tracker",
    "effective_rank",
    "gradient_overlap",
    "predict_exact_cost",
    "progress_bar",
    "spectral_ranks",
]
__version__ = "0.1.0"
