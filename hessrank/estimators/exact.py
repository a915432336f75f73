"""``exact``: the dense Hessian from Hessian-vector products, all ``P`` eigenvalues in float64."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessrank.curvature.hessian import HessianOperator, dense_hessian
from hessrank.estimators.base import (
    Cost,
    Estimator,
    Settings,
    Spectrum,
    eigenvector_note,
    register,
    seconds_of,
)
from hessrank.problem import CurvatureProblem, unused_in_every, unused_parameters_note
from hessrank.spectrum.dense import symmetric_eigenpairs, symmetric_eigenvalues
from hessrank.streaming import StreamedProblem, per_batch

#: Size of the eigen-solve timed to predict ``exact``'s (:func:`eigen_solve_seconds`).
EIGEN_TRIAL_SIZE = 512
#: Up to this size a float64 eigen-solve's time grows as ``size^2.5`` beyond the trial's (LAPACK
#: ``dsyevd`` on one thread, measured 2026-12-01 at 512, 1024, 2048, 4096: 0.029, 0.19, 0.84,
#: 5.3 s; ``size^3`` from 512 had predicted 15 s at 4096), as ``size^3`` above it. With
#: eigenvectors it grows as ``size^3`` throughout (their back-transformation: ``size^2.5`` had
#: predicted 1.8 and 2.4 times too little at 2048 and 3290; probe 90).
EIGEN_SUBCUBIC_SIZE = 4096
#: Bytes of Hessian columns computed at once.
EXACT_CHUNK_BYTES = 64 * 2**20
#: Bytes a batched product's backward pass may hold for its columns.
EXACT_WORK_BYTES = 512 * 2**20


def exact_chunk_size(num_params: int, element_size: int, graph_bytes: int = 0) -> int:
    """Hessian columns per batched product: at most 256, their results within
    :data:`EXACT_CHUNK_BYTES`, and their backward passes within :data:`EXACT_WORK_BYTES`, each
    column's taking about twice the model's graph (``graph_bytes``, the Hessian operator's;
    0 before it is built)."""
    by_graph = EXACT_WORK_BYTES // max(1, 2 * graph_bytes)
    return int(max(1, min(num_params, 256, EXACT_CHUNK_BYTES // (num_params * element_size),
                          by_graph)))


def products_bytes(chunk: int, graph_bytes: int) -> int:
    """What the Hessian operator holds beyond the Hessian: its graph (``graph_bytes``), and about
    twice that for each of the ``chunk`` columns of a batched product's backward pass."""
    return (1 + 2 * chunk) * graph_bytes


#: What the float64 eigen-solve holds beyond the Hessian, in ``P x P`` float64 matrices (peak
#: resident memory of :func:`~hessrank.spectrum.dense.symmetric_eigenvalues` and
#: :func:`~hessrank.spectrum.dense.symmetric_eigenpairs` above their input, measured at P = 2000
#: and 3000: 1.39-1.57 and 3.19-4.30; eigenvectors had been left out of the prediction, and
#: calls asking for them peaked at 1.8x it; probe 71).
SOLVE_MATRICES = {False: 1.5, True: 3.5}


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


def eigen_solve_seconds(dim: int, device: torch.device, vectors: bool = False) -> float:
    """Predicted seconds of the float64 eigen-solve of a ``dim x dim`` matrix on ``device``
    (with ``vectors``, eigenvectors too: 4-6 times the eigenvalues' time at P = 4810, which a
    prediction of eigenvalues alone had left out; probe 78): one of :data:`EIGEN_TRIAL_SIZE`
    (at most ``dim``) timed here, on the solver's threads, scaled as ``size^2.5`` up to
    :data:`EIGEN_SUBCUBIC_SIZE` and ``size^3`` beyond (a constant per ``dim^3`` measured on one
    machine had been 1.7x short on another; with ``vectors``, ``size^3`` throughout)."""
    size = min(dim, EIGEN_TRIAL_SIZE)
    generator = torch.Generator().manual_seed(0)
    trial = torch.randn(size, size, generator=generator, dtype=torch.float64)
    trial = (trial + trial.T).to(device)
    solve = symmetric_eigenpairs if vectors else symmetric_eigenvalues
    seconds = seconds_of(lambda: solve(trial), device)
    knee = max(size, min(dim, EIGEN_SUBCUBIC_SIZE))
    return seconds * (knee / size) ** (3.0 if vectors else 2.5) * (dim / knee) ** 3


@register
class Exact(Estimator):
    name = "exact"
    source = "hessian"
    solver = "dense"
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
        chunk = exact_chunk_size(operator.dim, element, operator.graph_bytes)
        graph = products_bytes(chunk, operator.graph_bytes)
        # the products batch by batch, then one eigen-solve
        seconds = (batches * products_seconds(operator, chunk) + eigen_solve_seconds(
            operator.dim, operator.device, vectors=settings.eigenvectors > 0))
        return Cost(memory + graph, seconds, graph)

    def run(self, problem: CurvatureProblem, settings: Settings, options: Any) -> Spectrum:
        dim = problem.num_params
        element = problem.params[0].element_size()
        batches = per_batch(problem)[1]
        unused: list[frozenset[int]] = []  # the parameters no gradient reaches, batch by batch
        with settings.reporter.task(f"exact Hessian ({dim} columns)", dim * batches) as advance:

            def batch_hessian(batch: CurvatureProblem) -> tuple[Tensor, float]:
                operator = HessianOperator(batch)
                chunk = exact_chunk_size(dim, element, operator.graph_bytes)
                self.check_refined(products_bytes(chunk, operator.graph_bytes), problem,
                                   settings)
                unused.append(operator.unused)
                return dense_hessian(operator, chunk, advance), operator.loss_value

            if isinstance(problem, StreamedProblem):  # the batches' Hessians, weighted, summed
                hessian = problem.summed(batch_hessian)
            else:
                hessian = batch_hessian(problem)[0]
        note = unused_parameters_note(problem, unused_in_every(unused),
                                      data_set=isinstance(problem, StreamedProblem))
        notes = [] if note is None else [note]
        spectrum = Spectrum(np.empty(0), "autograd", max_rank=dim, num_hvps=dim * batches,
                            notes=notes)
        if settings.eigenvectors:
            spectrum.eigenvalues, vectors = symmetric_eigenpairs(hessian)
            spectrum.eigenvectors = vectors[:, : settings.eigenvectors].T.contiguous()
            if settings.eigenvectors > dim:
                notes.append(eigenvector_note(dim, settings.eigenvectors,
                                              f"the Hessian has P = {dim} eigenvalues"))
        else:
            spectrum.eigenvalues = symmetric_eigenvalues(hessian)
        return spectrum
