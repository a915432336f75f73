"""``ggn``: the generalised Gauss-Newton ``J^T (d^2 L/df^2) J`` through its ``n C' x n C'`` Gram
matrix (``C'`` nonzero square-root columns of each sample's output Hessian), or, with
``mc_samples=M``, through the ``M n x M n`` Gram of Monte-Carlo square-root factors (softmax
cross-entropy; for large ``C``, e.g. token vocabularies)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hessrank.curvature.loss import (
    float64_chunk_samples,
    ggn_cotangents,
    ggn_mc_cotangents,
    softmax_columns,
)
from hessrank.estimators.base import Settings, Spectrum, positive_int, register
from hessrank.estimators.gram import GramEstimator, GramOptions
from hessrank.problem import CurvatureProblem, LossFn


@dataclass(frozen=True)
class GGNOptions(GramOptions):
    """Options of ``ggn``."""

    mc_samples: int | None = field(default=None, metadata={
        "help": "Monte-Carlo GGN: M labels drawn from the model's softmax per position give M "
                "factor columns per sample (Gram M n x M n, independent of the classes C); "
                "softmax cross-entropy only (default unset: the exact GGN)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mc_samples is not None:
            # a NumPy integer as an int (options are logged as JSON)
            object.__setattr__(self, "mc_samples",
                               positive_int("mc_samples", self.mc_samples))
            if self.backend == "backpack":
                raise ValueError("mc_samples is not available with backend='backpack': use "
                                 "backend='auto' or 'func'")


@register
class GGN(GramEstimator):
    name = "ggn"
    source = "ggn"
    listed = True
    listing_order = 2
    summary = "generalised Gauss-Newton through the nC' x nC' Gram matrix of its factors"
    columns_label = "C'"
    budget_advice = ("use mc_samples=M (Monte-Carlo GGN, Gram M n x M n; a smaller M where it is "
                     "set already), method='fisher' (n x n "
                     "Gram), fewer samples, or method='ggn_lanczos' (GGN-vector products, no "
                     "Gram matrix; streams a DataLoader one batch at a time)")
    Options = GGNOptions

    def columns(self, outputs_per_sample: int, options: GramOptions | None = None) -> int:
        mc_samples = getattr(options, "mc_samples", None)
        return outputs_per_sample if mc_samples is None else mc_samples

    def columns_name(self, options: GramOptions) -> str:
        # (the draws, not the classes: "n x C' = 64 x 4" had named 4 draws C'; probe 187)
        return ("M (mc_samples)" if getattr(options, "mc_samples", None) is not None
                else self.columns_label)

    def solved_columns(self, problem: CurvatureProblem, outputs: Callable[[], Tensor],
                       options: GramOptions) -> int | None:
        if getattr(options, "mc_samples", None) is not None:
            return None
        return softmax_columns(problem.loss_fn, outputs(), problem.targets)

    def output_side_bytes(self, num_samples: int, outputs_per_sample: int, element: int,
                          options: GramOptions, solved: int | None = None) -> int:
        mc_samples = getattr(options, "mc_samples", None)
        # The check that the loss is a softmax cross-entropy, over the last and the second
        # dimension: its graph, float64 probabilities (the first pass's kept through the
        # second), three float64 probes, their stack and cast, the batched Hessian-vector
        # products and their comparison; the same again in float64 on a chunk of the samples
        # at a time (loss.float64_chunk_samples), beside it. Measured 151-176 bytes an output
        # entry in float32 on 32-64 samples, 316 on 8 (the float64 check then covers the whole
        # batch), which 48 + M (8 + e) had put at 60: the call peaked at 2.35-2.95x its
        # prediction (probe 78, helper 70; probe 82).
        def check(size: int) -> int:
            return 8 + 3 * size + max(56 + 15 * size, 121)

        head = min(num_samples, float64_chunk_samples(outputs_per_sample)) / num_samples
        checked = check(element) + 24 + head * check(8)
        if mc_samples is not None:  # then the draws
            draws = 24 + mc_samples * (8 + element)
            return int(num_samples * outputs_per_sample * max(checked, draws))
        if solved is not None:
            # A softmax cross-entropy's factors from its formula (loss._softmax_factors): each
            # position's C x C block, its projection, eigenvectors and factors in float64 (40 C
            # bytes an output entry; C is at most ``solved + 1``), then the ``solved`` columns
            # over every output entry in float64 and twice in the outputs' dtype (its copy and
            # its contiguous layout); the check before them. (The blocks below, 64 bytes an
            # output entry for each output entry of its sample, had predicted a per-token GGN
            # with 28 of 32 positions padded at 4.4 times its peak; probe 219.)
            return int(num_samples * outputs_per_sample * max(
                checked, 40 * (solved + 1) + (8 + 2 * element) * solved))
        # Output-Hessian blocks: products, float64 blocks, their scaled copy and eigenvectors;
        # where rounding may explain negative eigenvalues, the same again in the other
        # precision beside them (loss.ggn_cotangents).
        return num_samples * outputs_per_sample**2 * (2 * element + 56)

    def cotangents(self, loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                   generator: torch.Generator, notes: list[str],
                   options: GramOptions | None = None) -> tuple[Tensor, Tensor | None]:
        mc_samples = getattr(options, "mc_samples", None)
        if mc_samples is None:
            return ggn_cotangents(loss_fn, outputs, targets, generator, notes), None
        return ggn_mc_cotangents(loss_fn, outputs, targets, mc_samples, generator, notes), None

    def run(self, problem: CurvatureProblem, settings: Settings,
            options: GramOptions) -> Spectrum:
        spectrum = super().run(problem, settings, options)
        mc_samples = getattr(options, "mc_samples", None)
        if mc_samples is not None:
            spectrum.notes.append(
                f"Monte-Carlo GGN: {mc_samples} label draw(s) per position from the model's "
                f"softmax (seed {settings.seed}): a random approximation whose expectation is "
                "the GGN; its rank is capped by mc_samples x n. Noisy where the predictions "
                "are confident: the curvature sits in classes a draw rarely picks (compare "
                "with the exact GGN, mc_samples=None, on a smaller batch)")
        return spectrum
