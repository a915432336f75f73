"""The four estimators behind :func:`hessrank.effective_rank`, in one registry.

Each estimator maps a validated :class:`~hessrank.problem.CurvatureProblem` to a
:class:`Spectrum`; the entry point turns spectra into ranks and results.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hessrank.curvature.cotangents import fisher_cotangents, ggn_cotangents, reduction_scale
from hessrank.curvature.gram import gram_kron
from hessrank.curvature.hessian import HessianOperator, dense_hessian
from hessrank.monitor import Reporter
from hessrank.problem import CurvatureProblem, check_loss, has_active_batchnorm
from hessrank.ranks import srank
from hessrank.spectrum.dense import by_magnitude, symmetric_eigenvalues
from hessrank.spectrum.lanczos import lanczos_tridiagonal, rademacher, tridiagonal_quadrature

#: Seconds per ``P^3`` of a float64 symmetric eigen-solve on a 2-core CPU (measured: 5120^3 in
#: about 4.9 s); used only to predict the cost of ``exact``.
EIGEN_SECONDS_PER_CUBE = 4e-11
#: Bytes of Hessian columns ``exact`` computes at once.
EXACT_CHUNK_BYTES = 64 * 2**20


class BudgetError(ValueError):
    """``exact`` would exceed the memory or time budget; nothing was computed."""

    def __init__(self, message: str, memory_bytes: int, seconds: float | None) -> None:
        super().__init__(message)
        self.memory_bytes = memory_bytes
        self.seconds = seconds


@dataclass
class Options:
    """Everything an estimator may need beyond the problem."""

    threshold: float = 0.99
    backend: str = "auto"
    max_memory: float = 4 * 2**30
    max_seconds: float | None = None
    lanczos_steps: int = 80
    lanczos_probes: int = 8
    seed: int = 0
    per_layer: bool = False
    reporter: Reporter = field(default_factory=Reporter)


@dataclass
class Spectrum:
    """What an estimator measured.

    ``eigenvalues`` by decreasing magnitude; ``weights`` (Lanczos) makes them a quadrature of the
    spectral density, each node standing for ``weight`` eigenvalues; ``ritz_values`` are then the
    values to show as "the eigenvalues".
    """

    eigenvalues: np.ndarray
    backend: str
    max_rank: int
    weights: np.ndarray | None = None
    ritz_values: np.ndarray | None = None
    rank_interval: tuple[float, float] | None = None
    num_hvps: int | None = None
    notes: list[str] = field(default_factory=list)
    layers: dict[str, Spectrum] = field(default_factory=dict)

    @property
    def trace(self) -> float:
        weights = 1.0 if self.weights is None else self.weights
        return float(np.sum(self.eigenvalues * weights))


Estimator = Callable[[CurvatureProblem, Options], Spectrum]


# ----------------------------------------------------------------------------------------------
# exact
# ----------------------------------------------------------------------------------------------

def exact_chunk_size(num_params: int, element_size: int) -> int:
    """Hessian columns per batched product, bounded by :data:`EXACT_CHUNK_BYTES`."""
    return int(max(1, min(num_params, 256, EXACT_CHUNK_BYTES // (num_params * element_size))))


def exact_memory_bytes(num_params: int, element_size: int) -> int:
    """Predicted peak of ``exact``: the float64 Hessian, the eigen-solver's copy, one chunk."""
    chunk = exact_chunk_size(num_params, element_size)
    return int(2 * 8 * num_params**2 + 4 * chunk * num_params * element_size)


def check_exact_memory(problem: CurvatureProblem, options: Options) -> int:
    """Raise :class:`BudgetError` before any work when the dense Hessian would not fit."""
    memory = exact_memory_bytes(problem.num_params, problem.params[0].element_size())
    if memory > options.max_memory:
        raise BudgetError(
            f"method='exact' needs about {memory / 2**30:.1f} GiB for P = {problem.num_params} "
            f"parameters (the dense P x P Hessian in float64), over max_memory = "
            f"{options.max_memory / 2**30:.1f} GiB: use method='lanczos' (Hessian-vector "
            "products) or 'fisher'/'ggn' (Gram matrices), restrict params=, or raise max_memory",
            memory, None,
        )
    return memory


def _exact(problem: CurvatureProblem, options: Options) -> Spectrum:
    memory = check_exact_memory(problem, options)
    operator = HessianOperator(problem)
    dim = operator.dim
    chunk = exact_chunk_size(dim, problem.params[0].element_size())
    if options.max_seconds is not None:
        seconds = predict_exact_seconds(operator, chunk)
        if seconds > options.max_seconds:
            raise BudgetError(
                f"method='exact' would take about {seconds:.0f} s for P = {dim} "
                f"({dim} Hessian-vector products and a {dim} x {dim} eigen-solve), over "
                f"max_seconds = {options.max_seconds:.0f} s: use method='lanczos' or 'fisher', "
                "or raise max_seconds", memory, seconds,
            )
    with options.reporter.task(f"exact Hessian ({dim} columns)", dim) as advance:
        hessian = dense_hessian(operator, chunk, advance)
    eigenvalues = symmetric_eigenvalues(hessian)
    return Spectrum(eigenvalues, "autograd", max_rank=dim, num_hvps=operator.num_products)


def predict_exact_seconds(operator: HessianOperator, chunk: int) -> float:
    """Time one chunk of Hessian columns and extrapolate; add the eigen-solve's cubic cost."""
    dim = operator.dim
    trial = min(chunk, dim)
    basis = torch.zeros(trial, dim, dtype=operator.dtype, device=operator.device)
    basis[torch.arange(trial), torch.arange(trial)] = 1.0
    synchronize = torch.cuda.synchronize if operator.device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    operator.matmat(basis)
    synchronize()
    elapsed = time.perf_counter() - start
    operator.num_products -= trial
    return elapsed * dim / trial + EIGEN_SECONDS_PER_CUBE * dim**3


# ----------------------------------------------------------------------------------------------
# lanczos (stochastic Lanczos quadrature)
# ----------------------------------------------------------------------------------------------

def _lanczos(problem: CurvatureProblem, options: Options) -> Spectrum:
    operator = HessianOperator(problem)
    dim = operator.dim
    steps = min(options.lanczos_steps, dim)
    probes = options.lanczos_probes
    if steps < 1 or probes < 1:
        raise ValueError("lanczos_steps and lanczos_probes must be at least 1")
    generator = torch.Generator().manual_seed(options.seed)
    starts = torch.stack([rademacher(dim, generator, operator.device) for _ in range(probes)])
    with options.reporter.task(f"Lanczos ({probes} probes x {steps} steps)", steps) as advance:
        def matmat(vectors: Tensor) -> Tensor:
            advance(1)
            return operator.matmat(vectors)

        quadratures = [tridiagonal_quadrature(alpha, beta)
                       for alpha, beta in lanczos_tridiagonal(matmat, starts, steps)]
    nodes = np.concatenate([q.nodes for q in quadratures])
    weights = np.concatenate([q.weights for q in quadratures]) * dim / probes
    order = np.lexsort((-nodes, -np.abs(nodes)))
    nodes, weights = nodes[order], weights[order]
    # Each probe's estimate is uncertain by the weight of the node where the threshold is
    # crossed (a node stands for that many eigenvalues); probes add sampling spread on top.
    estimates = np.array([srank(q.nodes, options.threshold, q.weights * dim) for q in quadratures])
    resolution = np.array([_boundary_weight(q.nodes, q.weights * dim, options.threshold)
                           for q in quadratures])
    spread = 1.96 * estimates.std(ddof=1) / math.sqrt(probes) if probes > 1 else 0.0
    interval = (max(0.0, float(np.mean(estimates - resolution)) - spread),
                min(float(dim), float(np.mean(estimates + resolution)) + spread))
    traces = np.array([dim * float(q.nodes @ q.weights) for q in quadratures])
    trace_spread = 1.96 * traces.std(ddof=1) / math.sqrt(probes) if probes > 1 else float("nan")
    notes = [f"rank estimated by stochastic Lanczos quadrature ({probes} probes x {steps} "
             f"steps); eigenvalues are the first probe's {len(quadratures[0].nodes)} Ritz values",
             f"trace {traces.mean():.4g} +- {trace_spread:.2g} (95% interval over probes)"]
    return Spectrum(nodes, "autograd", max_rank=dim, weights=weights,
                    ritz_values=by_magnitude(quadratures[0].nodes), rank_interval=interval,
                    num_hvps=operator.num_products, notes=notes)


def _boundary_weight(nodes: np.ndarray, weights: np.ndarray, threshold: float) -> float:
    """Resolution of a quadrature's srank: the weight of the nodes next to the cut ``+-t``.

    By the Chebyshev-Markov-Stieltjes inequalities a Gauss quadrature's count of eigenvalues
    beyond ``t`` is off by at most the weight of the node at ``t``; ``|lambda| > t`` has two
    tails, so the nodes nearest ``+t`` and ``-t`` both count.
    """
    magnitude = np.abs(nodes)
    order = np.argsort(-magnitude, kind="stable")
    mass = magnitude[order] * weights[order]
    total = mass.sum()
    if total <= 0:
        return 0.0
    index = min(int(np.searchsorted(np.cumsum(mass), threshold * total)), len(nodes) - 1)
    cut = magnitude[order][index]
    resolution = 0.0
    for side in (nodes > 0, nodes < 0):
        if side.any():
            nearest = np.argmin(np.where(side, np.abs(magnitude - cut), np.inf))
            resolution += float(weights[nearest])
    return resolution


# ----------------------------------------------------------------------------------------------
# ggn and fisher (Gram matrices)
# ----------------------------------------------------------------------------------------------

def _gram(problem: CurvatureProblem, kind: str, options: Options) -> Spectrum:
    batchnorm = has_active_batchnorm(problem.model)
    if batchnorm:
        raise ValueError(
            f"BatchNorm in train mode ({', '.join(batchnorm)}) mixes the samples of a batch, so "
            f"per-sample {kind} factors are undefined: use mode='eval' (the default, running "
            "statistics) or method='exact'/'lanczos'"
        )
    n = problem.num_samples
    with options.reporter.task(f"{kind} Gram matrix", 1) as advance:
        if options.backend == "backpack":
            from hessrank.curvature.backpack import gram_backpack

            with torch.no_grad():
                outputs = problem.forward()
            _check_outputs(outputs, problem)
            scale = reduction_scale(problem.loss_fn, outputs, problem.targets)
            accumulator, columns = gram_backpack(problem, kind, scale, options.per_layer)
            backend = "backpack"
        else:
            def cotangents_of(outputs: Tensor) -> Tensor:
                _check_outputs(outputs, problem)
                scale = reduction_scale(problem.loss_fn, outputs.detach(), problem.targets)
                make = fisher_cotangents if kind == "fisher" else ggn_cotangents
                return make(problem.loss_fn, outputs, problem.targets, scale)

            accumulator, cotangents, backend = gram_kron(
                problem, cotangents_of, options.per_layer, use_kron=options.backend != "func"
            )
            columns = cotangents.shape[0]
        advance(1)
    per_sample = columns if kind == "ggn" else 1
    if kind == "ggn" and backend == "backpack" and isinstance(problem.loss_fn,
                                                            torch.nn.CrossEntropyLoss):
        per_sample = columns - 1  # BackPACK keeps the softmax-shift column, whose factor is zero
    cap = min(n * per_sample, problem.num_params)
    notes = []
    if cap < problem.num_params:
        what = "n" if kind == "fisher" else f"n x C' = {n} x {per_sample}"
        notes.append(f"rank capped by {what} = {cap} (Gram matrix size) below P = "
                     f"{problem.num_params}")
    layers = {
        group: Spectrum(symmetric_eigenvalues(gram), backend,
                        max_rank=min(n * per_sample, _group_size(problem, group)))
        for group, gram in accumulator.groups.items()
    }
    return Spectrum(symmetric_eigenvalues(accumulator.total), backend, max_rank=cap,
                    notes=notes, layers=layers)


def _group_size(problem: CurvatureProblem, group: str) -> int:
    named = dict(zip(problem.names, problem.params))
    return sum(named[name].numel() for name in problem.modules_with_params()[group])


def _check_outputs(outputs: object, problem: CurvatureProblem) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the model returned {type(outputs).__name__}; 'fisher' and 'ggn' need a tensor of "
            "per-sample outputs (wrap the model to return one)"
        )
    if outputs.dim() == 0 or outputs.shape[0] != problem.num_samples:
        raise ValueError(
            f"the model's output has shape {tuple(outputs.shape)} but the batch has "
            f"{problem.num_samples} samples: 'fisher' and 'ggn' need one output row per sample"
        )
    check_loss(problem.loss_fn(outputs.detach(), problem.targets))


def _fisher(problem: CurvatureProblem, options: Options) -> Spectrum:
    return _gram(problem, "fisher", options)


def _ggn(problem: CurvatureProblem, options: Options) -> Spectrum:
    return _gram(problem, "ggn", options)


#: The estimators by method name.
ESTIMATORS: dict[str, Estimator] = {
    "exact": _exact,
    "lanczos": _lanczos,
    "ggn": _ggn,
    "fisher": _fisher,
}


def restrict(problem: CurvatureProblem, names: list[str]) -> CurvatureProblem:
    """The same problem on a subset of its parameters."""
    named = dict(zip(problem.names, problem.params))
    return dataclasses.replace(problem, names=list(names), params=[named[n] for n in names])
