"""``ggn``: the generalised Gauss-Newton ``J^T (d^2 L/df^2) J`` through its ``n C' x n C'`` Gram
matrix (``C'`` nonzero square-root columns of each sample's output Hessian)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hessrank.curvature.loss import ggn_cotangents
from hessrank.estimators.base import register
from hessrank.estimators.gram import GramEstimator
from hessrank.problem import LossFn


@register
class GGN(GramEstimator):
    name = "ggn"
    source = "ggn"
    listing_order = 2
    summary = "generalised Gauss-Newton through the nC' x nC' Gram matrix of its factors"
    columns_label = "C'"
    budget_advice = "use method='fisher' (n x n Gram), fewer samples, or method='lanczos'"

    def columns(self, outputs: Callable[[], Tensor]) -> int:
        return outputs()[0].numel()

    def cotangents(self, loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                   generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        return ggn_cotangents(loss_fn, outputs, targets, generator), None
