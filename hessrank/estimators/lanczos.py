"""``lanczos``: stochastic Lanczos quadrature on Hessian-vector products."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessrank.curvature.hessian import HessianOperator
from hessrank.estimators.base import (
    Cost,
    Estimator,
    Settings,
    Spectrum,
    positive_int,
    register,
)
from hessrank.problem import CurvatureProblem
from hessrank.ranks import srank
from hessrank.spectrum.dense import by_magnitude
from hessrank.spectrum.lanczos import lanczos_tridiagonal, rademacher, tridiagonal_quadrature


@dataclass(frozen=True)
class LanczosOptions:
    """Options of ``lanczos``."""

    lanczos_steps: int = field(default=80, metadata={"help": "Lanczos steps per probe"})
    lanczos_probes: int = field(default=8, metadata={"help": "random probe vectors"})

    def __post_init__(self) -> None:
        positive_int("lanczos_steps", self.lanczos_steps)
        positive_int("lanczos_probes", self.lanczos_probes)


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


@register
class Lanczos(Estimator):
    name = "lanczos"
    source = "hessian"
    solver = "lanczos"
    listing_order = 1
    summary = "stochastic Lanczos quadrature on Hessian-vector products"
    modes = ("eval", "train")
    Options = LanczosOptions
    budget_advice = "use fewer lanczos_steps or lanczos_probes, or method='fisher'/'ggn'"

    def predict(self, problem: CurvatureProblem, outputs: Callable[[], Tensor], settings: Settings,
                options: LanczosOptions) -> Cost:
        steps = min(options.lanczos_steps, problem.num_params)
        # float64 basis and two work vectors per probe.
        memory = 8 * options.lanczos_probes * (steps + 2) * problem.num_params
        seconds = None
        if settings.max_seconds is not None and memory <= settings.max_memory:
            operator = HessianOperator(problem)
            probe = torch.ones(options.lanczos_probes, operator.dim, dtype=operator.dtype,
                               device=operator.device)
            start = time.perf_counter()
            operator.matmat(probe)
            seconds = (time.perf_counter() - start) * steps
        return Cost(memory, seconds)

    def run(self, problem: CurvatureProblem, settings: Settings, options: Any) -> Spectrum:
        operator = HessianOperator(problem)
        dim = operator.dim
        steps = min(options.lanczos_steps, dim)
        probes = options.lanczos_probes
        generator = torch.Generator().manual_seed(settings.seed)
        starts = torch.stack([rademacher(dim, generator, operator.device)
                              for _ in range(probes)])
        with settings.reporter.task(f"Lanczos ({probes} probes x {steps} steps)",
                                    steps) as advance:
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
        threshold = settings.threshold
        estimates = np.array([srank(q.nodes, threshold, q.weights * dim) for q in quadratures])
        resolution = np.array([_boundary_weight(q.nodes, q.weights * dim, threshold)
                               for q in quadratures])
        spread = 1.96 * estimates.std(ddof=1) / math.sqrt(probes) if probes > 1 else 0.0
        interval = (max(0.0, float(np.mean(estimates - resolution)) - spread),
                    min(float(dim), float(np.mean(estimates + resolution)) + spread))
        traces = np.array([dim * float(q.nodes @ q.weights) for q in quadratures])
        trace_spread = (1.96 * traces.std(ddof=1) / math.sqrt(probes) if probes > 1
                        else float("nan"))
        notes = [f"rank estimated by stochastic Lanczos quadrature ({probes} probes x {steps} "
                 f"steps); eigenvalues are the first probe's {len(quadratures[0].nodes)} Ritz "
                 "values",
                 f"trace {traces.mean():.4g} +- {trace_spread:.2g} (95% interval over probes)"]
        return Spectrum(nodes, "autograd", max_rank=dim, weights=weights,
                        ritz_values=by_magnitude(quadratures[0].nodes), rank_interval=interval,
                        num_hvps=operator.num_products, notes=notes)
