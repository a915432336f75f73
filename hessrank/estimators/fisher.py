"""``fisher``: the empirical Fisher ``sum_i a_i g_i g_i^T`` through its ``n x n`` Gram matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from hessrank.curvature.loss import FISHER_LOSS_SIDE_COPIES, fisher_cotangents
from hessrank.estimators.base import register
from hessrank.estimators.gram import GramEstimator, GramOptions
from hessrank.problem import LossFn


@register
class Fisher(GramEstimator):
    name = "fisher"
    source = "fisher"
    listed = True
    listing_order = 3
    summary = "empirical Fisher through the n x n Gram matrix of per-sample gradients"
    columns_label = "1"
    needs_output_size = False
    budget_advice = ("use fewer samples, or method='fisher_lanczos' (EF-vector products, no Gram "
                     "matrix; streams a DataLoader one batch at a time)")

    def columns(self, outputs_per_sample: int, options: GramOptions | None = None) -> int:
        return 1

    def output_side_bytes(self, num_samples: int, outputs_per_sample: int, element: int,
                          options: GramOptions, solved: int | None = None) -> int:
        """The loss's and the samples' gradients w.r.t. the outputs (:func:`fisher_cotangents`),
        counted once the first forward pass gives the outputs' size (``fisher`` runs no forward
        pass to predict)."""
        return FISHER_LOSS_SIDE_COPIES * num_samples * outputs_per_sample * element

    def cotangents(self, loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                   generator: torch.Generator, notes: list[str],
                   options: GramOptions | None = None) -> tuple[Tensor, Tensor | None]:
        return fisher_cotangents(loss_fn, outputs, targets, notes)
