"""Spectrum of a symmetric operator from matrix-vector products: deflated Lanczos quadrature.

One long Lanczos run from a random start ``v`` (``m`` products) gives a tridiagonal ``T``; with
``T = U diag(theta) U^T`` the pairs ``(theta_j, P U_0j^2)`` are the Gauss quadrature of the
spectral measure ``P sum_i (q_i . v)^2 delta_{lambda_i}`` (``|v| = 1``), an unbiased estimate of
the eigenvalue counting measure (stochastic Lanczos quadrature). Measured on MLP Hessians
(``benchmarks/lanczos_scale.py``), spending the whole budget on one run resolves the spectrum far
better than several shorter runs: the polynomial degree, not the number of probes, limits how well
the small eigenvalues that decide the srank and the numerical rank are separated.

Two refinements:

- **Deflation.** A Ritz value whose residual ``|beta_m U_mj|`` is tiny (against the operator's
  scale and against the distance to the next Ritz value) is an eigenvalue; when its probe weight
  is one a simple eigenvalue can have (:func:`single_weight_limit`, which allows for the number
  of converged values tested) it is one eigenvalue and gets weight exactly 1 (instead of the
  random ``P (q_i . v)^2``), and the other nodes share the remaining ``P - #deflated`` in
  proportion to their Gauss weights (a ratio estimator). The large eigenvalues that carry most
  of the mass are then exact, and only the unresolved middle of the spectrum is sampled.
- **Intervals.** Two errors separate the quadrature from the true spectrum. Resolution: by the
  Chebyshev-Markov-Stieltjes inequalities the count of eigenvalues beyond a cut ``c`` is only
  known up to the weights of the nodes that bracket ``+-c``, so each count is widened to what the
  quadrature proves at the srank's cut (and at the numerical rank's ``rtol * max |lambda|``).
  Sampling: the weights of a Gaussian probe on ``n`` eigenvalues are ``P`` times a
  Dirichlet(1/2, ..., 1/2) draw, so the unresolved weights are redrawn from the matching
  Dirichlet law (a parametric bootstrap; a Rademacher probe samples with at most this spread).
  The intervals span the bootstrap's 2.5 % to 97.5 % quantiles of the widened counts. The
  numerical rank's interval is wide when many eigenvalues sit near ``rtol * max |lambda|``,
  which one quadrature cannot resolve (small Hessians with a large near-null cluster).

Cost: the Lanczos basis is kept in ``basis_dtype`` (float32 by default), ``steps x P`` of it;
when that would exceed ``max_basis_bytes`` the budget is split into several runs that fit.
Every step measures the new vector's overlaps with the whole basis (one pass over it) and
removes them (a second pass) only when one exceeds a quarter of ``sqrt(eps)``: the basis stays
semi-orthogonal, which keeps the tridiagonal matrix, hence the quadrature, exact to working
precision (Simon 1984). The loss of orthogonality is measured, not estimated: Simon's recurrence
for it was tried, and with float32 Hessian-vector products, whose rounding is far above
``eps |A|``, its estimate asked for a removal about three steps in four. Measured removals: about
half the steps at P = 682 and 1.8 million, three in four at P = 10^7 (``benchmarks/README.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hessrank.ranks import default_rtol, srank
from hessrank.spectrum.dense import by_magnitude
from hessrank.spectrum.operator import SymmetricOperator

#: A Ritz pair is an eigenpair when its residual is below this times the largest ``|Ritz value|``.
CONVERGED_RESIDUAL = 1e-5
#: ... and below this times the distance to the nearest other Ritz value.
GAP_FRACTION = 1e-2
#: The chance, over all the converged Ritz values of a run, that a simple eigenvalue's probe
#: weight is taken for a repeated eigenvalue's (:func:`single_weight_limit`).
FALSE_REPEAT_RATE = 1e-4
#: A new Lanczos vector is orthogonalised against the basis when one of its overlaps exceeds this
#: times ``sqrt(eps)`` (of the basis dtype); below ``sqrt(eps)`` the basis is semi-orthogonal.
ORTHOGONALITY_FRACTION = 0.25
#: Parametric bootstrap draws for the interval.
BOOTSTRAP_DRAWS = 200
#: Default cap on the memory of the Lanczos basis.
MAX_BASIS_BYTES = 4 * 2**30


@dataclass
class LanczosSpectrum:
    """What :func:`lanczos_spectrum` measured.

    Attributes:
        eigenvalues: quadrature nodes (float64) by decreasing ``|value|``.
        weights: how many eigenvalues each node stands for (sums to ``dim``); always set by
            this solver (None is for exact spectra in the same shape).
        ritz_values: the converged Ritz values of the first run (eigenvalues to show), by
            decreasing ``|value|``; empty when none converged.
        rank_interval: interval for the srank at ``threshold`` (resolution and sampling, 95 %).
        trace: estimated signed trace ``sum(lambda)``.
        trace_interval: its 95 % sampling interval.
        num_products: matrix-vector products spent.
        numerical_interval: interval for the numerical rank at ``rtol`` (same construction as
            ``rank_interval``): wide when the quadrature cannot resolve the eigenvalues near
            ``rtol * max |lambda|``, as happens for Hessians with many tiny eigenvalues.
        notes: how the estimate was made, for the user.
    """

    eigenvalues: np.ndarray
    weights: np.ndarray | None
    ritz_values: np.ndarray
    rank_interval: tuple[float, float]
    trace: float
    trace_interval: tuple[float, float]
    num_products: int
    numerical_interval: tuple[float, float]
    notes: list[str] = field(default_factory=list)


@dataclass
class _Quadrature:
    """One run's quadrature: signed ``nodes`` ascending, ``weights`` summing to ``dim``,
    ``fixed`` marks deflated nodes (exact eigenvalues, weight 1), ``residuals`` the Ritz
    residual norms ``|beta_m U_mj|``, ``probe`` the probe's weights ``dim`` times the Gauss
    weights (each node's share of the start vector, before deflation)."""

    nodes: np.ndarray
    weights: np.ndarray
    fixed: np.ndarray
    residuals: np.ndarray
    probe: np.ndarray


def rademacher(dim: int, generator: torch.Generator, device: torch.device,
               dtype: torch.dtype = torch.float64) -> Tensor:
    """A random ``+-1`` vector ``[dim]`` from a private CPU generator (global RNG untouched)."""
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


def lanczos_run(
    operator: SymmetricOperator,
    start: Tensor,
    steps: int,
    basis_dtype: torch.dtype = torch.float32,
    advance: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Up to ``steps`` Lanczos steps from ``start`` (``[dim]``), kept orthogonal to the basis.

    The basis (``steps x dim`` in ``basis_dtype``) is the only large allocation, and all vector
    arithmetic is in ``basis_dtype`` (the scalars ``alpha``, ``beta`` in float64). Each new
    vector's overlaps with the whole basis are measured (one pass over it); they are removed
    (classical Gram-Schmidt, a second pass) only when the largest exceeds
    :data:`ORTHOGONALITY_FRACTION` of ``sqrt(eps)`` (relative to the vector's norm), and removed
    again when the first removal took a large part of the vector (Daniel-Gragg-Kaufman-Stewart
    criterion). The basis thus stays semi-orthogonal (overlaps below ``sqrt(eps)``, which keeps
    the tridiagonal matrix exact to working precision, Simon 1984), measured rather than
    estimated. The run stops early when the Krylov space becomes invariant (``beta`` below
    ``100 eps`` of the largest ``|alpha|, beta``, ``eps`` of ``basis_dtype``).

    Args:
        operator: the symmetric operator.
        start: ``[dim]`` start vector, any scale.
        steps: the most products to spend.
        basis_dtype: dtype of the stored basis.
        advance: called with 1 after each product.

    Returns:
        ``alpha`` ``[m]`` and ``beta`` ``[m - 1]`` of the tridiagonal matrix (float64), the
        final ``beta_m`` (0 when the run ended on an invariant subspace), and how many
        Gram-Schmidt removals were applied.
    """
    dim = operator.dim
    steps = min(steps, dim)
    basis = torch.empty(steps, dim, dtype=basis_dtype, device=operator.device)
    vector = start.to(device=operator.device, dtype=basis_dtype)
    vector = vector / vector.norm()
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    beta = 0.0
    removals = 0
    eps = torch.finfo(basis_dtype).eps
    invariant = 100 * eps
    semi_orthogonal = ORTHOGONALITY_FRACTION * math.sqrt(eps)
    for j in range(steps):
        basis[j] = vector
        product = operator.matmat(vector.to(operator.dtype)[None])[0].to(basis_dtype)
        if advance is not None:
            advance(1)
        alpha = float(product @ vector)
        product.sub_(vector, alpha=alpha)
        if j > 0:
            product.sub_(basis[j - 1], alpha=betas[-1])
        previous = basis[: j + 1]
        beta = float(product.norm())
        for _ in range(2):
            overlaps = previous @ product
            if float(overlaps.abs().max()) <= semi_orthogonal * beta:
                break
            product.addmv_(previous.T, overlaps, alpha=-1.0)
            removals += 1
            before, beta = beta, float(product.norm())
            if beta > before / math.sqrt(2):
                break
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        if beta <= invariant * scale:
            return np.array(alphas), np.array(betas), 0.0, removals
        if j < steps - 1:
            betas.append(beta)
            vector = product / beta
    return np.array(alphas), np.array(betas), beta, removals


def single_weight_limit(candidates: int) -> float:
    """The largest probe weight ``P (q . v)^2`` that a converged Ritz value may carry and still
    count as one (simple) eigenvalue, among ``candidates`` converged ones.

    For a unit eigenvector ``q`` and the start ``v = z / sqrt(P)`` of a Rademacher (or Gaussian)
    ``z``, the weight is ``(q . z)^2``, above ``s`` with probability at most ``2 exp(-s / 2)``
    (Hoeffding; the chi-square(1) tail is below it). Over ``m`` candidates a union bound keeps the
    chance of taking any simple eigenvalue for a repeated one below :data:`FALSE_REPEAT_RATE` at
    ``s = 2 ln(2 m / rate)``: 19.8 for one candidate, 31 for 300. A fixed limit (15 before) is
    passed by one of hundreds of simple eigenvalues now and then (a GRU's Hessian: 15.7), and the
    node then stood for 15.7 eigenvalues, which moved the trace outside its interval.
    """
    return 2.0 * math.log(2.0 * max(candidates, 1) / FALSE_REPEAT_RATE)


def repeat_limit(runs: int, candidates: int) -> float:
    """The largest mean probe weight over ``runs`` runs that a simple eigenvalue may have, among
    ``candidates`` eigenvalues tested (:func:`single_weight_limit` for several runs).

    A simple eigenvalue's probe weights are independent chi-square(1) draws (a Rademacher
    probe's are sub-Gaussian squares with at most that tail), so their sum over ``R`` runs is at
    most a chi-square(R): the limit is its quantile at ``FALSE_REPEAT_RATE / candidates``, a
    union bound over the candidates, divided by ``R``. Without the bound, hundreds of simple
    eigenvalues tested over 2 runs at 1 + 4 sqrt(2 / R) = 5 had one or more pass it on most
    calls, each then counted about 5 times.
    """
    from scipy.stats import chi2  # here: scipy.stats slows `import hessrank`

    return float(chi2.isf(FALSE_REPEAT_RATE / max(candidates, 1), runs)) / runs


def _quadrature(alpha: np.ndarray, beta: np.ndarray, last_beta: float, dim: int
                ) -> tuple[_Quadrature, str | None]:
    """The deflated quadrature of one run (see the module docstring).

    Returns the quadrature and a note where deflation had to guess: the converged Ritz values
    looked repeated (their probe weights too large for simple eigenvalues) and the heaviest were
    not deflated, or the Krylov space was invariant and one node took the eigenvalues it lacks.
    """
    from scipy.linalg import eigh_tridiagonal  # here: scipy.linalg slows `import hessrank`

    nodes, vectors = eigh_tridiagonal(alpha, beta) if len(alpha) > 1 else (alpha, np.ones((1, 1)))
    gauss = vectors[0] ** 2
    gauss = gauss / gauss.sum()
    residual = np.abs(last_beta * vectors[-1])
    gaps = np.full(len(nodes), np.inf)
    if len(nodes) > 1:
        spacing = np.diff(nodes)
        gaps = np.minimum(np.concatenate([[np.inf], spacing]), np.concatenate([spacing, [np.inf]]))
    # An eigenpair: small residual against the operator's scale and against the distance to the
    # next Ritz value (else the node may stand for a cluster of eigenvalues within the residual).
    converged = ((residual <= CONVERGED_RESIDUAL * max(np.abs(nodes).max(), 1e-300))
                 & (residual <= GAP_FRACTION * gaps))
    fixed = converged & (dim * gauss < single_weight_limit(int(converged.sum())))
    # Simple eigenvalues have chi-square(1) probe weights: their sum is n +- sqrt(2 n). A sum far
    # above it means repeated eigenvalues among them, which one probe cannot count.
    def too_heavy(mask: np.ndarray) -> bool:
        count = int(mask.sum())
        return count > 0 and dim * gauss[mask].sum() > count + 4 * math.sqrt(2 * count) + 4

    note = None
    if too_heavy(fixed):
        # The heaviest of them are repeated: freed one at a time, heaviest first, until the rest
        # weigh what simple eigenvalues would (a null space's node just under the single limit
        # undid every deflation before: trace +91 % of a sum loss's EF, exact for its mean).
        freed = 0
        for index in np.argsort(-np.where(fixed, gauss, -np.inf), kind="stable"):
            if not too_heavy(fixed):
                break
            fixed[index] = False
            freed += 1
        note = (f"converged Ritz values carry more probe weight than simple eigenvalues would "
                f"(repeated eigenvalues?): the {freed} heaviest not deflated, their counts "
                "are sampled")
    count = int(fixed.sum())
    if fixed.all() and count < dim:
        # Every Ritz value converged, fewer than dim of them: the Krylov space is invariant, and
        # the eigenvalues it lacks repeat some it has. One probe cannot say which: they go to
        # a node at zero (a null space, where a network's curvature repeats an eigenvalue),
        # else to the node of largest probe weight.
        scale = float(np.abs(nodes).max())
        zero = np.flatnonzero(np.abs(nodes) <= CONVERGED_RESIDUAL * scale)
        repeated = int(zero[0]) if zero.size else int(np.argmax(gauss))
        fixed[repeated] = False
        note = (f"the Krylov space was invariant after {len(nodes)} steps: the {dim - count} "
                f"eigenvalues it lacks are taken as repeats of {nodes[repeated]:.4g} "
                f"({'zero: a null space' if zero.size else 'the largest probe weight'})")
    weights = np.where(fixed, 1.0, 0.0)
    free = ~fixed
    if free.any():
        weights[free] = (dim - fixed.sum()) * gauss[free] / gauss[free].sum()
    return _Quadrature(nodes, weights, fixed, residual, dim * gauss), note


def _srank_cut(nodes: np.ndarray, weights: np.ndarray, threshold: float) -> float:
    """``|lambda|`` of the node where the quadrature's cumulative mass reaches ``threshold``."""
    magnitude = np.abs(nodes)
    order = np.argsort(-magnitude, kind="stable")
    mass = magnitude[order] * weights[order]
    index = min(int(np.searchsorted(np.cumsum(mass), threshold * mass.sum())), len(nodes) - 1)
    return float(magnitude[order][index])


def _count_bounds(quadrature: _Quadrature, weights: np.ndarray, cut: float
                  ) -> tuple[float, float]:
    """What the quadrature proves about the count ``#{|lambda| >= cut}``.

    By the Chebyshev-Markov-Stieltjes inequalities the measure beyond ``x`` lies between the
    weight of the nodes beyond the two nodes bracketing ``x`` and the weight that includes them
    (at a node, only that node is uncertain). The cut has two sides, ``+cut`` and ``-cut``.
    Deflated nodes (exact eigenvalues) add no uncertainty, nor does a node whose Ritz residual
    ``r`` is small against its distance ``d`` to the cut: at most ``(r / d)^2`` of its weight can
    lie beyond ``d`` (we ignore ``r < d / 30``, under 0.1 %).

    Returns:
        The lower and upper bound of the count.
    """
    nodes = quadrature.nodes
    magnitude = np.abs(nodes)
    uncertain = np.zeros(len(nodes), dtype=bool)
    for side in (nodes >= 0, nodes < 0):
        at_cut = np.flatnonzero(side & (magnitude == cut))
        if at_cut.size:
            uncertain[at_cut] = True
            continue
        above = np.flatnonzero(side & (magnitude > cut))
        below = np.flatnonzero(side & (magnitude < cut))
        if above.size:
            uncertain[above[np.argmin(magnitude[above])]] = True
        if below.size:
            uncertain[below[np.argmax(magnitude[below])]] = True
    resolved = quadrature.residuals < np.abs(magnitude - cut) / 30
    uncertain &= ~(quadrature.fixed | resolved)
    beyond = magnitude >= cut
    return float(weights[beyond & ~uncertain].sum()), float(weights[beyond | uncertain].sum())


def _bootstrap_weights(quadrature: _Quadrature, draws: int, rng: np.random.Generator
                       ) -> np.ndarray:
    """``[draws, m]`` weights with the free part redrawn as a Gaussian probe would sample it."""
    free = ~quadrature.fixed
    total = quadrature.weights[free].sum()
    # A node of weight w stands for w eigenvalues; a Gaussian probe's share of them is a
    # chi-square(w) / chi-square(total) draw, i.e. Dirichlet(w / 2).
    shapes = np.maximum(quadrature.weights[free] / 2, 1e-3)
    shares = rng.gamma(shapes, size=(draws, len(shapes)))
    weights = np.tile(quadrature.weights, (draws, 1))
    weights[:, free] = total * shares / shares.sum(axis=1, keepdims=True)
    return weights


def lanczos_spectrum(
    operator: SymmetricOperator,
    *,
    max_products: int,
    threshold: float = 0.99,
    seed: int = 0,
    advance: Callable[[int], None] | None = None,
    basis_dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
    max_basis_bytes: int = MAX_BASIS_BYTES,
) -> LanczosSpectrum:
    """The spectrum of a symmetric operator as a deflated Lanczos quadrature, with an interval.

    Spends ``max_products`` products on one Lanczos run (or, when its basis would exceed
    ``max_basis_bytes``, on several equal runs that fit). Pass the result's ``eigenvalues`` and
    ``weights`` to :func:`hessrank.ranks.spectral_ranks` for every rank.

    Args:
        operator: ``dim``, ``dtype``, ``device`` and ``matmat([k, dim]) -> [k, dim]``.
        max_products: matrix-vector products to spend (at most ``dim`` are useful per run).
        threshold: srank threshold of ``rank_interval``.
        seed: seed of the private generator of the start vectors.
        advance: progress callback, called with ``k`` after every ``k`` products.
        basis_dtype: dtype of the stored Lanczos basis (float32 halves float64's memory).
        rtol: numerical-rank tolerance of ``numerical_interval``, relative to the largest
            ``|eigenvalue|``; default ``dim`` times the epsilon of ``operator.dtype``.
        max_basis_bytes: memory cap of the basis.

    Returns:
        A :class:`LanczosSpectrum`.

    Raises:
        ValueError: ``max_products`` below 1, ``threshold`` outside ``(0, 1]``, ``rtol``
            outside ``[0, 1)``, an empty operator, or fewer than two basis vectors within
            ``max_basis_bytes``; all before any product.
    """
    dim = int(operator.dim)
    if dim < 1:
        raise ValueError("the operator is empty (dim = 0): there is no spectrum to estimate")
    if not isinstance(max_products, int) or max_products < 1:
        raise ValueError(f"max_products must be a positive integer, got {max_products!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if rtol is not None and not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must lie in [0, 1), got {rtol}")
    vector_bytes = dim * torch.empty((), dtype=basis_dtype).element_size()
    max_steps = max_basis_bytes // vector_bytes
    if max_steps < 2:
        raise ValueError(
            f"max_basis_bytes = {max_basis_bytes} holds fewer than 2 Lanczos vectors of "
            f"{vector_bytes} bytes: raise max_basis_bytes or use a smaller basis_dtype"
        )
    steps = int(min(max_products, dim, max_steps))
    generator = torch.Generator().manual_seed(seed)
    quadratures: list[_Quadrature] = []
    spent = 0
    notes: list[str] = []
    guesses: list[str] = []
    removals = 0
    while max_products - spent >= max(steps, 1) or not quadratures:
        start = rademacher(dim, generator, operator.device, basis_dtype)
        alpha, beta, last_beta, run_removals = lanczos_run(operator, start, steps, basis_dtype,
                                                            advance)
        removals += run_removals
        spent += len(alpha)
        quadrature, guess = _quadrature(alpha, beta, last_beta, dim)
        if guess is not None and guess not in guesses:
            guesses.append(guess)
        quadratures.append(quadrature)
        if last_beta == 0.0 and len(alpha) < steps:
            # The Krylov space became invariant: further runs of the same length would only
            # reduce the sampling error, and need the budget for it.
            steps = max(len(alpha), 1)
    run_steps = len(quadratures[0].nodes)
    quadratures, repeats = _completed(quadratures, dim, float(torch.finfo(basis_dtype).eps))
    if repeats is not None:
        guesses.append(repeats)
    runs = len(quadratures)
    nodes, weights = _merge_close(np.concatenate([q.nodes for q in quadratures]),
                                  np.concatenate([q.weights for q in quadratures]) / runs,
                                  float(torch.finfo(basis_dtype).eps))
    order = np.lexsort((-nodes, -np.abs(nodes)))
    ritz = by_magnitude(quadratures[0].nodes[quadratures[0].fixed])

    if rtol is None:
        rtol = default_rtol(dim, float(torch.finfo(operator.dtype).eps))
    intervals = _intervals(quadratures, threshold, rtol, seed,
                           float(torch.finfo(basis_dtype).eps))
    trace = float(nodes @ weights)
    mass = float(np.abs(nodes) @ weights)
    deflated = int(quadratures[0].fixed.sum())
    notes.append(
        f"Lanczos quadrature: {runs} run(s) of {run_steps} steps, "
        f"{spent} products; {deflated} converged eigenvalues deflated (weight 1); "
        f"{removals} Gram-Schmidt removals kept the basis semi-orthogonal"
    )
    notes.append(
        f"trace {trace:.4g} in [{intervals.trace[0]:.4g}, {intervals.trace[1]:.4g}] (95 %); "
        f"sum |lambda| {mass:.4g}"
    )
    notes.append(f"numerical rank in [{intervals.numerical[0]:.0f}, "
                 f"{intervals.numerical[1]:.0f}] (95 %) at rtol = {rtol:.3g}")
    notes.extend(guesses)
    return LanczosSpectrum(
        eigenvalues=nodes[order], weights=weights[order], ritz_values=ritz,
        rank_interval=intervals.srank, trace=trace, trace_interval=intervals.trace,
        numerical_interval=intervals.numerical,
        num_products=spent, notes=notes,
    )


def _completed(quadratures: list[_Quadrature], dim: int, eps: float
               ) -> tuple[list[_Quadrature], str | None]:
    """The runs' quadratures made consistent over their deflated eigenvalues, and a note where
    some look repeated.

    A deflated node is an eigenvalue whatever the probe; a run whose probe was nearly orthogonal
    to it missed it and put its little weight elsewhere, and averaging the runs would count it a
    fraction of once (0.875 for one miss in 8 runs) with no spread left to show it: each run
    gets the eigenvalues other runs deflated as nodes of weight 1, its free weights scaled down
    to make room. Over several runs an eigenvalue's probe weights show its multiplicity: their
    mean over ``R`` runs is 1 on average for a simple one; one above :func:`repeat_limit` is
    repeated (a symmetry of the model), and every run weighs it by its probe instead of once.

    Two deflated nodes are one eigenvalue when they lie within their Ritz residuals of each other
    (distinct eigenvalues are further apart: deflation asks for a gap of ``1 / GAP_FRACTION``
    residuals), plus ``100 eps`` of the largest ``|node|`` for the rounding of the runs' bases
    (``eps`` of the basis dtype; an invariant space has residuals of exactly 0).
    """
    runs = len(quadratures)
    if runs < 2:
        return quadratures, None
    slack = 50 * eps * max(float(np.abs(q.nodes).max(initial=0.0)) for q in quadratures)

    def near(values: np.ndarray, radii: np.ndarray, value: float, radius: float) -> np.ndarray:
        """Which of ``values`` (with their residuals ``radii``) are the eigenvalue ``value``."""
        return np.abs(values - value) <= radii + radius + 2 * slack

    found: list[tuple[float, float]] = []  # one (value, residual) per eigenvalue deflated
    for q in quadratures:
        for value, radius in zip(q.nodes[q.fixed], q.residuals[q.fixed]):
            known = np.array(found).reshape(-1, 2)
            if not near(known[:, 0], known[:, 1], value, radius).any():
                found.append((float(value), float(radius)))
    limit = repeat_limit(runs, len(found))
    shares = [float(np.mean([q.probe[near(q.nodes, q.residuals, value, radius)].sum()
                             for q in quadratures])) for value, radius in found]
    repeated = [share > limit for share in shares]
    completed = []
    for q in quadratures:
        fixed = q.fixed.copy()
        for (value, radius), is_repeated in zip(found, repeated):
            if is_repeated:
                fixed &= ~near(q.nodes, q.residuals, value, radius)
        missing = [(value, radius) for (value, radius), is_repeated in zip(found, repeated)
                   if not is_repeated and not (fixed & near(q.nodes, q.residuals, value,
                                                            radius)).any()]
        nodes = np.concatenate([q.nodes, [v for v, _ in missing]])
        probe = np.concatenate([q.probe, np.zeros(len(missing))])
        fixed = np.concatenate([fixed, np.ones(len(missing), dtype=bool)])
        weights = np.where(fixed, 1.0, 0.0)
        free = ~fixed
        if probe[free].sum() > 0:
            weights[free] = max(dim - int(fixed.sum()), 0) * probe[free] / probe[free].sum()
        order = np.argsort(nodes, kind="stable")
        completed.append(_Quadrature(
            nodes[order], weights[order], fixed[order],
            np.concatenate([q.residuals, [r for _, r in missing]])[order], probe[order]))
    note = None if not any(repeated) else (
        "repeated eigenvalues over the runs, weighed by their probes instead of once: "
        + ", ".join(f"{value:.4g} (mean probe weight {share:.1f} over {runs} runs)"
                    for (value, _), share, is_repeated in zip(found, shares, repeated)
                    if is_repeated))
    return completed, note


def _merge_close(nodes: np.ndarray, weights: np.ndarray, eps: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Nodes within ``10 eps`` of the largest ``|node|`` of each other merged into one
    (weighted mean value, summed weight), so that an eigenvalue found by several runs is one node
    of the combined quadrature; a merged weight within ``1e-9`` of an integer is that integer
    (a count of eigenvalues, not a rounding residue)."""
    order = np.argsort(nodes, kind="stable")
    nodes, weights = nodes[order], weights[order]
    tolerance = 10 * eps * max(float(np.abs(nodes).max()), 1e-300)
    group = np.concatenate([[0], np.cumsum(np.diff(nodes) > tolerance)])
    merged_weights = np.bincount(group, weights=weights)
    merged_nodes = np.bincount(group, weights=nodes * weights) / np.maximum(merged_weights, 1e-300)
    integers = np.round(merged_weights)
    snap = np.abs(merged_weights - integers) <= 1e-9 * np.maximum(merged_weights, 1.0)
    return merged_nodes, np.where(snap, integers, merged_weights)


@dataclass
class _Intervals:
    """95 % intervals of the srank, the numerical rank and the trace."""

    srank: tuple[float, float]
    numerical: tuple[float, float]
    trace: tuple[float, float]


def _intervals(quadratures: list[_Quadrature], threshold: float, rtol: float, seed: int,
               eps: float) -> _Intervals:
    """Intervals from sampling (bootstrap) and resolution (Chebyshev-Markov-Stieltjes).

    Each run's free weights are redrawn (:func:`_bootstrap_weights`); each draw's counts are
    widened to what its quadrature proves (:func:`_count_bounds`) at the srank's cut and at the
    numerical rank's ``rtol * max |lambda|``; runs are averaged draw by draw.
    """
    rng = np.random.default_rng(seed)
    bounds = np.zeros((4, BOOTSTRAP_DRAWS))  # srank low, high; numerical low, high
    traces = np.zeros((2, BOOTSTRAP_DRAWS))  # low, high
    for quadrature in quadratures:
        draws = _bootstrap_weights(quadrature, BOOTSTRAP_DRAWS, rng)
        magnitude = np.abs(quadrature.nodes)
        tolerance = rtol * float(magnitude.max())
        above = magnitude > tolerance
        # Each node's value is known to within its Ritz residual where it is deflated (an
        # eigenvalue lies that close) and to the basis's rounding, 4 eps of the largest: the
        # masses and the trace move by as much (a fully deflated run's interval had no width,
        # and missed an srank whose mass share cleared the threshold by 2.5e-5).
        error = 4 * eps * float(magnitude.max()) + np.where(quadrature.fixed,
                                                            quadrature.residuals, 0.0)
        for b, weights in enumerate(draws):
            shift = float(error @ weights) / max(float(magnitude @ weights), 1e-300)
            estimate = srank(quadrature.nodes, threshold, weights)
            lower, upper = _count_bounds(
                quadrature, weights, _srank_cut(quadrature.nodes, weights, threshold))
            bounds[0, b] += min(estimate, lower,
                                srank(quadrature.nodes, max(threshold - 2 * shift, 1e-12), weights))
            bounds[1, b] += max(estimate, upper,
                                srank(quadrature.nodes, min(threshold + 2 * shift, 1.0), weights))
            count = float(weights[above].sum())
            lower, upper = _count_bounds(quadrature, weights, np.nextafter(tolerance, np.inf))
            bounds[2:, b] += min(count, lower), max(count, upper)
            trace = float(quadrature.nodes @ weights)
            traces[:, b] += trace - float(error @ weights), trace + float(error @ weights)
    bounds /= len(quadratures)
    traces /= len(quadratures)

    def interval(low: np.ndarray, high: np.ndarray) -> tuple[float, float]:
        return float(np.quantile(low, 0.025)), float(np.quantile(high, 0.975))

    return _Intervals(interval(*bounds[:2]), interval(*bounds[2:]), interval(*traces))
