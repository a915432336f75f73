"""The Gram solver shared by ``fisher`` and ``ggn``: the nonzero spectrum of ``F F^T`` from the
``m x m`` Gram matrix ``F^T F`` of the factors (``m = K n``), per-layer spectra from its blocks."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from hessrank.curvature.differences import loss_needs
from hessrank.curvature.gram import (
    GramResult,
    compute_gram,
    eigenvector_block,
    general_path_bytes,
    unruled_sizes,
)
from hessrank.curvature.loss import check_no_parameter_terms
from hessrank.distributed import ShardedProblem, gathered_output_side
from hessrank.estimators.base import (
    Cost,
    Estimator,
    Settings,
    Spectrum,
    eigen_solve_seconds,
    eigenvector_note,
)
from hessrank.problem import (
    CurvatureProblem,
    GraphBytes,
    LossFn,
    evaluate_loss,
    probe_outputs,
)
from hessrank.spectrum.dense import SOLVE_MATRICES, symmetric_eigenpairs, symmetric_eigenvalues
from hessrank.spectrum.lanczos import power_of_two_below
from hessrank.streaming import StreamedProblem

BACKENDS = ("auto", "func", "backpack")
#: What a Gram method's time prediction leaves out (:attr:`Cost.unpredicted`).
UNPREDICTED_TIME = "passes over the model and the Gram matrix's products"


@dataclass(frozen=True)
class GramOptions:
    """Options of the Gram estimators."""

    backend: str = field(default="auto", metadata={
        "help": "auto: verified per-module rules, torch.func for the rest; func: torch.func "
                "throughout; backpack: BackPACK on a deep copy (supported layers only)",
        "choices": BACKENDS})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of "
                             f"{', '.join(BACKENDS)}")


class GramEstimator(Estimator):
    """Base of the estimators whose matrix is ``F F^T`` with per-sample factors."""

    solver = "gram"
    layer_strategy = "gram-blocks"
    provides_eigenvectors = True
    Options = GramOptions
    #: Factor columns per sample before zero columns are dropped, as a function of ``C``.
    columns_label: ClassVar[str]
    #: Whether the prediction needs the outputs per sample (a forward pass): not for the Fisher.
    needs_output_size: ClassVar[bool] = True

    @abstractmethod
    def columns(self, outputs_per_sample: int, options: GramOptions | None = None) -> int:
        """Upper bound on the factor columns ``K`` per sample."""

    def columns_name(self, options: GramOptions) -> str:
        """The factor columns per sample as the rank cap's note names them."""
        return self.columns_label

    def solved_columns(self, problem: CurvatureProblem, outputs: Callable[[], Tensor],
                       options: GramOptions) -> int | None:
        """The factor columns per sample of the Gram the work will solve where the outputs of
        the first forward pass tell them below :meth:`columns`' bound (its eigen-solve's time
        grows as their cube); None where they do not (default)."""
        return None

    @abstractmethod
    def cotangents(self, loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                   generator: torch.Generator, notes: list[str],
                   options: GramOptions | None = None) -> tuple[Tensor, Tensor | None]:
        """``[K, n, *out]`` output factors and, for the Fisher, the loss weights ``[n]``; what
        the call's result should say of them is added to ``notes``."""

    def output_side_bytes(self, num_samples: int, outputs_per_sample: int, element: int,
                          options: GramOptions, solved: int | None = None) -> int:
        """Peak bytes of computing the output-side factors (beyond the factors themselves);
        ``solved``: the factor columns per sample :meth:`solved_columns` read, where it did."""
        return 0

    def unpredicted_output_bytes(self, problem: CurvatureProblem, outputs: Tensor,
                                 options: GramOptions) -> int:
        """What the output side holds on the outputs of the first forward pass that the
        prediction before the work could not count: :meth:`output_side_bytes` where it had no
        outputs' size (without :attr:`needs_output_size`), and in a sharded problem the
        gathered global batch it runs on (:func:`~hessrank.distributed.shard_cotangents`: its
        outputs and all its factors, of which a process keeps its own rows; counted at the
        shard's size, a budget had let calls run at the number of processes times it;
        probe 98)."""
        samples, gathered = gathered_output_side(problem, outputs,
                                                 self.columns(outputs[0].numel(), options))
        if self.needs_output_size:
            return gathered
        return gathered + self.output_side_bytes(samples, outputs[0].numel(),
                                                 outputs.element_size(), options)

    def predict(self, problem: CurvatureProblem, outputs: Callable[[], Tensor], settings: Settings,
                options: GramOptions) -> Cost:
        n = problem.num_samples
        per_sample = outputs()[0].numel() if self.needs_output_size else 1
        k = self.columns(per_sample, options)
        element = problem.params[0].element_size()
        groups = problem.modules_with_params()
        layer_count = len(problem.layers()) if settings.per_layer else 0
        unruled = unruled_sizes(problem, options.backend == "auto")
        # The float64 copy the eigen-solve takes and what it holds beyond it: for eigenvalues one
        # matrix (a float32 GGN of 5,120 rows peaked at 18 bytes an entry, the Gram's 4 with
        # them), for eigenvectors the vectors and the solver's larger workspace (30 bytes an
        # entry at 5,120 rows, which one matrix had predicted at 1.9x short)
        solve = 8 * (1 + (SOLVE_MATRICES[True] if settings.eigenvectors else 1))

        def memory_at(size: int, solved: int | None = None) -> int:
            """The prediction's bytes for a Gram of ``size`` rows, of ``solved`` columns a sample
            where :meth:`solved_columns` read them."""
            if settings.per_layer:  # every layer's Gram kept for its block through the solve
                memory = size**2 * (element + solve + layer_count * element)
            else:
                # The Gram in the model dtype, its float64 copy and the eigen-solver's workspace;
                # before them, each rule's Gram of its group and the total, all held until the
                # Gram is complete (the claims are checked together; the general path adds its
                # groups one at a time): 14 of them peaked at 1.8x the prediction of one on a
                # two-layer transformer's per-token GGN (probe 78, helper 70; probe 82).
                ruled = len(groups) - len(unruled)
                memory = size**2 * max(element + solve, (ruled + 1) * element)
            if self.needs_output_size:  # else once the first forward pass gives the outputs' size
                memory += self.output_side_bytes(n, per_sample, element, options, solved)
            # the general path's factors for the groups no rule covers (those a rule declines
            # once it sees the call are counted then, compute_gram)
            memory += general_path_bytes(unruled, size, element)
            return int(memory) + 2 * problem.num_params * element  # the check's gradient

        memory = memory_at(k * n)
        # The columns the work will solve, where the outputs tell them below the bound: a
        # softmax cross-entropy's n (C - 1) at the positions that carry loss weight. Its Gram
        # too is that size where the outputs are the whole batch's (not one shard's, or a data
        # set's first batch, whose weighted positions may differ from the others'; an endless
        # stream's had let its pass run, refused after it; probe 221): a per-token
        # GGN with 28 of 32 positions padded (ignore_index) was predicted at 6.11 GiB for a
        # 337 MiB peak, and refused at the default budget (probe 219).
        # (read where the output side that reading them implies fits the budget: the check
        # that reads them costs less)
        solved = (self.solved_columns(problem, outputs, options)
                  if memory_at(0, 0) <= settings.max_memory else None)
        if solved is not None and self.needs_output_size and len(outputs()) == n \
                and not isinstance(problem, (StreamedProblem, ShardedProblem)):
            memory = memory_at(min(k, solved) * n, solved)
        if settings.max_seconds is None or memory > settings.max_memory:
            return Cost(int(memory))
        # The float64 eigen-solves of the Gram (and of each group's block), which grow as the
        # cube of its size and dominate once K n is large (a GGN's n C'; ggn at n C' = 5,800
        # spent 21 of its 22 s there), at the size the work will solve: a softmax
        # cross-entropy's n (C - 1), not the bound n C (binary ones were predicted 5 times
        # their time and refused at twice it; probe 93). The passes over the model and the
        # Gram's products are not predicted.
        size = n * (solved or k)
        solves = eigen_solve_seconds(size, problem.device, vectors=settings.eigenvectors > 0)
        if settings.per_layer:
            solves += layer_count * eigen_solve_seconds(size, problem.device)
        return Cost(int(memory), solves, unpredicted=UNPREDICTED_TIME)

    def run(self, problem: CurvatureProblem, settings: Settings,
            options: GramOptions) -> Spectrum:
        generator = torch.Generator().manual_seed(settings.seed)
        loss_fn = problem.loss_fn
        units: list[float] = []  # the cotangents' unit, fixed by the first call

        def cotangents_of(outputs: Tensor, targets: Tensor) -> Tensor:
            # the loss, checked, with helpful errors (of the problem's own batch, which of its
            # inputs or targets holds a NaN or infinite entry; else the targets')
            evaluate_loss(loss_fn, outputs, targets, batch=problem.labelled_batch()
                          if targets is problem.targets else None)
            # Sampled factors (mc_samples) from a stream of their own, restarted at every call:
            # the same outputs give the same labels, so the eigenvectors (_eigenpairs) come from
            # the very matrix whose Gram was solved.
            labels = torch.Generator().manual_seed(settings.seed + 1)
            cotangents = self.cotangents(loss_fn, outputs, targets, labels, problem.notes,
                                         options)[0]
            if not units:
                units.append(cotangent_unit(cotangents))
            return cotangents if units[0] == 1.0 else cotangents / units[0]

        with settings.reporter.task(f"{self.name} Gram matrix", 1) as advance:
            result = self._gram(problem, settings, options, cotangents_of, generator)
            advance(1)
        # the Gram of the cotangents divided by their unit is the matrix's over its square
        gram_unit = units[0] ** 2 if units else 1.0
        accumulator = result.accumulator
        total = accumulator.total
        if total is None:  # every problem has at least one parameter group
            raise RuntimeError("no parameter group reached the Gram matrix")
        n = problem.num_samples
        per_sample = result.columns or total.shape[0] // n
        size = min(total.shape[0], n * per_sample)  # the factors' rank bound
        cap = min(size, problem.num_params)
        notes = list(result.notes)
        if cap < problem.num_params:
            what = ("n" if per_sample == 1
                    else f"n x {self.columns_name(options)} = {n} x {per_sample}")
            notes.append(f"rank capped by {what} = {cap} (Gram matrix size) below P = "
                         f"{problem.num_params}")
        named = dict(zip(problem.names, problem.params))
        groups = problem.layers()
        # A Gram matrix larger than its block's P has P eigenvalues at most: the rest are zeros
        # of the factorisation (rounding), not eigenvalues of the P x P matrix.
        layer_caps = {group: min(size, sum(named[nm].numel() for nm in groups[group]))
                      for group in groups if group in accumulator.groups}
        layers: dict[str, Spectrum] = {}
        with settings.reporter.task(f"eigen-solves of {len(layer_caps)} layers' Gram matrices",
                                    len(layer_caps)) as advance:
            for group, layer_cap in layer_caps.items():
                layers[group] = Spectrum(
                    gram_unit * symmetric_eigenvalues(accumulator.groups[group])[:layer_cap],
                    _backend(result, groups[group]), max_rank=layer_cap)
                advance(1)
        eigenvectors = None
        if settings.eigenvectors:
            # rows for the spectrum's cap eigenvalues at most (a Gram larger than P had given
            # zero rows beyond it, paired with no eigenvalue; probe 105)
            eigenvalues, eigenvectors = self._eigenpairs(
                problem, total, min(settings.eigenvectors, cap), cotangents_of, settings)
            found = int((eigenvectors.abs().amax(dim=1) > 0).sum())
            if found < settings.eigenvectors:
                notes.append(eigenvector_note(
                    found, settings.eigenvectors, "the other eigenvalues are zero to rounding or "
                    f"beyond the spectrum ({min(len(eigenvalues), cap)} eigenvalues), and their "
                    "rows are zero or absent"))
        else:
            with settings.reporter.solving(total.shape[0]):
                eigenvalues = symmetric_eigenvalues(total)
        eigenvalues = gram_unit * eigenvalues
        return Spectrum(eigenvalues[:cap], _backend(result, problem.names), max_rank=cap,
                        paths=result.paths, notes=notes, layers=layers, eigenvectors=eigenvectors)

    def check_request(self, settings: Settings, options: GramOptions) -> None:
        super().check_request(settings, options)
        if settings.eigenvectors and options.backend == "backpack":
            raise ValueError("eigenvectors come from hessrank's own factors: use backend='auto' "
                             "or 'func' with eigenvectors=")

    def _eigenpairs(self, problem: CurvatureProblem, gram: Tensor, count: int,
                    cotangents_of: Callable[[Tensor, Tensor], Tensor], settings: Settings
                    ) -> tuple[np.ndarray, Tensor]:
        """Eigenvalues, and the top ``count`` eigenvectors in parameter space ``[count, P]``.

        With ``G = F^T F = U diag(lambda) U^T``, ``F u_j / sqrt(lambda_j)`` is a unit eigenvector
        of ``F F^T``; ``F u`` is one vector-Jacobian product with the cotangents combined by
        ``u``, so ``count`` products in one batched backward pass. Eigenvalues that are zero to
        rounding (at most the Gram's size times the dtype's epsilon times the largest) have no
        eigenvector in the range of ``F`` (``F u`` is rounding noise there): rows for them are
        zero.
        """
        with settings.reporter.solving(gram.shape[0]):
            values, vectors = symmetric_eigenpairs(gram)
        count = min(count, len(values))
        graph = GraphBytes(problem)
        with graph.counting():
            outputs = problem.forward()
        cotangents = cotangents_of(outputs.detach(), problem.targets)  # [K, n, *out]
        k, n = cotangents.shape[:2]
        coefficients = vectors[:, :count].T.reshape(count, k, n).to(cotangents.dtype)
        block = eigenvector_block(graph, count, problem.num_params,
                                  problem.params[0].element_size())[0]
        flat = torch.empty(count, problem.num_params, dtype=torch.float64, device=problem.device)
        for first in range(0, count, block):  # blocks of columns, as compute_gram predicted
            last = min(first + block, count)
            combined = torch.einsum("jkn,kn...->jn...", coefficients[first:last], cotangents)
            pieces = torch.autograd.grad(outputs, problem.params, grad_outputs=combined,
                                         is_grads_batched=True, allow_unused=True,
                                         retain_graph=last < count)
            offset = 0
            for piece, param in zip(pieces, problem.params):
                columns = flat[first:last, offset:offset + param.numel()]
                if piece is None:
                    columns.zero_()
                else:
                    columns.copy_(piece.reshape(last - first, -1))
                offset += param.numel()
        magnitudes = np.abs(values[:count])
        noise = len(values) * float(torch.finfo(problem.dtype).eps) * float(np.abs(values).max(
            initial=0.0))
        scale = torch.from_numpy(np.sqrt(magnitudes)).to(flat.device)
        flat.div_(scale.clamp_min(1e-300)[:, None])  # in place: the rows are P long
        flat[torch.from_numpy(magnitudes <= noise).to(flat.device)] = 0.0
        return values, flat

    def _gram(self, problem: CurvatureProblem, settings: Settings, options: GramOptions,
              cotangents_of: Callable[[Tensor, Tensor], Tensor],
              generator: torch.Generator) -> GramResult:
        if options.backend == "backpack":
            from hessrank.curvature.backpack import gram_backpack

            outputs = probe_outputs(problem, graph=True)  # what the loss reads of the pass
            self._check_loss_terms(problem, outputs)
            outputs = outputs.detach()
            cotangents, weights = self.cotangents(problem.loss_fn, outputs, problem.targets,
                                                  generator, problem.notes, options)
            return gram_backpack(problem, self.name, cotangents, weights, settings.per_layer,
                                 generator)
        return compute_gram(problem, cotangents_of, settings.per_layer,
                            use_rules=options.backend == "auto", generator=generator,
                            check_working_memory=lambda extra: self.check_refined(
                                extra, problem, settings),
                            output_side_bytes=lambda outputs: self.unpredicted_output_bytes(
                                problem, outputs, options),
                            eigenvectors=settings.eigenvectors,
                            for_the_loss=loss_needs(self.name),
                            check_outputs=lambda outputs: self._check_loss_terms(problem,
                                                                                  outputs))

    def _check_loss_terms(self, problem: CurvatureProblem, outputs: Tensor) -> None:
        """Refuse a loss that uses the parameters other than through ``outputs``, read right
        after the forward pass (with its graph) that gave them: a term the forward stores on the
        model (a VAE's ``self.kl``, a mixture of experts' load-balancing loss), which the loss
        adds, is the pass's, with its graph. (Read after the passes without a graph that run
        samples alone, it was theirs, without one: fisher and ggn had dropped such a term, a
        VAE's EF 5.7 times low; probe 222.)"""
        check_no_parameter_terms(problem.loss_fn, outputs, problem.targets, problem.params,
                                 problem.names, self.name)


def cotangent_unit(cotangents: Tensor) -> float:
    """The power of two a float32 model's cotangents are divided by before they enter the Gram
    (exactly; 1 for a float64 model's, and where their largest entry is 1 or more): their
    largest entry then in ``[1, 2)``. The Gram's products of small cotangents had been
    subnormal numbers, of a few significant digits: a float32 EF whose top eigenvalue was
    2e-38 (a loss scaled by 1e-19) formed them from cotangents of 1e-24, its spectrum off by
    1.4e-6 of the top at n = 400 and its numerical rank 57 for 50 at n = 2,000 (probe 162)."""
    if cotangents.dtype == torch.float64:
        return 1.0
    return min(power_of_two_below(cotangents), 1.0)


def _backend(result: GramResult, names: list[str]) -> str:
    """The paths used for ``names``, in a stable order, joined by '+'."""
    used = {result.paths[name] for name in names if name in result.paths}
    order = ["backpack", "linear", "conv"]
    return "+".join(sorted(used, key=lambda p: (order.index(p) if p in order else len(order), p)))
