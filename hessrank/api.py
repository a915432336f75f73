"""Public entry points: effective_rank, predict_exact_cost and gradient_overlap."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from hessrank.curvature.hessian import HessianOperator, dense_hessian
from hessrank.estimators import (
    ESTIMATORS,
    Options,
    Spectrum,
    check_exact_memory,
    exact_chunk_size,
    exact_memory_bytes,
    predict_exact_seconds,
    restrict,
)
from hessrank.guard import evaluation_mode, preserved_state
from hessrank.monitor import PeakMemory, Reporter
from hessrank.problem import Batch, CurvatureProblem, LossFn, build_problem
from hessrank.ranks import default_rtol, spectral_ranks, srank
from hessrank.results import RankResult
from hessrank.spectrum.dense import symmetric_eigenpairs

METHODS = tuple(ESTIMATORS)
BACKENDS = ("auto", "func", "backpack")


def effective_rank(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    method: str = "fisher",
    *,
    threshold: float = 0.99,
    rtol: float | None = None,
    params: Iterable[Tensor | str] | None = None,
    per_layer: bool = False,
    backend: str = "auto",
    mode: str = "eval",
    max_memory: float = 4 * 2**30,
    max_seconds: float | None = None,
    lanczos_steps: int = 80,
    lanczos_probes: int = 8,
    seed: int = 0,
    progress: object = False,
) -> RankResult:
    """Rank and spectrum of the Hessian of ``loss_fn(model(*inputs), targets)`` or an approximation.

    Args:
        model: any ``nn.Module``; ``model(*inputs)`` gives outputs with the batch dimension first.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``. Mean reduction (as in
            ``nn.CrossEntropyLoss()``) gives the curvature of the mean loss, sum reduction that of
            the sum; ``fisher``/``ggn`` need one of the two (checked).
        batch: ``(inputs, targets)``; ``inputs`` a tensor or a tuple of tensors.
        method: ``"fisher"`` (empirical Fisher, ``n x n`` Gram matrix; the default, the paper's
            choice), ``"ggn"`` (Gauss-Newton, ``nC' x nC'`` Gram matrix), ``"exact"`` (dense
            Hessian) or ``"lanczos"`` (stochastic Lanczos quadrature on Hessian-vector products).
        threshold: srank threshold: smallest ``k`` whose top-``k`` ``|eigenvalue|`` mass reaches
            this share of the total (0.99, Kumar et al.).
        rtol: numerical-rank tolerance relative to the largest ``|eigenvalue|``; default: the
            ``numpy.linalg.matrix_rank`` rule, matrix size times the model dtype's epsilon.
        params: parameters (or names) to analyse; default all trainable ones. Frozen parameters
            are excluded and listed in ``result.excluded``.
        per_layer: also analyse each parameterised module's diagonal block (``result.layers``).
        backend: ``fisher``/``ggn`` only. ``"auto"``: Kronecker identity for Linear/Conv layers,
            ``torch.func`` for every other parameter; ``"func"``: ``torch.func`` throughout;
            ``"backpack"``: BackPACK on a deep copy (supported layers only).
        mode: ``"eval"`` (default): the model as evaluated, dropout off and BatchNorm on its
            running statistics, whatever its flags; ``"train"``: the flags as set, i.e. BatchNorm
            on batch statistics (``exact``/``lanczos`` only; dropout must be off).
        max_memory, max_seconds: budget of ``exact``; over it, :class:`hessrank.BudgetError`
            (a ``ValueError``) is raised before the Hessian is built.
        lanczos_steps, lanczos_probes, seed: Lanczos steps per probe, probe count, probe seed
            (a private generator: the global RNG is not used).
        progress: ``True`` for a progress bar with ETA, or a ``rich.progress.Progress``.

    Returns:
        A :class:`hessrank.RankResult`. The model, its gradients, buffers, modes, hooks,
        ``requires_grad`` flags and the global RNG state are exactly as before the call.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if mode == "train" and method in ("fisher", "ggn"):
        raise ValueError(
            f"mode='train' is defined for 'exact' and 'lanczos' only: per-sample {method} "
            "factors assume samples that do not interact; use mode='eval'"
        )
    options = Options(threshold=threshold, backend=backend, max_memory=max_memory,
                      max_seconds=max_seconds, lanczos_steps=lanczos_steps,
                      lanczos_probes=lanczos_probes, seed=seed, per_layer=per_layer,
                      reporter=Reporter(progress))
    estimator = ESTIMATORS[method]
    start = time.perf_counter()
    with preserved_state(model):
        problem = build_problem(model, loss_fn, batch, params, mode)
        with evaluation_mode(model, mode), PeakMemory(problem.device) as memory:
            spectrum = estimator(problem, options)
            if per_layer and method in ("exact", "lanczos"):
                layer_options = Options(**{**vars(options), "per_layer": False})
                spectrum.layers = {
                    group: estimator(restrict(problem, names), layer_options)
                    for group, names in problem.modules_with_params().items()
                }
    seconds = time.perf_counter() - start
    eps = float(torch.finfo(problem.dtype).eps)
    named = dict(zip(problem.names, problem.params))
    sizes = {group: sum(named[name].numel() for name in names)
             for group, names in problem.modules_with_params().items()}
    layers = {
        group: _result(layer, problem, sizes[group], method, threshold, rtol, eps,
                       seconds=0.0, memory=None)
        for group, layer in spectrum.layers.items()
    }
    return _result(spectrum, problem, problem.num_params, method, threshold, rtol, eps, seconds,
                   memory.peak, layers)


def _result(
    spectrum: Spectrum,
    problem: CurvatureProblem,
    num_params: int,
    method: str,
    threshold: float,
    rtol: float | None,
    eps: float,
    seconds: float,
    memory: int | None,
    layers: dict[str, RankResult] | None = None,
) -> RankResult:
    """Ranks of a spectrum, packaged with everything the call knows."""
    size = spectrum.max_rank if method in ("exact", "lanczos") else len(spectrum.eigenvalues)
    tolerance = default_rtol(size, eps) if rtol is None else rtol
    ranks = spectral_ranks(spectrum.eigenvalues, threshold, tolerance, spectrum.weights)
    shown = spectrum.eigenvalues if spectrum.ritz_values is None else spectrum.ritz_values
    return RankResult(
        rank=int(round(ranks["srank"])),
        eigenvalues=shown,
        ranks=ranks,
        method=method,
        backend=spectrum.backend,
        num_params=num_params,
        num_samples=problem.num_samples,
        seconds=seconds,
        threshold=threshold,
        rtol=tolerance,
        trace=spectrum.trace,
        max_rank=spectrum.max_rank,
        peak_memory=memory,
        rank_interval=spectrum.rank_interval,
        num_hvps=spectrum.num_hvps,
        excluded=problem.excluded,
        layers=layers or {},
        notes=tuple(spectrum.notes),
        density=(spectrum.eigenvalues, spectrum.weights) if spectrum.weights is not None else None,
    )


def predict_exact_cost(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Iterable[Tensor | str] | None = None,
) -> tuple[int, float | None]:
    """Predicted peak memory (bytes) and seconds of ``method="exact"``.

    Memory needs no computation. The time is extrapolated from one timed chunk of Hessian-vector
    products and is None when the memory alone rules the problem out (over 64 GiB).
    """
    with preserved_state(model):
        problem = build_problem(model, loss_fn, batch, params, "eval")
        element = problem.params[0].element_size()
        memory = exact_memory_bytes(problem.num_params, element)
        if memory > 64 * 2**30:
            return memory, None
        with evaluation_mode(model, "eval"):
            operator = HessianOperator(problem)
            seconds = predict_exact_seconds(operator, exact_chunk_size(operator.dim, element))
    return memory, seconds


def gradient_overlap(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    k: int | None = None,
    *,
    threshold: float = 0.99,
    params: Iterable[Tensor | str] | None = None,
    max_memory: float = 4 * 2**30,
) -> float:
    """Share of the gradient's squared norm inside the top-``k`` eigenvectors of the Hessian.

    ``||V_k^T g||^2 / ||g||^2`` with ``V_k`` the eigenvectors of the ``k`` largest
    ``|eigenvalues|`` of the exact Hessian (dense, so within ``max_memory``); ``k`` defaults to
    the Hessian's srank at ``threshold``. 1 means the gradient lies in the curvature directions.
    Returns 0.0 for a zero gradient.
    """
    options = Options(threshold=threshold, max_memory=max_memory)
    with preserved_state(model):
        problem = build_problem(model, loss_fn, batch, params, "eval")
        check_exact_memory(problem, options)
        with evaluation_mode(model, "eval"):
            operator = HessianOperator(problem)
            hessian = dense_hessian(
                operator, exact_chunk_size(operator.dim, problem.params[0].element_size())
            )
    eigenvalues, eigenvectors = symmetric_eigenpairs(hessian)
    if k is None:
        k = int(srank(eigenvalues, threshold))
    gradient = operator.gradient.to(torch.float64)
    norm = float(gradient @ gradient)
    if norm == 0.0:
        return 0.0
    projection = eigenvectors[:, :k].T @ gradient
    return float(np.clip(float(projection @ projection) / norm, 0.0, 1.0))
