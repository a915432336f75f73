"""``ggn_lanczos`` and ``fisher_lanczos``: Lanczos quadrature on the GGN / EF operators, for when
the Gram matrix (``nC' x nC'`` or ``n x n``) is too large to form."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from hessrank.curvature.factors import FactorOperator
from hessrank.distributed import gathered_output_side
from hessrank.estimators.base import Settings, register
from hessrank.estimators.fisher import Fisher
from hessrank.estimators.ggn import GGN
from hessrank.estimators.gram import GramEstimator, GramOptions
from hessrank.estimators.lanczos import LanczosEstimator
from hessrank.problem import CurvatureProblem
from hessrank.spectrum.operator import SymmetricOperator


class FactorLanczos(LanczosEstimator):
    """Lanczos on ``F F^T`` with the factors of a Gram estimator."""

    factors_of: GramEstimator
    backend = "autograd (factor products)"
    #: what to do instead where the factors' output side, measured on the first pass, exceeds
    #: the budget (fewer lanczos_steps do not lower it; probe 71)
    working_memory_advice: ClassVar[str]

    def operator(self, problem: CurvatureProblem, settings: Settings) -> SymmetricOperator:
        generator = torch.Generator().manual_seed(settings.seed)
        return FactorOperator(
            problem,
            lambda outputs, targets: self.factors_of.cotangents(
                problem.loss_fn, outputs, targets, generator, problem.notes)[0],
            self.name,
            check_working_memory=lambda extra: self.check_refined(
                extra, problem, settings, advice=self.working_memory_advice),
            output_side_bytes=lambda outputs: self.output_side_at(problem, outputs))

    def rank_bound(self, problem: CurvatureProblem, outputs: Callable[[], Tensor]) -> int:
        """``n K``: the factors' columns (one a sample for the EF, ``C`` for the GGN of ``C``
        outputs a sample), over a data set's samples and the processes' shards. (The basis had
        ``ceil(P / 3)`` rows, up to 640, whatever ``n``: ``fisher_lanczos`` on ResNet-18 at
        n = 8 was predicted at 27.2 GiB and refused; now 1.67 GiB, for a peak of 0.68.)"""
        per_sample = outputs()[0].numel() if self.factors_of.needs_output_size else 1
        return min(problem.num_params, problem.num_samples * self.factors_of.columns(per_sample))

    def source_notes(self, problem: CurvatureProblem, operator: SymmetricOperator) -> list[str]:
        """Also, where the model's samples interact, what the factors then are (one batch's
        operator; a data set's batches are refused as such)."""
        note = operator.mixing_note() if isinstance(operator, FactorOperator) else None
        return [*super().source_notes(problem, operator), *([] if note is None else [note])]

    def output_side_at(self, problem: CurvatureProblem, outputs: Tensor) -> int:
        """Peak bytes of the factors' output side (the loss's gradients or Hessian blocks) on
        ``outputs``, which the prediction before the work (the Lanczos basis) cannot count; in
        a sharded problem on the gathered global batch (:func:`gathered_output_side`)."""
        per_sample = outputs[0].numel()
        samples, gathered = gathered_output_side(problem, outputs,
                                                 self.factors_of.columns(per_sample))
        return gathered + self.factors_of.output_side_bytes(samples, per_sample,
                                                            outputs.element_size(), GramOptions())


@register
class GGNLanczos(FactorLanczos):
    name = "ggn_lanczos"
    source = "ggn"
    listing_order = 4
    summary = "Lanczos quadrature on GGN-vector products (no Gram matrix)"
    factors_of = GGN()
    working_memory_advice = (
        "its factors hold the model's graph and each sample's output-Hessian square root (n x "
        "C' x C numbers for C outputs per sample), which lanczos_steps does not change: use "
        "fewer samples (a DataLoader streams them a batch at a time), method='fisher_lanczos' "
        "(one output gradient per sample), or method='ggn' with mc_samples=M (a Monte-Carlo "
        "GGN)")


@register
class FisherLanczos(FactorLanczos):
    name = "fisher_lanczos"
    source = "fisher"
    listing_order = 5
    summary = "Lanczos quadrature on empirical-Fisher-vector products (no Gram matrix)"
    factors_of = Fisher()
    working_memory_advice = (
        "its factors hold the model's graph and each sample's output gradient, which "
        "lanczos_steps does not change: use fewer samples (a DataLoader streams them a batch at "
        "a time)")
