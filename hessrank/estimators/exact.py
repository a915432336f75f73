"""``exact``: the dense Hessian from Hessian-vector products, all ``P`` eigenvalues in float64."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessrank.curvature.hessian import HessianOperator, dense_hessian, symmetrised
from hessrank.estimators.base import (
    Cost,
    Estimator,
    Settings,
    Spectrum,
    eigen_solve_seconds,
    eigenvector_note,
    register,
    seconds_of,
)
from hessrank.problem import CurvatureProblem, unused_in_every, unused_parameters_note
from hessrank.spectrum.dense import SOLVE_MATRICES, symmetric_eigenpairs, symmetric_eigenvalues
from hessrank.streaming import StreamedProblem, per_batch

#: Bytes of Hessian columns computed at once.
EXACT_CHUNK_BYTES = 64 * 2**20
#: Bytes a batched product's backward pass may hold for its columns.
EXACT_WORK_BYTES = 512 * 2**20


#: What one column of a batched product's backward pass holds, in multiples of the model's
#: graph: about twice it (256 columns at once took 8.4 GB on a CNN predicted at 69 MB). Through
#: attention a column holds more (``README.md``, "Not covered"): twice what the graph's softmax
#: nodes saved beside it had covered attention, but over-counted a small classifier's loss.
COLUMN_GRAPHS = 2.0


def exact_chunk_size(num_params: int, element_size: int, graph_bytes: int = 0,
                     column_bytes: int = 0, spare: float | None = None) -> int:
    """Hessian columns per batched product: at most 256, their results within
    :data:`EXACT_CHUNK_BYTES`, and their backward passes within :data:`EXACT_WORK_BYTES` and
    what ``spare`` (the budget less the prediction before the work) leaves beside the model's
    graph (``graph_bytes``), each column's holding ``column_bytes`` (0 before the Hessian
    operator is built); at least one. (A fixed work area had refused a model of P = 457 under
    200 MiB, "needs about 521 MiB", that one column at a time ran in 70; probe 239.)"""
    work = (EXACT_WORK_BYTES if spare is None
            else min(EXACT_WORK_BYTES, spare - graph_bytes))
    by_work = int(work // max(1, column_bytes))
    return int(max(1, min(num_params, 256, EXACT_CHUNK_BYTES // (num_params * element_size),
                          by_work)))


def batched_columns(operator: HessianOperator, spare: float | None = None) -> tuple[int, int]:
    """Hessian columns per batched product (:func:`exact_chunk_size`) and what the operator
    holds beyond the Hessian while it computes them (bytes): its graph and each column's
    backward pass (:data:`COLUMN_GRAPHS`).

    Args:
        operator: the Hessian operator, built.
        spare: the budget less the prediction before the work (None: no budget).

    Returns:
        ``(columns, bytes)``.
    """
    column = int(COLUMN_GRAPHS * operator.graph_bytes)
    chunk = exact_chunk_size(operator.dim, operator.dtype.itemsize, operator.graph_bytes, column,
                             spare)
    return chunk, operator.graph_bytes + chunk * column


def exact_memory_bytes(num_params: int, element_size: int, eigenvectors: bool = False) -> int:
    """Predicted peak: the float64 Hessian, what its eigen-solve holds (with ``eigenvectors``,
    the vectors and the solver's workspace), one chunk of products."""
    chunk = exact_chunk_size(num_params, element_size)
    return int((1 + SOLVE_MATRICES[eigenvectors]) * 8 * num_params**2
               + 4 * chunk * num_params * element_size)


def products_seconds(operator: HessianOperator, chunk: int) -> float:
    """Seconds of the dense Hessian's products: one chunk of its columns timed, extrapolated."""
    dim = operator.dim
    trial = min(chunk, dim)
    basis = torch.zeros(trial, dim, dtype=operator.dtype, device=operator.device)
    basis[torch.arange(trial), torch.arange(trial)] = 1.0
    # one column first: a process's first product pays one-off set-up (2.18 s predicted for
    # 0.13 on the CLI's default MLP, the whole call 0.85 s; probe 85)
    first = seconds_of(lambda: operator.matmat(basis[:1]), operator.device)
    elapsed = seconds_of(lambda: operator.matmat(basis), operator.device)
    operator.num_products -= trial + 1
    return first + elapsed * dim / trial


@register
class Exact(Estimator):
    name = "exact"
    source = "hessian"
    solver = "dense"
    listed = True
    listing_order = 0
    summary = "dense Hessian (P Hessian-vector products) and a float64 eigen-solve"
    modes = ("eval", "train")
    provides_eigenvectors = True
    streams = True
    budget_advice = ("use method='lanczos' (Hessian-vector products) or 'fisher'/'ggn' (Gram "
                     "matrices)")

    def predict(self, problem: CurvatureProblem, outputs: Callable[[], Tensor], settings: Settings,
                options: Any) -> Cost:
        element = problem.params[0].element_size()
        memory = exact_memory_bytes(problem.num_params, element, settings.eigenvectors > 0)
        if settings.max_seconds is None or memory > settings.max_memory:
            return Cost(memory)
        # timing builds the operator, which shows what the model's graph holds
        batch, batches = per_batch(problem)
        operator = HessianOperator(batch)
        chunk, graph = batched_columns(operator, settings.max_memory - memory)
        if memory + graph > settings.max_memory:  # refused untimed: the timing's products
            return Cost(memory + graph, None, graph)  # held it (416 MiB for 300; probe 188)
        # the products batch by batch, then one eigen-solve
        seconds = (batches * products_seconds(operator, chunk) + eigen_solve_seconds(
            operator.dim, operator.device, vectors=settings.eigenvectors > 0))
        return Cost(memory + graph, seconds, graph)

    def run(self, problem: CurvatureProblem, settings: Settings, options: Any) -> Spectrum:
        dim = problem.num_params
        batches = per_batch(problem)[1]
        unused: list[frozenset[int]] = []  # the parameters no gradient reaches, batch by batch
        measured: list[float] = []  # the products' rounding: their antisymmetric part's norm
        with settings.reporter.task(f"exact Hessian ({dim} columns)", dim * batches) as advance:

            streamed = isinstance(problem, StreamedProblem)

            def batch_hessian(batch: CurvatureProblem) -> tuple[Tensor, float]:
                operator = HessianOperator(batch)
                chunk, held = batched_columns(operator,
                                              settings.max_memory - settings.predicted_memory)
                self.check_refined(held, problem, settings)
                unused.append(operator.unused)
                hessian = dense_hessian(operator, chunk, advance, symmetrise=not streamed)
                if operator.rounding is not None:  # (a data set's batch: its sum is measured)
                    measured.append(operator.rounding)
                return hessian, operator.loss_value

            if isinstance(problem, StreamedProblem):  # the batches' Hessians, weighted, summed
                hessian = problem.summed(batch_hessian)
                measured.append(symmetrised(hessian, problem.first()))
            else:
                hessian = batch_hessian(problem)[0]
        note = unused_parameters_note(problem, unused_in_every(unused),
                                      data_set=isinstance(problem, StreamedProblem))
        notes = [] if note is None else [note]
        # an eigenvalue of the symmetrised matrix moves by at most the norm of what rounding
        # left in it, about the antisymmetric part's (the cancelled terms of a block left
        # symmetric rounding up to 4.5 times it, probe 132): eight times that
        spectrum = Spectrum(np.empty(0), "autograd", max_rank=dim, num_hvps=dim * batches,
                            notes=notes, rounding=8 * measured[-1])
        with settings.reporter.solving(dim):
            if settings.eigenvectors:
                spectrum.eigenvalues, vectors = symmetric_eigenpairs(hessian)
            else:
                spectrum.eigenvalues = symmetric_eigenvalues(hessian)
        if settings.eigenvectors:
            spectrum.eigenvectors = vectors[:, : settings.eigenvectors].T.contiguous()
            if settings.eigenvectors > dim:
                notes.append(eigenvector_note(dim, settings.eigenvectors,
                                              f"the Hessian has P = {dim} eigenvalues"))
        return spectrum
