"""Spectrum of a symmetric operator from matrix-vector products: deflated Lanczos quadrature.

One long Lanczos run from a random start ``v`` (``m`` products) gives a tridiagonal ``T``; with
``T = U diag(theta) U^T`` the pairs ``(theta_j, P U_0j^2)`` are the Gauss quadrature of the
spectral measure ``P sum_i (q_i . v)^2 delta_{lambda_i}`` (``|v| = 1``), an unbiased estimate of
the eigenvalue counting measure (stochastic Lanczos quadrature). Measured on MLP Hessians
(``benchmarks/lanczos_scale.py``), spending the whole budget on one run resolves the spectrum far
better than several shorter runs: the polynomial degree, not the number of probes, limits how well
the small eigenvalues that decide the srank and the numerical rank are separated.

Three refinements:

- **Deflation.** A Ritz value whose residual ``|beta_m U_mj|`` is tiny (against the operator's
  scale and against the distance to the next Ritz value) is an eigenvalue; when its probe weight
  is one a simple eigenvalue can have (:func:`single_weight_limit`, which allows for the number
  of converged values tested) it is one eigenvalue and gets weight exactly 1 (instead of the
  random ``P (q_i . v)^2``), and the other nodes share the remaining ``P - #deflated`` in
  proportion to their Gauss weights (a ratio estimator). The large eigenvalues that carry most
  of the mass are then exact, and only the unresolved middle of the spectrum is sampled.
- **Repeat check.** One probe's Krylov space holds one direction of each eigenspace, so it
  cannot tell a simple eigenvalue from a repeated one whose probe weight happens to be small.
  When the Krylov space turns invariant before the budget is spent (few distinct eigenvalues:
  a symmetric initialisation, identical units), the products left run Lanczos from Gaussian
  starts kept orthogonal to the deflated eigenvectors; each eigenvalue found again there is
  another copy, until none is (:func:`_repeat_check`). A run that spends the whole budget gets
  a few products more from such a start (:func:`_spot_check`), where copies of its largest
  deflated eigenvalues converge first; those found are sampled. Over several runs the probe
  weights show repeats too (:func:`repeat_limit`). A
  Krylov space that turns invariant with no products left for the check, no null space and
  every Ritz value deflated leaves its lacking eigenvalues to a guess (the node of largest
  probe weight takes them); its intervals then hold every node taking them. An operator's rank
  bound caps both: the copies a guess may hand out, and the counts sampled from the probes
  (:func:`_within_bound`).
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

Cost: the Lanczos basis is kept in ``basis_dtype`` (float32 by default), ``steps x P`` of it,
no more rows than an operator's rank bound leaves useful (:func:`krylov_rows`); when that would
exceed ``max_basis_bytes`` the budget is split into several runs that fit.
Every step measures the new vector's overlaps with the whole basis (one pass over it) and
removes them (a second pass) only when one exceeds a quarter of ``sqrt(eps)``: the basis stays
semi-orthogonal, which keeps the tridiagonal matrix, hence the quadrature, exact to working
precision (Simon 1984). The loss of orthogonality is measured, not estimated: Simon's recurrence
for it was tried, and with float32 Hessian-vector products, whose rounding is far above
``eps |A|``, its estimate asked for a removal about three steps in four. Measured removals: about
half the steps at P = 682 and 1.8 million, three in four at P = 10^7 (``benchmarks/README.md``).
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hessrank.ranks import default_rtol, spectral_ranks, srank_per_row, whole_count
from hessrank.spectrum.dense import by_magnitude, not_finite_error
from hessrank.spectrum.operator import SymmetricOperator

#: A Ritz pair is an eigenpair when its residual is below this times the largest ``|Ritz value|``.
CONVERGED_RESIDUAL = 1e-5
#: The floor of a scale divided by or scaled with, against division by zero: the least positive
#: float64 (a floor of 1e-300 had counted float64 curvature of 1e-305 as all converged or all
#: rounding: srank 51 for 33; probe 170).
LEAST_SCALE = math.ulp(0.0)
#: ... and below this times the distance to the nearest other Ritz value.
GAP_FRACTION = 1e-2
#: The chance, over all the converged Ritz values of a run, that a simple eigenvalue's probe
#: weight is taken for a repeated eigenvalue's (:func:`single_weight_limit`).
FALSE_REPEAT_RATE = 1e-4
#: Beside copies among the Ritz values, converged ones whose probe weights average at least this
#: (halfway from simple eigenvalues' 1 to a 2-fold spectrum's 2), and two deviations above their
#: count, are taken as repeated (:func:`_deflated_quadrature`).
REPEAT_MEAN_WEIGHT = 1.5
#: A new Lanczos vector is orthogonalised against the basis when one of its overlaps exceeds this
#: times ``sqrt(eps)`` (of the basis dtype); below ``sqrt(eps)`` the basis is semi-orthogonal.
ORTHOGONALITY_FRACTION = 0.25
#: Products of the spot check of a run that spent its budget (:func:`spot_check_steps`): a
#: tenth of the budget, at most the first, none where a tenth is under the second.
SPOT_CHECK_STEPS = (16, 8)
#: Parametric bootstrap draws for the interval.
BOOTSTRAP_DRAWS = 200
#: The least share of a start vector, times the ``d`` directions it is spread over, that an
#: eigenvector keeps with 95 % probability: chi-square(1)'s 5 % quantile. The trace interval
#: allows what an invariant run lacks as if its probe held that little of it (a probe's share
#: of a direction is rarely even: an EF's trace interval missed a copy of 3.1e-4 under a floor
#: of 3.4e-5; probe 89); the counts keep the even share (with it, their intervals of small
#: batches' MLPs reached P: srank [45, 278] for 57, where [56, 58] held; probe 92).
HIDDEN_SHARE = 0.00393
#: A run that spent its budget ended nearly invariant where its last ``beta`` is under this
#: times the square root of the products' rounding of the largest ``|eigenvalue|`` (and far
#: under its Ritz values, :func:`_nearly_invariant`).
NEARLY_INVARIANT_BETA = 12.0
#: Default cap on the memory of the Lanczos basis.
MAX_BASIS_BYTES = 4 * 2**30


@dataclass
class LanczosSpectrum:
    """What :func:`lanczos_spectrum` measured.

    Attributes:
        eigenvalues: quadrature nodes (float64) by decreasing ``|value|``.
        weights: how many eigenvalues each node stands for (sums to ``dim``); always set by
            this solver (None is for exact spectra in the same shape).
        ritz_values: the converged Ritz values of the first run (eigenvalues to show), each as
            often as it counts (once where its count is sampled), and once each value whose
            Ritz values are accurate but too close together for the gap test (a repeated
            eigenvalue found several times), by decreasing ``|value|``; empty when none
            converged.
        rank_interval: interval for the srank at ``threshold`` (resolution and sampling, 95 %).
        trace: estimated signed trace ``sum(lambda)``.
        trace_interval: its 95 % sampling interval.
        num_products: matrix-vector products spent.
        numerical_interval: interval for the numerical rank at ``rtol`` (same construction as
            ``rank_interval``), in whole numbers rounded outward, as its note states: wide
            when the quadrature cannot resolve the eigenvalues near ``rtol * max |lambda|``,
            as happens for Hessians with many tiny eigenvalues.
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
    weights (each node's share of the start vector, before deflation), ``lacking`` how many
    eigenvalues an invariant Krylov space left to a guess: each repeats one of the nodes, and
    which one no probe of the run can say (0: none), ``floor`` the magnitude up to which the
    eigenvalues its Krylov space lacks may lie (:func:`_hidden`; 0 where it lacks none) and
    ``resolution`` its last ``beta``, where it was called invariant; ``determined``: its
    eigenvalues away from zero are as many as the operator's rank bound, so its one free node
    is a null space at exactly zero (:func:`_determined`)."""

    nodes: np.ndarray
    weights: np.ndarray
    fixed: np.ndarray
    residuals: np.ndarray
    probe: np.ndarray
    lacking: int = 0
    floor: float = 0.0
    resolution: float = 0.0
    determined: bool = False


def outward(low: float, high: float) -> tuple[str, str]:
    """An interval's ends as text that still contains it: 4 significant digits, the low end
    rounded down and the high end up (``[11.33, 11.33]`` for (11.32699, 11.33355) had left out
    the exact 11.32887; more digits until rounding to nearest happened to hold it printed 17
    for a sixth of intervals; probe 85). A float parsed from a rounded-down decimal is at most
    the float it came from (rounding to nearest is monotone), so the text holds the interval."""
    def rounded(value: float, direction: str) -> str:
        if value == 0.0 or not math.isfinite(value):
            return f"{value:.4g}"
        exact = decimal.Decimal(value)  # the float's exact binary value
        quantum = decimal.Decimal(1).scaleb(exact.adjusted() - 3)  # the 4th significant digit
        return f"{float(exact.quantize(quantum, rounding=direction)):.4g}"

    return rounded(low, decimal.ROUND_FLOOR), rounded(high, decimal.ROUND_CEILING)


def rademacher(dim: int, generator: torch.Generator, device: torch.device,
               dtype: torch.dtype = torch.float64) -> Tensor:
    """A random ``+-1`` vector ``[dim]`` from a private CPU generator (global RNG untouched).
    (Mapped to ``+-1`` in place: 0.05 s at 11 million entries, 0.18 s before.)"""
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return signs.to(dtype).mul_(2).sub_(1).to(device)


#: Up to this size a run's probe is Gaussian, not Rademacher (:func:`probe_vector`).
GAUSSIAN_PROBE_DIM = 64


def probe_vector(dim: int, generator: torch.Generator, device: torch.device,
                 dtype: torch.dtype = torch.float64, gaussian: bool = False) -> Tensor:
    """A run's start ``[dim]``: Rademacher, or standard Gaussian up to
    :data:`GAUSSIAN_PROBE_DIM` and with ``gaussian`` (an operator whose eigenvectors may be
    spread equally over a few entries, which a ``+-1`` vector is orthogonal to half the time:
    :func:`~hessrank.curvature.operator.interchangeable_slices`). On a small operator a ``+-1``
    vector is an exact eigenvector with a probability that only ``2^-dim`` bounds (``[[0, 1],
    [1, 0]]``: every draw, half of them for each eigenvalue; ``a I + b 11^T`` on
    interchangeable parameters: any balanced draw, 3 in 8 at dim 4); the run then turns
    invariant after one step and reads its one eigenvalue as the whole spectrum: a trace of
    -2 in ``[-2, -2]`` for an exact 0, covered by 9 of 20 seeds at dims 2 and 4 (a probe; 20
    and 17 of 20 with Gaussian starts). From a Gaussian that happens with probability 0."""
    if dim > GAUSSIAN_PROBE_DIM and not gaussian:
        return rademacher(dim, generator, device, dtype)
    return torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype).to(device)


#: Norms within this range are taken as the vectors' dtype sums them (:func:`_norm`).
SAFE_NORMS = (1e-15, 1e15)


#: Vectors at least this long are reduced in chunks (:func:`_dot`), ...
LONG_VECTOR = 8192
#: ... of this many entries.
REDUCTION_CHUNK = 2**16


def working_eps(operator: SymmetricOperator, basis_dtype: torch.dtype) -> float:
    """The larger epsilon of the basis and the products, which decides what is rounding: a
    float64 basis does not make float32 products more precise (float32 products in a float64
    basis never turned invariant, and runs of a rank-8 operator each counted its eigenvalues
    again: trace 30.9 for 4.42; probe 83)."""
    return max(float(torch.finfo(basis_dtype).eps), float(torch.finfo(operator.dtype).eps))


def _dot(first: Tensor, second: Tensor) -> float:
    """``first . second`` (``[dim]`` each). A float32 dot product or norm over the whole length
    accumulates its rounding with it: at 10^7 entries the dot was off by 1.6e-4 and the squared
    norm by 7.3e-4 (2.0e-5 at 10^6; ``benchmarks/lanczos_rounding.py --reductions``), which
    moved the Lanczos coefficients as much (an EF of ResNet-18, P = 11.2 million, had every
    eigenvalue off by up to 1.7e-4 of the largest, its trace 0.21 above the float64 one and
    its interval, 0.002 wide, missing it; a rank-8 operator at P = 4 x 10^6 had its
    eigenvalues off by half the largest). Vectors of
    :data:`LONG_VECTOR` entries or more are summed in chunks of :data:`REDUCTION_CHUNK`, each
    chunk's float32 dot product summed in float64 (rounding 2.4e-8 of the dot and 9.6e-8 of the
    squared norm at 10^7, in 1.3x and 1.6x the time of one float32 pass); shorter ones as one
    float32 dot product as before (their rounding decisions unchanged)."""
    if first.numel() < LONG_VECTOR:
        return float(first @ second)
    partial = torch.stack([first[start: start + REDUCTION_CHUNK]
                           @ second[start: start + REDUCTION_CHUNK]
                           for start in range(0, first.numel(), REDUCTION_CHUNK)])
    return float(partial.sum(dtype=torch.float64))


def _norm(vector: Tensor) -> float:
    """``|vector|``, long ones by :func:`_dot`; outside :data:`SAFE_NORMS`, its squares summed
    again in float64: a float32 sum of squares flushes to zero under about 1e-19 and overflows
    over 1e19 (a confident classifier's EF, at 1e-19, turned invariant after one step: srank
    10 in [10, 10] for 5; a loss scaled by 1e21 was refused as holding Inf). Within it, the
    float32 sum as before: in float64 throughout, the rounding decisions of runs on exactly
    repeated eigenvalues moved, and a GGN whose eigenvalues are all 4-fold missed its intervals
    in 4 of 20 seeds for 1 (probe 70)."""
    norm = (float(vector.norm()) if vector.numel() < LONG_VECTOR
            else math.sqrt(_dot(vector, vector)))
    if SAFE_NORMS[0] <= norm <= SAFE_NORMS[1]:
        return norm
    return float(torch.linalg.vector_norm(vector, dtype=torch.float64))


class LanczosRun:
    """A Lanczos run whose basis lives in rows of a preallocated ``storage``; it can be extended.

    All vector arithmetic is in the storage's dtype (the scalars ``alpha``, ``beta`` in float64).
    Each new vector's overlaps with the whole basis are measured (one pass over it); they are
    removed (classical Gram-Schmidt, a second pass) only when the largest exceeds
    :data:`ORTHOGONALITY_FRACTION` of ``sqrt(eps)`` (relative to the vector's norm), and removed
    again when the first removal took a large part of the vector (Daniel-Gragg-Kaufman-Stewart
    criterion). The basis thus stays semi-orthogonal (overlaps below ``sqrt(eps)``, which keeps
    the tridiagonal matrix exact to working precision, Simon 1984), measured rather than
    estimated. The run stops for good when the Krylov space becomes invariant (``beta`` below
    ``100 eps`` of the largest ``|alpha|, beta``).

    Args:
        operator: the symmetric operator.
        start: ``[dim]`` start vector, any scale.
        storage: ``[capacity, dim]`` rows for the basis (their dtype is the basis dtype).
        deflate: ``[k, dim]`` nearly orthonormal vectors (approximate eigenvectors) the run is
            kept orthogonal to: it then sees the operator on their complement.
        advance: called with 1 after each product.
        scale: the operator's scale as known from an earlier run (its largest ``|alpha|,
            beta``), for the invariance test: on the complement of the deflated eigenvectors
            the products can be all rounding, which is invariant against the operator's scale
            but not against their own.
    """

    def __init__(self, operator: SymmetricOperator, start: Tensor, storage: Tensor,
                 deflate: Tensor | None = None,
                 advance: Callable[[int], None] | None = None, scale: float = 0.0) -> None:
        self.operator = operator
        self.storage = storage
        self.deflate = deflate if deflate is not None and len(deflate) else None
        self.advance = advance
        self.removals = 0
        self.restarted = False
        self._alphas: list[float] = []
        self._betas: list[float] = []
        self.scale = scale
        #: the power of two the products are divided by before they enter the basis, set at the
        #: first (None before)
        self._unit: float | None = None
        start = start.to(device=storage.device, dtype=storage.dtype)
        vector = self._deflated(start)
        norm = _norm(vector)
        # A start in the span of ``deflate`` (to rounding) leaves nothing to explore.
        self.invariant = norm <= 100 * torch.finfo(storage.dtype).eps * _norm(start)
        self._vector = vector / max(norm, LEAST_SCALE)

    @property
    def alpha(self) -> np.ndarray:
        """The diagonal of the tridiagonal matrix, ``[m]`` (float64)."""
        return np.array(self._alphas)

    @property
    def beta(self) -> np.ndarray:
        """Its off-diagonal, ``[m - 1]``."""
        return np.array(self._betas[: max(len(self._alphas) - 1, 0)])

    @property
    def last_beta(self) -> float:
        """``beta_m``, the residual scale of the Ritz pairs; 0 once the space is invariant."""
        return 0.0 if self.invariant or not self._betas else self._betas[-1]

    @property
    def final_beta(self) -> float:
        """``beta_m`` as computed, also where it was small enough to call the space invariant."""
        return self._betas[-1] if self._betas else 0.0

    def _deflated(self, vector: Tensor) -> Tensor:
        """``vector`` with its components along ``deflate`` removed (twice, for rounding)."""
        if self.deflate is not None:
            for _ in range(2):
                vector = vector.addmv(self.deflate.T, self.deflate @ vector, alpha=-1.0)
        return vector

    def _product(self, vector: Tensor) -> tuple[Tensor, float]:
        """The operator's product with ``vector`` (``[dim]``, the basis's dtype) in units of
        :attr:`_unit` (set at the first product), in the basis's dtype, and that unit: products
        of another dtype divided by it, those of the basis's dtype (a :func:`input_unit` below
        1) taken on ``vector`` divided by it, the first one twice (uncounted; its subnormal
        entries' rounding had been 1.7e-6 of the top)."""
        operator = self.operator
        same_dtype = operator.dtype == vector.dtype
        if same_dtype and self._unit is not None and self._unit != 1.0:
            return operator.matmat((vector / self._unit)[None])[0], self._unit
        raw = operator.matmat(vector.to(operator.dtype)[None])[0]
        if self._unit is None:
            self._unit = input_unit(raw) if same_dtype else power_of_two_below(raw)
            if same_dtype and self._unit != 1.0:
                return self._product(vector)
        if self._unit != 1.0:  # in place: the operator's own fresh result
            raw.div_(self._unit)
        return raw.to(vector.dtype), self._unit

    def extend(self, steps: int) -> None:
        """Up to ``steps`` more products (fewer when the space turns invariant or the storage
        is full)."""
        eps = torch.finfo(self.storage.dtype).eps
        semi_orthogonal = ORTHOGONALITY_FRACTION * math.sqrt(eps)
        rounding = working_eps(self.operator, self.storage.dtype)  # of the products
        for _ in range(steps):
            j = len(self._alphas)
            if self.invariant or j == len(self.storage):
                return
            vector = self._vector
            self.storage[j] = vector
            product, unit = self._product(vector)
            if self.advance is not None:
                self.advance(1)
            alpha = _dot(product, vector)  # in units of ``unit``, as beta below
            product.sub_(vector, alpha=alpha)
            if j > 0:
                product.sub_(self.storage[j - 1], alpha=self._betas[-1] / unit)
            product = self._deflated(product)
            previous = self.storage[: j + 1]
            beta = _norm(product)
            for _ in range(2):
                overlaps = previous @ product
                if float(overlaps.abs().max()) <= semi_orthogonal * beta:
                    break
                product.addmv_(previous.T, overlaps, alpha=-1.0)
                self.removals += 1
                before, beta = beta, _norm(product)
                if beta > before / math.sqrt(2):
                    break
            # A restart on rounding: beta at the products' rounding (below sqrt(eps) of the
            # scale), then a next beta of the operator's spread (100 times or more; a dense
            # spectrum's tail shrinks by at most 2.2 a step): the space was invariant, and the
            # run went on from noise, where it can find copies of its eigenvalues.
            previous_beta = self._betas[-1] if self._betas else math.inf
            step_beta = beta
            alpha, beta = alpha * unit, beta * unit
            self.restarted |= (previous_beta < math.sqrt(rounding) * self.scale
                               and beta > 100 * previous_beta)
            if not (math.isfinite(alpha) and math.isfinite(beta)):
                raise not_finite_error(self.operator.dtype)
            self._alphas.append(alpha)
            self._betas.append(beta)
            self.scale = max(self.scale, abs(alpha), beta)
            if beta <= 100 * rounding * self.scale:
                self.invariant = True
                return
            self._vector = product.div_(step_beta)  # in place: no fresh P-long vector a step


def power_of_two_below(product: Tensor) -> float:
    """The power of two at or below ``product``'s largest ``|entry|`` (1 where it is zero or
    not finite): a tensor divided by it is exactly scaled into ``[1, 2)``. Float64 products
    divided by it enter a float32 basis within its range. Products of a float64 model's
    Fisher at a loss of 1e-37 (1e-70) had flushed to zero there, and the spectrum came out
    zero (probe 125)."""
    # (no fresh P-long tensor, as abs() would take: a step takes one; probe 108's test)
    largest = float(torch.linalg.vector_norm(product, math.inf)) if product.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return 1.0
    return 2.0 ** math.floor(math.log2(largest))


#: The largest power of two :func:`input_unit` scales an operator's inputs by (2^64, 1.8e19: an
#: operator's intermediate values grow with it, and an EF's per-sample gradients of 1e-21
#: dotted with it stay far from float32's overflow).
INPUT_SCALE_LIMIT = 2.0 ** 64


def input_unit(product: Tensor) -> float:
    """The power of two to divide an operator's inputs by, read from a ``product`` of it on
    inputs of entries up to 1: 1 where its entries are normal numbers to within epsilon of the
    largest, a smaller power of two (down to ``1 /`` :data:`INPUT_SCALE_LIMIT`) where not. An
    operator linear in its inputs gives their products divided by it, computed in the normal
    range. A float32 ``fisher_lanczos`` whose EF top was 2e-38 had formed subnormal products,
    of a few significant digits, and divided them by their subnormal norms: its Lanczos
    coefficients grew 40-fold a step and the run crashed on an overflow; at 1e-37 it gave a
    numerical rank of 31 for 30, and ``lanczos`` of a Hessian at 2e-38 21 for 20."""
    info = torch.finfo(product.dtype)
    unit = power_of_two_below(product)
    if unit >= info.smallest_normal / info.eps:
        return 1.0
    return max(unit, 1.0 / INPUT_SCALE_LIMIT)


def lanczos_run(
    operator: SymmetricOperator,
    start: Tensor,
    steps: int,
    basis_dtype: torch.dtype = torch.float32,
    advance: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Up to ``steps`` Lanczos steps from ``start`` (``[dim]``): a :class:`LanczosRun` in a basis
    of ``steps x dim`` in ``basis_dtype``, the only large allocation.

    Returns:
        ``alpha`` ``[m]`` and ``beta`` ``[m - 1]`` of the tridiagonal matrix (float64), the
        final ``beta_m`` (0 when the run ended on an invariant subspace), and how many
        Gram-Schmidt removals were applied.
    """
    storage = torch.empty(min(steps, operator.dim), operator.dim, dtype=basis_dtype,
                          device=operator.device)
    run = LanczosRun(operator, start, storage, advance=advance)
    run.extend(len(storage))
    return run.alpha, run.beta, run.last_beta, run.removals


#: Basis entries a block of :func:`ritz_vectors` mixes at once.
RITZ_BLOCK_ELEMENTS = 2**22


def ritz_workspace_bytes(rows: int, dim: int, element: int) -> int:
    """Bytes :func:`ritz_vectors` holds beside an ``[rows, dim]`` basis of ``element``-byte
    entries: a block's product and the contiguous copy of its strided columns (up to 32 MiB
    in float32 that had been left out of the prediction: a ``ggn_lanczos`` run on an MLP of
    P = 8,970 peaked at 2.2 times its budget; probe 106), and the coefficients: the
    tridiagonal matrix's eigenvectors (``rows^2`` in float64), the converged ones picked from
    them, their contiguous transpose and its cast, ``28 rows^2`` bytes at most (10.7 MiB at
    632 rows, of which about 4 MiB are held at once; left out, small models' runs peaked at
    1.2-1.3 times a budget set at their prediction; probe 140)."""
    return 2 * element * min(RITZ_BLOCK_ELEMENTS, rows * dim) + 28 * rows**2


def ritz_vectors(rows: Tensor, coefficients: np.ndarray) -> Tensor:
    """The Ritz vectors ``coefficients^T rows`` written over the first ``k`` of ``rows``.

    Args:
        rows: ``[m, dim]`` Lanczos basis; overwritten, column block by column block (each block
            of the result needs only the same block of the basis), so no second ``k x dim``
            buffer is needed.
        coefficients: ``[m, k]`` eigenvectors of the tridiagonal matrix, ``k <= m``.

    Returns:
        ``rows[:k]``, the ``[k, dim]`` Ritz vectors.
    """
    count = coefficients.shape[1]
    mixing = torch.from_numpy(np.ascontiguousarray(coefficients.T)).to(rows)
    block = max(1, RITZ_BLOCK_ELEMENTS // max(len(rows), 1))
    for begin in range(0, rows.shape[1], block):
        columns = rows[:, begin:begin + block]
        columns[:count] = mixing @ columns
    return rows[:count]


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


def repeat_limit(runs: int, candidates: int, count: int = 1) -> float:
    """The largest mean probe weight over ``runs`` runs that an eigenvalue of multiplicity
    ``count`` may have, among ``candidates`` eigenvalues tested (:func:`single_weight_limit` for
    several runs).

    A simple eigenvalue's probe weights are independent chi-square(1) draws (a Rademacher
    probe's are sub-Gaussian squares with at most that tail), so a ``count``-fold one's sum over
    ``R`` runs is at most a chi-square(count R): the limit is its quantile at
    ``FALSE_REPEAT_RATE / candidates``, a union bound over the candidates, divided by ``R``.
    Without the bound, hundreds of simple eigenvalues tested over 2 runs at 1 + 4 sqrt(2 / R) = 5
    had one or more pass it on most calls, each then counted about 5 times.
    """
    from scipy.special import chdtri  # here, and not scipy.stats: 1 s on a call's first use

    return float(chdtri(count * runs, FALSE_REPEAT_RATE / max(candidates, 1))) / runs


@dataclass
class _RitzPairs:
    """The Ritz pairs of one run: ``nodes`` ascending, ``vectors`` ``[m, m]`` (columns: the
    tridiagonal matrix's eigenvectors), ``residuals`` ``|beta_m U_mj|``, ``converged`` the
    pairs that are eigenpairs (small residual against ``scale``, the operator's largest
    ``|Ritz value|``, and against the distance to the next Ritz value)."""

    nodes: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray


def _ritz_pairs(alpha: np.ndarray, beta: np.ndarray, last_beta: float,
                scale: float | None = None) -> _RitzPairs:
    """The Ritz pairs of a run's tridiagonal matrix (``alpha`` ``[m]``, ``beta`` ``[m - 1]``,
    ``last_beta``: see :class:`LanczosRun`); ``scale`` is the operator's, default the run's."""
    from scipy.linalg import eigh_tridiagonal  # here: scipy.linalg slows `import hessrank`

    nodes, vectors = eigh_tridiagonal(alpha, beta) if len(alpha) > 1 else (alpha, np.ones((1, 1)))
    residuals = np.abs(last_beta * vectors[-1])
    if scale is None:
        scale = float(np.abs(nodes).max())
    return _RitzPairs(nodes, vectors, residuals, _converged(nodes, residuals, scale))


def _converged(nodes: np.ndarray, residuals: np.ndarray, scale: float) -> np.ndarray:
    """Which of the ascending Ritz values ``nodes`` are eigenvalues: a small residual against
    the operator's ``scale`` and against the distance to the next Ritz value (else the node may
    stand for a cluster of eigenvalues within the residual)."""
    gaps = np.full(len(nodes), np.inf)
    if len(nodes) > 1:
        spacing = np.diff(nodes)
        gaps = np.minimum(np.concatenate([[np.inf], spacing]), np.concatenate([spacing, [np.inf]]))
    return ((residuals <= CONVERGED_RESIDUAL * max(scale, LEAST_SCALE))
            & (residuals <= GAP_FRACTION * gaps))


def _copies_once(pairs: _RitzPairs) -> np.ndarray:
    """The Ritz values accurate to :data:`CONVERGED_RESIDUAL` of the largest that the gap test
    leaves out (their neighbours are within their residual), one per group of values within
    that tolerance of each other, none within it of a converged value (a copy of it)."""
    tolerance = CONVERGED_RESIDUAL * max(float(np.abs(pairs.nodes).max()), LEAST_SCALE)
    values = pairs.nodes[(pairs.residuals <= tolerance) & ~pairs.converged]
    converged = pairs.nodes[pairs.converged]
    values = values[~(np.abs(values[:, None] - converged[None, :]) <= tolerance).any(axis=1)]
    if not len(values):
        return values
    keep = np.concatenate([[True], np.diff(values) > tolerance])  # nodes are ascending
    return values[keep]


def _weighed(probe: np.ndarray, fixed: np.ndarray, counts: np.ndarray, dim: int) -> np.ndarray:
    """Node weights: a deflated node counts its eigenvalues (``counts``), the free nodes share
    the rest of ``dim`` in proportion to their probe weights (a ratio estimator)."""
    weights = np.where(fixed, counts, 0.0)
    free = ~fixed
    if free.any() and probe[free].sum() > 0:
        weights[free] = max(dim - float(weights.sum()), 0.0) * probe[free] / probe[free].sum()
    return weights


def _copies_seen(pairs: _RitzPairs, eps: float) -> bool:
    """Whether a Ritz value accurate to :data:`CONVERGED_RESIDUAL` of the largest lies within
    the residuals and the rounding slack (:func:`rounding_slack`) of another nonzero one,
    converged or on its way. In a run that went on from rounding
    (:attr:`LanczosRun.restarted`) they may be copies found there, and nothing is deflated (a
    copy of 4 at 3.9954, residual 0.068, when the budget ran out three products after the
    restart: its count would have been lost, srank [8, 8] for 16; probe 86); a small ``beta``
    followed by a large one is also what two close eigenvalues leave (1e-4 apart in a rank-8
    operator: nothing was deflated, every count sampled, its trace interval 78 % wide where the
    run had found the spectrum), so a restart without copies deflates as any run does. In a
    run that did not restart they are copies of a repeated eigenvalue or of a converged one (a
    float32 run of a trained MLP's Hessian to P products finds such ghosts): evidence of
    repeats, not proof."""
    scale = max(float(np.abs(pairs.nodes).max()), LEAST_SCALE)
    # (zero is the null space, never deflated: rounding leaves it two nodes or more)
    nonzero = np.abs(pairs.nodes) > CONVERGED_RESIDUAL * scale
    values, radii = pairs.nodes[nonzero], pairs.residuals[nonzero]
    accurate = radii <= CONVERGED_RESIDUAL * scale
    near = _near(values[:, None], radii[:, None], values[None, :], radii[None, :],
                 rounding_slack(eps, scale))
    np.fill_diagonal(near, False)
    return bool((near & accurate[:, None]).any())


def _deflated_quadrature(pairs: _RitzPairs, dim: int, final_beta: float, copies: bool = False,
                         seen: bool = False) -> tuple[_Quadrature, list[str]]:
    """The deflated quadrature of one run (see the module docstring); ``final_beta``: its last
    ``beta`` as computed (:attr:`LanczosRun.final_beta`, for :func:`_invariance_floor`);
    ``copies``: the run went on from rounding noise and may have found copies there (a
    restart with :func:`_copies_seen`), so its converged Ritz values can be copies of each
    other, and none is deflated (a zero-initialised network's 6-fold eigenvalues were found 2
    or 3 times each and counted so: srank 15 in [15, 15] for 39); ``seen``: copies among its
    Ritz values (:func:`_copies_seen`), beside which moderately heavy probe weights on the
    deflated values are a sign of repeats (see below).

    Returns the quadrature and a note for each guess deflation had to make: the converged Ritz
    values looked repeated (their probe weights too large for simple eigenvalues) and the
    heaviest were not deflated, the Krylov space was invariant and one node took the eigenvalues
    it lacks, or the run restarted.
    """
    nodes = pairs.nodes
    lacking, floor = 0, 0.0
    gauss = pairs.vectors[0] ** 2
    gauss = gauss / gauss.sum()
    converged = pairs.converged
    scale = float(np.abs(nodes).max())
    # A converged zero is a null space, whatever its probe weight: a network's null spaces are
    # large, and deflated as one eigenvalue a 20-fold zero gave its weight to the nodes above
    # the numerical rank's cut (115 in [115, 115] for 96). It is sampled, as it was counted.
    zero = np.abs(nodes) <= CONVERGED_RESIDUAL * scale
    fixed = (converged & ~zero
             & (dim * gauss < single_weight_limit(int((converged & ~zero).sum()))))
    # Simple eigenvalues have chi-square(1) probe weights: their sum is n +- sqrt(2 n). A sum far
    # above it means repeated eigenvalues among them, which one probe cannot count. (A chi-square
    # tail at 1e-2 caught three 6-fold eigenvalues this bound passes, but on trained MLPs it
    # freed simple ones, heaviest first, whose sampled counts then ran high: trace intervals
    # missed in 6 of 16 seeds; probe 69.)
    def too_heavy(mask: np.ndarray, deviations: float = 4.0, margin: float = 4.0,
                  mean: float = 1.0) -> bool:
        """Whether the probe weights of ``mask`` exceed ``count`` by ``deviations`` standard
        deviations of their sum (chi-square of ``count`` degrees) and ``margin``, and average
        more than ``mean``."""
        count = int(mask.sum())
        return count > 0 and dim * gauss[mask].sum() > max(
            count + deviations * math.sqrt(2 * count) + margin, mean * count)

    # Every Ritz value converged, fewer than dim of them: the Krylov space is invariant.
    invariant = bool(converged.all()) and len(nodes) < dim
    notes = []
    if copies and fixed.any():
        fixed[:] = False
        notes.append("the run went on from rounding after its Krylov space turned invariant, "
                     "where it can find copies of its eigenvalues: none is deflated, every "
                     "count is sampled")
    elif not invariant and (too_heavy(fixed) or seen and too_heavy(fixed, 2.0, 0.0,
                                                                    REPEAT_MEAN_WEIGHT)):
        # Probe weights beyond what simple eigenvalues carry: repeated eigenvalues, and where
        # some repeat, an operator's symmetry repeats the others too (a linear layer's block
        # under MSE is kron(I_C, A), every eigenvalue C-fold: freed one at a time, heaviest
        # first, the rest stayed deflated once each where each stands for C, the free nodes
        # took the rest of P, and trace intervals held the exact trace in 43 of 60 seeds, 27
        # at 11 products; probe 90). None is deflated then. Beside copies among the Ritz values
        # (a repeated eigenvalue found twice, or a converged one found again by a long float32
        # run) two deviations suffice (a last-layer block, 12 products: trace 17 in [13, 18]
        # for 5.8 on every seed) where the weights also average REPEAT_MEAN_WEIGHT: a long
        # float32 run finds copies every time, and among its 145 converged simple eigenvalues two
        # deviations were a heavy draw in 1 to 4 % of seeds, every deflation undone (a trained
        # MLP's trace 81 in [36, 134] for 27.7; probe 213). Copies alone do not suffice (ghosts),
        # nor weights under four deviations (a heavy draw of simple ones). An invariant run
        # keeps its deflations but the heaviest (below):
        # the repeat check counts their copies (freed, they were sampled, and a spectrum of
        # 2- to 6-fold eigenvalues at 200 products had trace intervals up to 49 % wide for 2 %).
        fixed[:] = False
        notes.append("converged Ritz values carry more probe weight than simple eigenvalues "
                     "would (repeated eigenvalues?): none is deflated, every count is sampled")
    if too_heavy(fixed):
        # Some of them are repeated: freed one at a time until the rest weigh what simple
        # eigenvalues would (a null space's node just under the single limit undid every
        # deflation before: trace +91 % of a sum loss's EF, exact for its mean). Heaviest first;
        # in an invariant run smallest first, where the float32 products leave lumps of close
        # eigenvalues they cannot tell apart, each a Ritz value of their summed weight: freed
        # heaviest first, a simple eigenvalue far from the rest, its weight a chance draw of 10.8,
        # was sampled as 6 (a GGN's trace +71 %, srank +56 %, their intervals missing, in 1 of
        # 80 seeds of one model, 6 of 40 of another; probe 224).
        order = (np.where(fixed, np.abs(nodes), np.inf) if invariant
                 else -np.where(fixed, gauss, -np.inf))
        freed = 0
        for index in np.argsort(order, kind="stable"):
            if not too_heavy(fixed):
                break
            fixed[index] = False
            freed += 1
        notes.append(f"converged Ritz values carry more probe weight than simple eigenvalues "
                     f"would (repeated eigenvalues?): the {freed} "
                     f"{'smallest' if invariant else 'heaviest'} not deflated, their counts are "
                     "sampled")
    if invariant and not copies:
        # The eigenvalues an invariant Krylov space lacks repeat some it has. One probe cannot
        # say which: a node at zero (a null space, where a network's curvature repeats an
        # eigenvalue) takes them, with any node freed above, else the node of largest probe
        # weight. (A deflated zero beside a freed node gave that node the null space's copies:
        # trace +12 of 123.)
        if zero.any():  # (rounding can leave two nodes there)
            # zero to the products' float32 resolution, not necessarily below the caller's rtol
            takers, named = np.flatnonzero(zero), (
                f"zero to {CONVERGED_RESIDUAL:g} of the largest |eigenvalue|: taken as a null "
                "space")
        elif (~fixed).any():
            takers, named = np.flatnonzero(~fixed), "the nodes not deflated"
        else:
            # A guess with no evidence behind it: the intervals allow every node to take them
            # (4 parameters of spectrum 9, 1, 1, 1 gave a trace of 28 in [28.00, 28.00] on 3
            # seeds of 20, when 9 had the larger probe weight).
            takers, named = np.array([int(np.argmax(gauss))]), (
                "the largest probe weight; the intervals allow any of the nodes")
            lacking = dim - len(nodes)
        fixed[takers] = False
        floor = _invariance_floor(final_beta, dim - len(nodes))
        notes.append(f"the Krylov space was invariant after {len(nodes)} steps: the "
                     f"{dim - len(nodes)} eigenvalues it lacks are taken as repeats of "
                     f"{', '.join(f'{nodes[i]:.4g}' for i in takers)} ({named}); "
                     f"eigenvalues up to {floor:.3g} in magnitude hide under the products' "
                     "rounding, and the intervals allow for them")
    weights = _weighed(gauss, fixed, np.ones(len(nodes)), dim)
    return _Quadrature(nodes, weights, fixed, pairs.residuals, dim * gauss, lacking,
                       floor, final_beta if floor else 0.0), notes


def _determined(pairs: _RitzPairs, bound: int, dim: int, eps: float
                ) -> tuple[_Quadrature, str] | None:
    """A run's quadrature as the whole spectrum, where its converged Ritz values away from zero
    are as many as the operator's rank ``bound``, with a note; None where they are not.

    Each of them lies within its residual of an eigenvalue, the gap test and the products'
    rounding (:func:`rounding_slack`) keep any two apart, and none may be zero: they are
    ``bound`` distinct nonzero eigenvalues, and the operator has no more, so each is simple and
    every other eigenvalue is exactly zero. One free node at 0 takes those, with nothing left
    to sample or check (an EF of rank 8 spent 634 products on 61 runs after the first had
    found its spectrum, and its null space's rounding, nodes at +-1.2e-5 standing for
    63,000 eigenvalues, widened its trace interval to +-0.4 %). The probe weights play no part:
    deflation's test of them (:func:`single_weight_limit`) is moot where none can repeat.
    """
    nodes, residuals = pairs.nodes, pairs.residuals
    slack = rounding_slack(eps, float(np.abs(nodes).max()))
    counted = pairs.converged & (np.abs(nodes) > residuals + slack)
    count = int(counted.sum())
    if count == 0 or count != bound or (np.diff(nodes[counted]) <= slack).any():
        return None
    gauss = pairs.vectors[0] ** 2
    gauss = gauss / gauss.sum()
    null = [0.0] if dim > count else []  # (an operator of full rank has none)
    values = np.append(nodes[counted], null)
    order = np.argsort(values, kind="stable")
    determined = _Quadrature(
        values[order], np.append(np.ones(count), [dim - count] * len(null))[order],
        np.append(np.ones(count, dtype=bool), np.zeros(len(null), dtype=bool))[order],
        np.append(residuals[counted], null)[order],
        dim * np.append(gauss[counted], [gauss[~counted].sum()] * len(null))[order],
        determined=True)
    return determined, (f"the run found {count} eigenvalues away from zero, as many as the "
                        f"operator's rank bound: the other {dim - count} are exactly zero, and "
                        "the spectrum is complete")


def _add_once(guesses: list[str], guess: str, likewise: dict[int, int]) -> None:
    """Add a further run's ``guess`` to ``guesses``, or count it in ``likewise`` where one that
    differs from it only in its numbers is there already (runs of an invariant Krylov space
    each name their own small values: twelve such notes on a ViT; probe 75)."""
    def kind(note: str) -> str:
        return re.sub(r"[-+]?\d[\d.]*(e[-+]?\d+)?", "#", note)

    for index, earlier in enumerate(guesses):
        if kind(earlier) == kind(guess):
            likewise[index] = likewise.get(index, 0) + 1
            return
    guesses.append(guess)


def _srank_cuts(nodes: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """``|lambda|`` of the node where the quadrature's cumulative mass reaches ``threshold``,
    for each row of ``weights`` ``[B, m]``: ``[B]``."""
    magnitude = np.abs(nodes)
    order = np.argsort(-magnitude, kind="stable")
    mass = magnitude[order] * weights[:, order]
    reached = np.cumsum(mass, axis=1) < threshold * mass.sum(axis=1, keepdims=True)
    return magnitude[order][np.minimum(reached.sum(axis=1), len(nodes) - 1)]


def _count_bounds(quadrature: _Quadrature, weights: np.ndarray, cuts: np.ndarray | float,
                  rounding: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What the quadrature proves about the count ``#{|lambda| >= cut}``, for each row of
    ``weights`` ``[B, m]`` at its cut (``cuts`` ``[B]``, or one for all).

    By the Chebyshev-Markov-Stieltjes inequalities the measure beyond ``x`` lies between the
    weight of the nodes beyond the two nodes bracketing ``x`` and the weight that includes them
    (at a node, only that node is uncertain). The cut has two sides, ``+cut`` and ``-cut``.
    Deflated nodes (exact eigenvalues) add no uncertainty unless ``rounding`` is given and they
    lie within twice their residual plus ``rounding`` of the cut (the products' rounding, or
    copies the repeat check matched to them within it; the srank's cut is a node's value, whose
    rounding :func:`_intervals` allows for by moving the threshold), nor does a node whose Ritz
    residual ``r`` is small against its distance ``d`` to the cut: at most ``(r / d)^2`` of its
    weight can lie beyond ``d`` (we ignore ``r < d / 30``, under 0.1 %).

    Returns:
        The lower and upper bounds of the counts, ``[B]`` each.
    """
    nodes = quadrature.nodes
    magnitude = np.abs(nodes)
    cuts = np.broadcast_to(np.asarray(cuts, dtype=np.float64), (len(weights),))
    lower, upper = np.empty(len(weights)), np.empty(len(weights))
    for cut in np.unique(cuts):  # (the nodes' magnitudes at most: the masks are the weights')
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
        # (a trained MLP's near-null eigenvalues, within rounding of the numerical rank's cut,
        # counted 423 in [423, 423] for 421)
        if rounding is not None:
            uncertain |= quadrature.fixed & (np.abs(magnitude - cut)
                                             <= 2 * quadrature.residuals + rounding)
        beyond = magnitude >= cut
        rows = cuts == cut
        lower[rows] = np.where(beyond & ~uncertain, weights[rows], 0.0).sum(axis=1)
        upper[rows] = np.where(beyond | uncertain, weights[rows], 0.0).sum(axis=1)
    return lower, upper


def _suggested_copies(quadrature: _Quadrature, room: int) -> int:
    """How many copies of the deflated eigenvalues their probe weights allow, at most ``room``:
    none unless the weights, a chi-square of as many degrees as the nodes count if simple,
    exceed its 1 % tail (a sign of repeats too weak to undo a deflation: on trained MLPs,
    freeing values at that tail sampled simple ones high; probe 69), else as many as keep a
    chi-square of that many more degrees from falling under the weights' sum with 2.5 %
    probability (all of the room a GGN's rank bound leaves had widened a trained MLP's trace
    interval to 30 times the trace where the tail was a chance draw; 8 times this way)."""
    from scipy.special import chdtri, chdtriv  # here, not scipy.stats: 1 s on a first use

    fixed = quadrature.fixed
    count = int(round(float(quadrature.weights[fixed].sum())))
    weight = float(quadrature.probe[fixed].sum())
    if not fixed.any() or room <= 0 or weight <= float(chdtri(count, 0.01)):
        return 0
    # the fewest degrees whose chi-square falls under the weights' sum with less than 2.5 %
    # probability: just above those where it does with exactly that
    degrees = math.floor(float(chdtriv(0.025, weight))) + 1
    return min(room, max(degrees - count, 1))


def _nearly_invariant(run: LanczosRun, pairs: _RitzPairs, rounding: float) -> bool:
    """Whether ``run``, which spent its budget, ended with its Krylov space nearly invariant: its
    last ``beta`` under :data:`NEARLY_INVARIANT_BETA` times the square root of the products'
    ``rounding`` of the largest ``|eigenvalue|`` (where a semi-orthogonal basis's rounding leaves
    an invariant space's: 2.2e-5 to 9.7e-4 measured, at twice it 6 of 20 seeds of a 13-distinct
    ``kron(I_3, A)`` missed, probe 183; on an AVX-512 machine up to 5.7 and 9.1 times the
    square root, 2.0e-3 and 3.2e-3, where four times it had been allowed and 4 of 20 seeds
    missed) and under a sixteenth of its smallest Ritz value away from zero.
    A random probe's space is nearly invariant where the eigenvalues it lacks repeat those it
    found; an ordinary spectrum decaying to many small eigenvalues ends on a beta of their
    size, among Ritz values as small (the first test alone had fired on a trained MLP's
    Hessian at a last beta of 1.5e-4, its trace interval widened to 127 times the trace;
    probe 180)."""
    scale = max(run.scale, LEAST_SCALE)
    magnitudes = np.abs(pairs.nodes)
    away = magnitudes[magnitudes > CONVERGED_RESIDUAL * scale]
    return (run.final_beta <= NEARLY_INVARIANT_BETA * math.sqrt(rounding) * scale
            and len(away) > 0
            and run.final_beta <= float(away.min()) / 16)


def _repeats_allowed(quadrature: _Quadrature, dim: int, bound: int, opening: str
                     ) -> tuple[_Quadrature, str]:
    """``quadrature`` with the eigenvalues its invariant (or nearly invariant) run lacks, as many
    as the rank ``bound`` leaves room for (:func:`_room`), allowed to repeat any node in the
    intervals (:func:`_allocations`), and the note saying so after ``opening`` (why no
    products counted the repeats)."""
    lacking, room = dim - len(quadrature.nodes), _room(quadrature, bound)
    quadrature = dataclasses.replace(quadrature, lacking=max(min(lacking, room), 0))
    return quadrature, (
        f"{opening}: its {int(quadrature.fixed.sum())} deflated eigenvalues count once each, "
        "as simple ones would, and the intervals allow "
        + (f"the {lacking} eigenvalues it lacks" if room >= lacking else
           f"the {max(room, 0)} of the eigenvalues it lacks that the rank bound leaves room for")
        + " to repeat any of them (raise lanczos_steps to count repeats)")


def _room(quadrature: _Quadrature, bound: int) -> int:
    """How many more eigenvalues away from zero the operator's rank ``bound`` leaves beside the
    deflated nodes' counts and one for each free node away from zero (an eigenvalue at least,
    or a cluster of them); where the bound is ``dim`` (none stated), no fewer than the
    eigenvalues the run lacks."""
    return bound - round(float(quadrature.weights[quadrature.fixed].sum())) - int(
        (~quadrature.fixed & ~_null_space_nodes(quadrature)).sum())


def _null_space_nodes(quadrature: _Quadrature) -> np.ndarray:
    """The free nodes that hold the null space: those under the :attr:`_Quadrature.floor`, and
    those converged to zero (a value and a residual within :data:`CONVERGED_RESIDUAL` of the
    largest ``|node|``, the null space's node of :func:`_deflated_quadrature`)."""
    magnitude = np.abs(quadrature.nodes)
    resolved = CONVERGED_RESIDUAL * float(magnitude.max(initial=0.0))
    return ~quadrature.fixed & ((magnitude <= quadrature.floor) | (
        (magnitude <= resolved) & (quadrature.residuals <= resolved)))


def _within_bound(quadratures: list[_Quadrature], weights: list[np.ndarray], bound: int
                  ) -> list[np.ndarray]:
    """Each run's ``weights`` (``[m]``, of its quadrature's nodes) with the free nodes away from
    zero holding, on average over the runs that have a node for the null space
    (:func:`_null_space_nodes`), no more than the operator's rank ``bound`` leaves beside the
    other nodes' counts: scaled down by one factor in each of those runs, the excess moved to
    their null-space nodes. Runs with no such node (far from invariant, they spread the null
    space over small nodes) are left as they are.

    A free node's weight is one probe's draw of a count, and the bound is proof: a rank-20
    operator's 2-fold top eigenvalue, left free as too heavy beside a repeat check that counted
    the others, weighed 9 where the bound left it 3 at most (trace 131.9 in [66.5, 250] for
    61.7, 3 of 40 seeds; probe 92). The runs' mean is what is bounded, not each run: each run's
    weight is an unbiased draw, and capping each at a count the truth reaches cuts only the
    high draws, biasing the mean down. Nor are the bootstrap's draws bounded: where the truth
    is at the bound, draws pressed against it put the intervals' ends inside it (a 6-fold
    eigenvalue's trace missed in 6 of 40 seeds, 2 before).
    """
    nulls = [_null_space_nodes(q) for q in quadratures]
    movables = [~q.fixed & ~null for q, null in zip(quadratures, nulls)]
    runs = [index for index, (null, movable) in enumerate(zip(nulls, movables))
            if null.any() and movable.any()]
    if not runs:
        return weights
    held = float(np.mean([weights[index][movables[index]].sum() for index in runs]))
    excess = float(np.mean([weights[index][~nulls[index]].sum() for index in runs])) - bound
    if excess <= 0.0 or held <= 0.0:
        return weights
    kept = max(1.0 - excess / held, 0.0)
    bounded = list(weights)
    for index in runs:
        null, movable = nulls[index], movables[index]
        run = weights[index].copy()
        moved = float(run[movable].sum()) * (1.0 - kept)
        run[movable] *= kept
        null_total = float(run[null].sum())
        run[null] += moved * (run[null] / null_total if null_total > 0 else 1.0 / int(null.sum()))
        bounded[index] = run
    return bounded


def _bootstrap_weights(quadrature: _Quadrature, draws: int, rng: np.random.Generator,
                       least: float = 0.0) -> np.ndarray:
    """``[draws, m]`` weights with the free part redrawn as a Gaussian probe would sample it,
    each node standing for at least ``least`` eigenvalues in the draws."""
    free = ~quadrature.fixed
    total = quadrature.weights[free].sum()
    # A node of weight w stands for w eigenvalues; a Gaussian probe's share of them is a
    # chi-square(w) / chi-square(total) draw, i.e. Dirichlet(w / 2).
    shapes = np.maximum(np.maximum(quadrature.weights[free], least) / 2, 1e-3)
    shares = rng.gamma(shapes, size=(draws, len(shapes)))
    weights = np.tile(quadrature.weights, (draws, 1))
    weights[:, free] = total * shares / shares.sum(axis=1, keepdims=True)
    return weights


def _near(values: np.ndarray, radii: np.ndarray, value: float | np.ndarray,
          radius: float | np.ndarray, slack: float | np.ndarray) -> np.ndarray:
    """Which of ``values`` (known to within ``radii``: Ritz residuals) may be the eigenvalue
    ``value`` (within ``radius``): distinct eigenvalues are further apart, since deflation asks
    for a gap of ``1 / GAP_FRACTION`` residuals. ``slack`` allows for the rounding of the bases
    (an invariant space has residuals of exactly 0). Arrays for ``value`` and ``radius``
    broadcast against ``values`` (every pair, :func:`_copies_seen`)."""
    return np.abs(values - value) <= radii + radius + slack


def _null(value: float, radius: float, slack: float) -> bool:
    """Whether an eigenvalue known to within ``radius`` may be zero (:func:`_near`): a null
    space's, whose copies the free nodes count (the repeat check and the runs' completion
    leave it to them)."""
    return bool(abs(value) <= radius + slack)


#: Two runs' Ritz values of one eigenvalue differ by up to this many epsilons of the largest
#: ``|eigenvalue|`` from rounding alone (:func:`rounding_slack`).
SLACK_UNITS = 100
#: Products measured noisier than rounding (:func:`~hessrank.curvature.hessian.check_products`:
#: one draw) widen the slack to this many times their noise.
NOISE_MARGIN = 4


def noise_eps(noise: float) -> float:
    """The epsilon products of measured ``noise`` (relative to their size) act at: the one
    whose :func:`rounding_slack` is :data:`NOISE_MARGIN` times the noise."""
    return NOISE_MARGIN * noise / SLACK_UNITS


def rounding_slack(eps: float, scale: float) -> float:
    """What two runs' Ritz values of one eigenvalue can differ by from rounding alone: ``100
    eps`` of the operator's largest ``|eigenvalue|`` (``eps`` the run's: of the basis dtype, or
    above it where the products measured noisier, :data:`NOISE_MARGIN`)."""
    return SLACK_UNITS * eps * scale


def _invariance_floor(final_beta: float, lacking: int) -> float:
    """The largest ``|eigenvalue|`` an invariant Krylov space can lack among ``lacking``
    eigenvalues without noticing (all but a probe nearly orthogonal to it).

    The space was called invariant when its last ``beta`` fell under the products' rounding;
    the Ritz vector of the node that stands for the ``d`` lacking eigenvalues (the null
    space's) is the start's share of their eigenvectors, about even over them, so an eigenvalue
    ``mu`` among them leaves a residual of at least ``|mu| / sqrt(d)``, which is at most that
    ``beta``: ``|mu| <= beta sqrt(d)``, and ``k`` of them sum to at most ``beta sqrt(k d)``. (A
    GGN's 64 eigenvalues down to 7e-6 of the largest, 8 of them within 2e-6 of another, turned
    a run invariant after 58 steps and the repeat check's run after 1, lacking 8 eigenvalues up
    to 3e-5; the intervals had missed its numerical rank by 7 and its trace by twice their
    width. With the test's threshold for ``beta`` instead of its value, a zero-initialised MLP's
    GGN, whose last ``beta`` is far smaller, had its numerical rank in [3, 48] for 3; probe 69.)
    """
    return final_beta * math.sqrt(lacking)


def _hidden(quadrature: _Quadrature, bound: int) -> tuple[np.ndarray, float, float]:
    """The nodes that hold what an invariant run may lack (its free nodes within the
    :attr:`_Quadrature.floor` of zero), how many nonzero eigenvalues that may be (each of
    magnitude up to the floor; at most what the operator's rank ``bound`` leaves beside the
    other nodes' counts), and their largest total magnitude (:func:`_invariance_floor`)."""
    small = ~quadrature.fixed & (np.abs(quadrature.nodes) <= quadrature.floor)
    if not quadrature.floor:
        return small, 0.0, 0.0
    room = bound - float(quadrature.weights[~small].sum())
    count = max(min(float(quadrature.weights[small].sum()), room), 0.0)
    return small, count, quadrature.floor * math.sqrt(count)


def _hidden_above(quadrature: _Quadrature, hidden: float, cut: float, capped: bool) -> float:
    """How many of the ``hidden`` eigenvalues an invariant run may lack (:func:`_hidden`) can
    reach the numerical rank's ``cut``, as the intervals allow.

    Under a rank bound (``capped``): all of them where the cut lies within what a probe holding
    :data:`HIDDEN_SHARE` of their directions leaves unseen, none above. Without one, the bound
    of :func:`_invariance_floor` counts them: ``k`` eigenvalues of magnitude ``cut`` or more
    among the ``d`` lacking, each with its even share of the probe, leave the null space's Ritz
    vector a residual of at least ``cut sqrt(k / d)``, which the last ``beta`` bounds, so ``k``
    is at most ``(floor / cut)^2`` (``floor`` = ``beta sqrt(d)``): all ``d`` where the cut
    lies under that ``beta``, none where it clears the floor. (Only the cut under the last
    ``beta`` had widened the interval: P = 80 eigenvalues logspace(0, -10) turned invariant
    after 42 steps, their floor 2.5e-5 of the largest over a cut at 9.5e-6 and a last beta at
    4.1e-6, and the numerical rank came out in [37, 38] for 40; probe 244.)"""
    if capped:
        return hidden if cut < quadrature.floor / math.sqrt(HIDDEN_SHARE) else 0.0
    if cut <= 0.0:
        return hidden
    return min(hidden, float(math.floor((quadrature.floor / cut) ** 2)))


@dataclass
class _Checked:
    """What :func:`_repeat_check` found: the run's quadrature with the counts of its deflated
    eigenvalues, the eigenvalues whose counts it could not complete (``(value, residual)``, to
    be sampled in every run), the products spent, and a note."""

    quadrature: _Quadrature
    sampled: list[tuple[float, float]]
    products: int
    note: str


def _repeat_check(operator: SymmetricOperator, run: LanczosRun, pairs: _RitzPairs,
                  quadrature: _Quadrature, budget: int, generator: torch.Generator,
                  advance: Callable[[int], None] | None, bound: int, spare: int,
                  eps: float) -> _Checked:
    """Counts the copies of the run's deflated eigenvalues with further runs orthogonal to them
    (``eps``: the epsilon of :func:`rounding_slack`, the spectrum's).

    Deflation takes a converged Ritz value for a simple eigenvalue, and one probe cannot tell
    (its Krylov space holds one direction of each eigenspace; a repeated eigenvalue's probe
    weight is often small enough for a simple one's: a zero-initialised network's 3-fold
    eigenvalue was counted once). A run from a Gaussian start kept orthogonal to the deflated
    Ritz vectors sees the operator on their complement, where a simple eigenvalue no longer
    is: a Ritz value that converges there within the residuals of a deflated one is another
    eigenvector of it. Each copy found is deflated too and the check runs again, until a run
    whose Krylov space turns invariant finds none: the counts are then exact, down to the
    products' rounding (a copy of an eigenvalue within about ``sqrt(P) 100 eps`` of the scale
    can hide under the invariance test). When the budget cuts a run first, copies may be left,
    and every deflated eigenvalue's count is left to the probe (sampled): the counts found are
    lower bounds only. The operator's rank bound caps how many are left: none, and the counts
    are complete; where no further run will sample them and the bound leaves at most one per
    deflated eigenvalue, the counts found stand and the intervals allow each node to take what
    the bound leaves, from the free nodes' weight (a probe's weight is one draw of a
    count: an EF with one pair of eigenvalues 2e-7 of the largest apart had srank 2 to 11 for
    5 and trace 2.2 to 31 for 14.3 on 5 of 20 seeds, each from one run; probe 89). A converged
    Ritz value that matches no node of the first run is an eigenvalue its probe missed
    (orthogonal to its eigenspace): it is counted the same way.

    The run's storage is reused: its basis is replaced by the Ritz vectors (``k`` rows), and
    each check run takes the rows after them, so the memory stays that of one basis.

    Args:
        operator: the symmetric operator.
        run: the finished first run; its basis is overwritten.
        pairs: its Ritz pairs; ``quadrature``: its deflated quadrature.
        budget: the products the check may spend.
        generator: the private generator of the start vectors.
        advance: progress callback.
        bound: the operator's rank bound (its nonzero eigenvalues at most).
        spare: the products the call has beyond ``budget``'s run: further runs, of the first
            run's length, sample the counts where the check leaves them open.
    """
    fixed = np.flatnonzero(quadrature.fixed)
    values, radii = list(quadrature.nodes[fixed]), list(quadrature.residuals[fixed])
    counts = [1.0] * len(fixed)
    free_values, free_radii = quadrature.nodes[~quadrature.fixed], quadrature.residuals[
        ~quadrature.fixed]
    scale = float(np.abs(pairs.nodes).max())
    slack = rounding_slack(eps, scale)
    storage = run.storage
    kept = len(fixed)
    ritz_vectors(storage[: len(run.alpha)], pairs.vectors[:, fixed])
    spent, runs, complete = 0, 0, False
    floor, resolution = quadrature.floor, quadrature.resolution
    while budget - spent >= 1 and len(storage) > kept:
        steps = min(budget - spent, len(storage) - kept)
        check, found = _orthogonal_run(operator, run, kept, steps, generator, advance, scale)
        spent += len(check.alpha)
        runs += 1
        if found is None:  # the deflated vectors span the space
            complete = True
            break
        deflated = []
        for index in np.flatnonzero(found.converged):
            value, radius = found.nodes[index], found.residuals[index]
            if _null(value, radius, slack):
                continue  # the null space: the free nodes count its copies
            match = np.flatnonzero(_near(np.array(values), np.array(radii), value, radius,
                                         slack))
            if match.size:  # a copy of a deflated eigenvalue
                counts[int(match[0])] += 1
            elif _near(free_values, free_radii, value, radius, slack).any():
                continue  # a free node's eigenvalue: its probe weight counts the copies
            else:  # an eigenvalue the first probe missed (orthogonal to its eigenspace)
                values.append(float(value))
                radii.append(float(radius))
                counts.append(1.0)
            deflated.append(index)
        if not deflated:
            # An invariant space holds every eigenspace its start touches (a Gaussian start:
            # all of them): no copy is left. A run the budget cut may have missed some. Its
            # last beta, under the products' rounding, bounds the copies it can lack as the
            # first run's does (a 1-product check lacking 26 directions hid a copy of 3.1e-4,
            # 4e-5 of the largest, from an EF's trace interval that allowed 3.4e-5; probe 89).
            complete = check.invariant
            if complete:
                resolution = max(resolution, check.final_beta)
                floor = max(floor, _invariance_floor(check.final_beta,
                                                     operator.dim - kept - len(check.alpha)))
            break
        ritz_vectors(storage[kept: kept + len(check.alpha)], found.vectors[:, deflated])
        kept += len(deflated)
    added = len(values) - len(fixed)
    found_values, found_counts = np.array(values), np.array(counts)
    repeated = found_counts > 1
    note = (f"repeat check: {spent} products in {runs} run(s) orthogonal to the {len(fixed)} "
            "deflated eigenvectors found ")
    note += ("none of them again" if not repeated[: len(fixed)].any() else "copies of " + ", ".join(
        f"{value:.4g} ({count:.0f}-fold)" for value, count in zip(
            found_values[: len(fixed)][repeated[: len(fixed)]],
            found_counts[: len(fixed)][repeated[: len(fixed)]])))
    if floor > quadrature.floor:
        note += (f"; copies up to {floor:.3g} in magnitude may hide under its last run's "
                 "rounding, and the intervals allow for them")
    if added:
        note += ("; eigenvalues the first probe missed: " + ", ".join(
            f"{value:.4g} ({count:.0f}-fold)" for value, count in zip(
                found_values[len(fixed):], found_counts[len(fixed):])))
    nodes = np.concatenate([quadrature.nodes, found_values[len(fixed):]])
    is_fixed = np.concatenate([quadrature.fixed, np.ones(added, dtype=bool)])
    sampled: list[tuple[float, float]] = []
    # Copies left are nonzero eigenvalues beside the counts found and the free nodes'.
    room = bound - round(sum(counts)) - int(sum(
        not _null(value, radius, slack) for value, radius in zip(free_values, free_radii)))
    lacking = quadrature.lacking
    if not complete and room <= 0:
        complete = True
        note += "; the rank bound leaves no room for more copies"
    elif (not complete and spare + budget - spent < len(run.alpha) and room <= len(fixed)
          and not quadrature.fixed.all()):
        lacking = room
        note += (f"; its products ran out before its Krylov space was exhausted, so up to {room} "
                 "copies (the rank bound) may be left: the counts found stand, and the "
                 "intervals allow any eigenvalue to take them")
    elif not complete:
        # Copies may be left: the counts found are lower bounds only. Those of the first run's
        # eigenvalues are left to its probe; those it missed (probe weight 0) keep them.
        is_fixed[fixed] = False
        sampled = [(float(v), float(r)) for v, r in zip(values[: len(fixed)],
                                                       radii[: len(fixed)])]
        note += ("; its products ran out before its Krylov space was exhausted, so copies may "
                 "be left: the deflated eigenvalues' counts are sampled")
    node_counts = np.ones(len(nodes))
    node_counts[fixed] = found_counts[: len(fixed)]
    node_counts[len(quadrature.nodes):] = found_counts[len(fixed):]
    probe = np.concatenate([quadrature.probe, np.zeros(added)])
    order = np.argsort(nodes, kind="stable")
    residuals = np.concatenate([quadrature.residuals, radii[len(fixed):]])
    # A complete check leaves the free nodes the eigenvalues orthogonal to every deflated one:
    # no count is left to a guess.
    checked = _Quadrature(nodes[order],
                          _weighed(probe, is_fixed, node_counts, operator.dim)[order],
                          is_fixed[order], residuals[order], probe[order],
                          0 if complete else lacking, floor, resolution)
    return _Checked(checked, sampled, spent, note)


def _orthogonal_run(operator: SymmetricOperator, run: LanczosRun, kept: int, steps: int,
                    generator: torch.Generator, advance: Callable[[int], None] | None,
                    scale: float) -> tuple[LanczosRun, _RitzPairs | None]:
    """Up to ``steps`` Lanczos steps from a Gaussian start kept orthogonal to the first ``kept``
    rows of ``run``'s storage (Ritz vectors written there), its basis in the rows after them:
    the run, and its Ritz pairs against the operator's ``scale`` (None where it took no step,
    the kept rows spanning the space). The repeat check's runs and the spot check's."""
    start = torch.randn(operator.dim, generator=generator, dtype=torch.float64)
    check = LanczosRun(operator, start, run.storage[kept: kept + steps], run.storage[:kept],
                       advance, run.scale)
    check.extend(steps)
    found = (_ritz_pairs(check.alpha, check.beta, check.last_beta, scale)
             if len(check.alpha) else None)
    return check, found


def krylov_rows(rank_bound: int) -> int:
    """The basis rows a run on an operator of rank at most ``rank_bound`` (``r``) can use: its
    Krylov space has ``r + 1`` dimensions in exact arithmetic, and a semi-orthogonal basis
    (overlaps up to ``sqrt(eps)``) resolves the eigenvalues under ``sqrt(eps)`` of the largest
    in some steps more. Measured on EFs and GGNs of MLPs (r = 3 to 450), first runs turned
    invariant after ``r + 2`` to ``r + 37`` steps, at most ``r / 12 + 3`` beyond ``r + 1``; this
    allows ``r / 4 + 16``. A run that reaches it first is cut as a budget cuts one (its
    unconverged nodes are sampled)."""
    return rank_bound + 1 + rank_bound // 4 + 16


def spot_check_steps(steps: int) -> int:
    """The products :func:`lanczos_spectrum` adds to a run of ``steps`` that spends them all
    without its Krylov space turning invariant, to spot-check its deflated eigenvalues
    (:func:`_spot_check`): a tenth, at most 16, none where a tenth is under 8 (too few to
    converge an eigenvalue). Beyond the budget, as taken from it they cost the run resolution
    (at P = 682, 16 of 227 products moved the numerical rank's error from -12.9 % to -13.8 % and
    the srank interval's width from 30 % to 34 %)."""
    most, least = SPOT_CHECK_STEPS
    return min(most, steps // 10) if steps // 10 >= least else 0


def _spot_check(operator: SymmetricOperator, run: LanczosRun, pairs: _RitzPairs,
                quadrature: _Quadrature, budget: int, generator: torch.Generator,
                advance: Callable[[int], None] | None, eps: float) -> _Checked:
    """A few products from a Gaussian start kept orthogonal to the deflated Ritz vectors of a run
    that spent its budget (not invariant, so not :func:`_repeat_check`'s to count; ``eps``: the
    epsilon of :func:`rounding_slack`, the spectrum's).

    Deflation takes a converged Ritz value for a simple eigenvalue; a repeated one whose probe
    weight a simple one could have is then counted once, and nothing in the run shows it (a
    Hessian's 3-fold eigenvalue 5 beside a 10: trace 16.2 in [16.2, 16.2] for 26.2, every
    seed). On the complement of the deflated vectors the largest eigenvalues converge first, in a
    few steps: one that converges within the residuals of a deflated eigenvalue is another copy
    of it. Such eigenvalues are not deflated: their counts are sampled from the probe, in every
    run. (Copies among the small eigenvalues, which a few steps do not reach, stay uncounted.)

    Only the largest deflated eigenvalues, ``4 budget`` of them, are kept out of the check (their
    Ritz vectors cost ``k m P``: 390 of them took 8 % of a 494-product call at P = 1482); the
    check's own largest eigenvalue is then the next one, found as a copy only where it lies within
    the residuals of one of those.

    The run's storage is reused as in :func:`_repeat_check`.
    """
    fixed = np.flatnonzero(quadrature.fixed)
    fixed = fixed[np.argsort(-np.abs(quadrature.nodes[fixed]), kind="stable")[: 4 * budget]]
    values, radii = quadrature.nodes[fixed], quadrature.residuals[fixed]
    scale = float(np.abs(pairs.nodes).max())
    slack = rounding_slack(eps, scale)
    ritz_vectors(run.storage[: len(run.alpha)], pairs.vectors[:, fixed])
    check, found = _orthogonal_run(operator, run, len(fixed), budget, generator, advance, scale)
    copies: set[int] = set()
    if found is not None:
        for index in np.flatnonzero(found.converged):
            value, radius = found.nodes[index], found.residuals[index]
            match = np.flatnonzero(_near(values, radii, value, radius, slack))
            if match.size and not _null(value, radius, slack):
                copies.add(int(match[0]))
    note = (f"spot check: {len(check.alpha)} products orthogonal to the {len(fixed)} largest "
            "deflated eigenvectors found ")
    if not copies:
        return _Checked(quadrature, [], len(check.alpha), note + "none of them again")
    repeated = sorted(copies)
    is_fixed = quadrature.fixed.copy()
    is_fixed[fixed[repeated]] = False
    checked = dataclasses.replace(quadrature, fixed=is_fixed, weights=_weighed(
        quadrature.probe, is_fixed, np.ones(len(is_fixed)), operator.dim))
    note += ("copies of " + ", ".join(f"{values[i]:.4g}" for i in repeated)
             + ": repeated, their counts are sampled")
    return _Checked(checked, [(float(values[i]), float(radii[i])) for i in repeated],
                    len(check.alpha), note)


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
    rank_bound: int | None = None,
    noise: float = 0.0,
    gaussian_start: bool = False,
) -> LanczosSpectrum:
    """The spectrum of a symmetric operator as a deflated Lanczos quadrature, with an interval.

    Spends ``max_products`` products on one Lanczos run (or, when its basis would exceed
    ``max_basis_bytes``, on several equal runs that fit). Pass the result's ``eigenvalues`` and
    ``weights`` to :func:`hessrank.ranks.spectral_ranks` for every rank.

    Args:
        operator: ``dim``, ``dtype``, ``device`` and ``matmat([k, dim]) -> [k, dim]``.
        max_products: matrix-vector products to spend (at most ``dim`` are useful per run),
            and up to :func:`spot_check_steps` more where the first run spends its share.
        threshold: srank threshold of ``rank_interval``.
        seed: seed of the private generator of the start vectors.
        advance: progress callback, called with ``k`` after every ``k`` products.
        basis_dtype: dtype of the stored Lanczos basis (float32 halves float64's memory).
        rtol: numerical-rank tolerance of ``numerical_interval``, relative to the largest
            ``|eigenvalue|``; default the operator's ``rank_bound`` (``dim`` where it has none)
            times the larger epsilon of ``operator.dtype`` and ``basis_dtype``.
        max_basis_bytes: memory cap of the basis.
        rank_bound: the largest rank the operator can have, known before the run (default its
            ``rank_bound`` attribute, ``dim`` where it has none; the smaller of the two where
            both are given). A run's Krylov space then has at most ``rank_bound + 1``
            dimensions: the basis holds no more rows than :func:`krylov_rows` (an EF's ``n``
            is far below a default budget of products), and a first run that finds as many
            eigenvalues away from zero has found the whole spectrum (:func:`_determined`):
            it stops there.
        noise: the products' noise as measured relative to their size
            (:func:`~hessrank.curvature.hessian.check_products`); two runs' values of one
            eigenvalue are taken as such within :data:`NOISE_MARGIN` times it of the largest
            ``|eigenvalue|``, where that exceeds the rounding's slack (:func:`rounding_slack`).
        gaussian_start: start every run from a Gaussian vector (:func:`probe_vector`).

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
    known = min(int(getattr(operator, "rank_bound", dim)),
                dim if rank_bound is None else rank_bound)
    steps = int(min(max_products, dim, max_steps, krylov_rows(known)))
    generator = torch.Generator().manual_seed(seed)
    storage = torch.empty(steps, dim, dtype=basis_dtype, device=operator.device)
    # runs' values of one eigenvalue differ by the products' rounding, and by their noise where
    # it is measured above that (a float32 model rounding through half precision inside a
    # custom autograd.Function: fisher_lanczos had counted every eigenvalue once a run, its
    # trace 1.6-1.9x, at noise 20 times the slack; probe 175)
    rounding = working_eps(operator, basis_dtype)
    eps = max(rounding, noise_eps(noise))
    notes: list[str] = []
    guesses: list[str] = []
    first = LanczosRun(operator, probe_vector(dim, generator, operator.device, basis_dtype,
                                              gaussian_start), storage, advance=advance)
    first.extend(steps)
    pairs = _ritz_pairs(first.alpha, first.beta, first.last_beta)
    seen = _copies_seen(pairs, eps)
    quadrature, first_guesses = _deflated_quadrature(pairs, dim, first.final_beta,
                                                     first.restarted and seen, seen)
    # The rank bound as the first run left it (a data set's is known after a pass: its
    # batches' nonzero factor columns): no count exceeds it.
    bound = min(int(getattr(operator, "rank_bound", dim)), known)
    # (a restart does not matter here: copies of an eigenvalue are within the rounding slack of
    # each other, which _determined refuses; an operator of rank 8 with two eigenvalues 1e-4
    # apart restarted falsely on the pair's small beta, spent 200 products sampling instead of
    # 10, and its trace interval missed)
    determined = _determined(pairs, bound, dim, eps)
    if determined is not None:  # the guesses of an invariant run are settled
        quadrature, first_guesses = determined[0], [determined[1]]
    spent, removals = len(first.alpha), first.removals
    sampled: list[tuple[float, float]] = []
    checked = False
    guesses.extend(first_guesses)
    # The products an invariant Krylov space leaves count the copies of what it deflated; a run
    # that spends them all gets a few more to spot-check them (taken from it, they would cost it
    # resolution).
    spotted = 0  # products of the spot check, beyond the budget
    # (its basis takes the rows after the deflated vectors)
    spot = min(spot_check_steps(steps), steps - int(quadrature.fixed.sum()))
    if determined is not None:
        pass  # nothing left to check
    elif quadrature.fixed.any() and first.invariant and steps > spent:
        check = _repeat_check(operator, first, pairs, quadrature, steps - spent, generator,
                              advance, bound, max_products - steps, eps)
        quadrature, sampled, checked = check.quadrature, check.sampled, True
        spent += check.products
        guesses.append(check.note)
    elif quadrature.fixed.any() and (first.invariant or quadrature.floor > 0):
        # Which nodes the eigenvalues it lacks repeat, nothing here says: the intervals hold
        # every node taking them (_allocations), as many as the rank bound leaves beside the
        # nodes away from zero. (They had no width: a diagonal Hessian 1, 0.25 x4, 0 x3 at its
        # default 3 products gave srank 2 in [2, 2] for 5, trace 1.25 in [1.25, 1.25] for 2;
        # probe 68.) The run counts as invariant where every Ritz value converged as its
        # budget ended (floor), its last beta just above the test's (a linear layer's GGN,
        # 5 distinct eigenvalues each 4-fold, at 6 products: trace 3.553 in [3.546, 3.559]
        # for 14.21 on 20 of 40 seeds).
        quadrature, note = _repeats_allowed(
            quadrature, dim, bound, "the Krylov space turned invariant with no products left "
            "for the repeat check")
        guesses.append(note)
    elif quadrature.fixed.any() and spot >= SPOT_CHECK_STEPS[1]:
        check = _spot_check(operator, first, pairs, quadrature, spot, generator, advance, eps)
        quadrature, sampled, spotted = check.quadrature, check.sampled, check.products
        if sampled:
            guesses.append(check.note)
    elif quadrature.fixed.any() and bound < dim and (
            copies := _suggested_copies(quadrature, _room(quadrature, bound))):
        # Deflated probe weights too heavy for simple eigenvalues at a 1 % chi-square tail,
        # but not at deflation's own tests, with no products left to check them: the counts of
        # one are kept, and the intervals allow the copies the weights and the rank bound
        # leave room for (a linear layer's GGN, five 4-fold eigenvalues, 6 products: three
        # deflated once each at weights 4.7, 4.2 and 6.4, trace 4.84 in [3.60, 6.70] for 14.21).
        quadrature = dataclasses.replace(quadrature, lacking=copies)
        guesses.append(
            f"the {int(quadrature.fixed.sum())} deflated eigenvalues carry more probe weight "
            "than simple ones usually do (repeated eigenvalues?) and no products are left to "
            f"check them: each counts once, and the intervals allow up to {copies} copies of "
            "any of them (raise lanczos_steps to count repeats)")
    elif quadrature.fixed.any() and _nearly_invariant(first, pairs, rounding):
        # A Krylov space nearly invariant as the budget ended, one Ritz value short of
        # converging, so the invariance test does not tell (a linear layer's Hessian under MSE,
        # kron(I_3, A), at its default 7 products, its number of distinct eigenvalues: last beta
        # 2.2e-5 of the largest, trace 12.30 in [12.30, 12.30] for 17.82 on every seed; probe
        # 178).
        quadrature, note = _repeats_allowed(
            quadrature, dim, bound, f"the products ran out with the Krylov space nearly "
            f"invariant (last beta {first.final_beta / first.scale:.1e} of the largest "
            "|eigenvalue|)")
        guesses.append(note)
    quadratures = [quadrature]
    # A further run needs all the steps, or once a Krylov space turned invariant the products of
    # the longest invariant run so far: only the sampling error is left to reduce, and a probe
    # that missed an eigenspace ends sooner (runs cut to its length were 1-step quadratures, a
    # node of weight P at the probe's mean: srank 19 for a GGN of rank 2).
    invariant = [len(first.alpha)] if first.invariant else []
    need = max(invariant, default=steps)
    likewise: dict[int, int] = {}  # a guess's index: how many further runs made one like it
    # a first product exactly zero: H q = 0 for a random q has q's components in every
    # eigenvector, so the matrix is zero, and further runs find nothing (a zero block had spent
    # its whole budget on 173 runs of one product each; probe 213)
    zero = first.invariant and len(first.alpha) == 1 and first.alpha[0] == 0.0 \
        and first.final_beta == 0.0
    while not zero and determined is None and max_products - spent >= max(need, 1):
        run = LanczosRun(operator, probe_vector(dim, generator, operator.device,
                                                  basis_dtype, gaussian_start),
                         storage[: min(steps, max_products - spent)], advance=advance)
        run.extend(len(run.storage))
        removals += run.removals
        spent += len(run.alpha)
        run_pairs = _ritz_pairs(run.alpha, run.beta, run.last_beta)
        seen = _copies_seen(run_pairs, eps)
        quadrature, run_guesses = _deflated_quadrature(run_pairs, dim, run.final_beta,
                                                       run.restarted and seen, seen)
        for guess in run_guesses:
            _add_once(guesses, guess, likewise)
        quadratures.append(quadrature)
        if run.invariant:
            invariant.append(len(run.alpha))
            need = max(invariant)
    for index, count in likewise.items():
        guesses[index] += f" (likewise in {count} further run{'s' if count > 1 else ''})"
    run_steps = len(first.alpha)
    quadratures, repeats = _completed(quadratures, dim, eps, sampled, checked and not sampled)
    if repeats is not None:
        guesses.append(repeats)
    excess = _past_the_bound(quadratures[0], bound)
    if excess is not None:
        counted_fixed, share = excess
        where = (f"its products' noise (measured at {noise:.2g} of their size) moved "
                 "eigenvalues from run to run by more than that, and a run's were counted as new "
                 "ones")
        if share > EXCESS_SHARE:
            # (a float32 fisher_lanczos of a per-token head's bias, rank at most 4, counted 82
            # eigenvalues, its trace 19 times the EF's in an interval of no width; probe 245)
            raise ValueError(
                f"the Lanczos runs counted {counted_fixed} converged eigenvalues for an operator "
                f"of rank at most {bound}: {where}, {share:.2g} of sum |lambda| beyond what the "
                "rank allows, so its spectrum and trace would be wrong. Use the Gram method of "
                "the same curvature (fisher or ggn), whose matrix is that small, or a float64 "
                "copy of the model")
        guesses.append(
            f"the runs counted {counted_fixed} converged eigenvalues for an operator of rank at "
            f"most {bound}: {where}; the smallest of them, beyond the rank, hold {share:.2g} of "
            "sum |lambda|")
    quadratures = [dataclasses.replace(q, weights=weights) for q, weights in zip(
        quadratures, _within_bound(quadratures, [q.weights for q in quadratures], bound))]
    runs = len(quadratures)
    nodes, weights = _merge_close(np.concatenate([q.nodes for q in quadratures]),
                                  np.concatenate([q.weights for q in quadratures]) / runs,
                                  eps)
    order = np.lexsort((-nodes, -np.abs(nodes)))
    # The first run's converged Ritz values, each as often as it counts (a sampled one once),
    # and once each value whose Ritz values are accurate but too close to each other for the
    # gap test (copies of a repeated eigenvalue, or those a semi-orthogonal basis finds): each
    # lies within its residual of an eigenvalue. (A 6-fold top eigenvalue found 3 times was
    # shown none, and the top was reported 37x too small; probe 65.)
    first_fixed = quadratures[0].fixed
    counted = quadratures[0].nodes[first_fixed]
    # (a determined spectrum's other Ritz values are its null space's)
    ritz = by_magnitude(np.concatenate([
        np.repeat(counted, np.round(quadratures[0].weights[first_fixed]).astype(int)),
        *([] if determined is not None else [
            pairs.nodes[pairs.converged & ~np.isin(pairs.nodes, counted)],
            _copies_once(pairs)])]))

    if rtol is None:
        # The rule the ranks apply (:func:`hessrank.api` sizes it by the rank bound: a GGN's
        # K n; at P its interval, [5, 5], missed its own rank, 6.16), with the larger epsilon of
        # the products and the basis (a float64 operator's null space sat at 4e-7 of the top in
        # a float32 basis, above a float64 default, and counted whole).
        rtol = default_rtol(bound, rounding)
    trace = float(nodes @ weights)
    # An interval holds its own estimate: a light free node above the cut (weight 0.17) is a
    # skewed draw, whose 97.5 % quantile fell below it (numerical rank 5.17 in [5, 5]).
    point = spectral_ranks(nodes, threshold, rtol, weights)
    bootstrapped = _intervals(quadratures, threshold, rtol, seed, eps, bound)
    intervals = _Intervals(*(
        (min(low, value), max(high, value)) for (low, high), value in (
            (bootstrapped.srank, point["srank"]), (bootstrapped.numerical, point["numerical"]),
            (bootstrapped.trace, trace))))
    mass = float(np.abs(nodes) @ weights)
    if mass == 0.0:
        # Every node 0 means every run's first product was exactly zero: H q = 0 for a random q
        # has q's components in every eigenvector, so every eigenvalue is 0 (the matrix is).
        intervals = _Intervals((0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    intervals = dataclasses.replace(
        intervals, srank=(min(whole_count(intervals.srank[0]), bound),
                          min(whole_count(intervals.srank[1]), bound)),
        numerical=_whole_interval(*intervals.numerical, bound))
    deflated = int(quadratures[0].fixed.sum())
    notes.append(
        f"Lanczos quadrature: {runs} run(s) of {run_steps} steps, "
        f"{spent + spotted} products; {deflated} converged eigenvalues deflated "
        f"({'each its count from the repeat check' if checked else 'weight 1'}); "
        f"{removals} Gram-Schmidt removals kept the basis semi-orthogonal"
    )
    low, high = outward(*intervals.trace)
    notes.append(f"trace {trace:.4g} in [{low}, {high}] (95 %); sum |lambda| {mass:.4g}")
    notes.append(f"numerical rank in [{intervals.numerical[0]:.0f}, "
                 f"{intervals.numerical[1]:.0f}] (95 %) at rtol = {rtol:.3g}")
    notes.extend(guesses)
    return LanczosSpectrum(
        eigenvalues=nodes[order], weights=weights[order], ritz_values=ritz,
        rank_interval=intervals.srank, trace=trace, trace_interval=intervals.trace,
        numerical_interval=intervals.numerical,
        num_products=spent + spotted, notes=notes,
    )


#: The share of ``sum |lambda|`` that converged eigenvalues counted past the operator's rank
#: bound may hold (the smallest of them) before the call is refused (:func:`_past_the_bound`).
EXCESS_SHARE = 1e-2


def _past_the_bound(quadrature: _Quadrature, bound: int) -> tuple[int, float] | None:
    """Where ``quadrature``'s converged (fixed) eigenvalues count more than the rank ``bound``:
    their count, and the share of the quadrature's ``sum |lambda|`` held by the smallest of
    them beyond the bound (what the runs' noise could have added); None where they do not. A
    float32 ``fisher_lanczos`` of a ReLU CNN over 256 x 256 positions counted 9 for 8, its
    spectrum the float64 copy's within 1e-3; one of a per-token head's bias 82 for 4."""
    fixed = quadrature.fixed
    counts = np.round(quadrature.weights[fixed]).astype(int)
    if counts.sum() <= bound:
        return None
    magnitudes = np.repeat(np.abs(quadrature.nodes[fixed]), counts)
    beyond = np.sort(magnitudes)[: int(counts.sum()) - bound].sum()
    mass = float(np.abs(quadrature.nodes) @ quadrature.weights)
    return int(counts.sum()), float(beyond / mass) if mass > 0 else 0.0


def _whole_interval(low: float, high: float, bound: int) -> tuple[float, float]:
    """A numerical rank's interval from fractional quadrature counts as the whole numbers that
    hold it, the low end rounded down and the high end up (:func:`hessrank.ranks.whole_count`
    first), at most the rank ``bound``: the rank counts whole eigenvalues, and the note and
    the result state this one interval. (The note rounded outward and held an exact 60 where
    the result's (54.91, 59.61) missed it, 11 times in 120 seeds; probe 244.)"""
    return (float(min(math.floor(whole_count(low)), bound)),
            float(min(math.ceil(whole_count(high)), bound)))


def _completed(quadratures: list[_Quadrature], dim: int, eps: float,
               sampled: list[tuple[float, float]], checked: bool
               ) -> tuple[list[_Quadrature], str | None]:
    """The runs' quadratures made consistent over their deflated eigenvalues, and a note where
    some look repeated.

    A deflated node is an eigenvalue whatever the probe; a run whose probe was nearly orthogonal
    to it missed it and put its little weight elsewhere, and averaging the runs would count it a
    fraction of once (0.875 for one miss in 8 runs) with no spread left to show it: each run
    gets the eigenvalues other runs deflated as nodes of their count (1, or what the first run's
    repeat check found), its free weights scaled down to make room. Over several runs an
    eigenvalue's probe weights show its multiplicity: their mean over ``R`` runs is its count on
    average; one above :func:`repeat_limit` is repeated more (a symmetry of the model), and
    every run weighs it by its probe instead, as it does the eigenvalues in ``sampled`` (those
    whose counts the repeat check could not complete). With ``checked``, the first run's counts
    are the repeat check's, exact: every run takes them, whatever its probe weights (a run that
    left the eigenvalue free as too heavy weighed it by its probe, only when heavy: a checked
    6-fold eigenvalue averaged 6.68).

    Two deflated nodes are one eigenvalue when :func:`_near` says so, except the checked run's,
    each an eigenvalue of its own count, which each other run's nodes take one to one
    (:func:`_one_to_one`).
    """
    slack = rounding_slack(eps, max(float(np.abs(q.nodes).max(initial=0.0))
                                     for q in quadratures))
    found: list[tuple[float, float, float]] = []  # (value, residual, count) per eigenvalue
    exact = 0  # how many of them have the repeat check's counts
    for q in quadratures:
        for value, radius, count in zip(q.nodes[q.fixed], q.residuals[q.fixed],
                                        q.weights[q.fixed]):
            known = np.array(found).reshape(-1, 3)
            match = np.flatnonzero(_near(known[:, 0], known[:, 1], value, radius, slack))
            # (zero is the null space, which each run's free nodes count: a rounding copy of
            # zero deflated in one run counted the null space once in every run)
            if _null(value, radius, slack):
                continue
            if not match.size or checked and q is quadratures[0]:
                # (each deflated node of the checked run is an eigenvalue of its own count, even
                # within the rounding slack of another: a rounding restart's copy beside the
                # repeat check's count counts too, 5 counted for 6 else; and close distinct
                # eigenvalues each keep theirs, which other runs' nodes take one to one below)
                found.append((float(value), float(radius), float(count)))
        if checked and q is quadratures[0]:
            exact = len(found)
    runs = len(quadratures)
    if runs < 2 and not sampled:
        return quadratures, None
    shares = [float(np.mean([q.probe[_near(q.nodes, q.residuals, value, radius, slack)].sum()
                             for q in quadratures])) for value, radius, _ in found]
    repeated = [runs > 1 and index >= exact
                and share > repeat_limit(runs, len(found), round(count))
                for index, (share, (_, _, count)) in enumerate(zip(shares, found))]
    known_sampled = np.array(sampled).reshape(-1, 2)
    is_sampled = [bool(_near(known_sampled[:, 0], known_sampled[:, 1], value, radius,
                             slack).any()) for value, radius, _ in found]
    # A converged value one run left free as too heavy for a simple eigenvalue is sampled in
    # every run: deflated once elsewhere, it was counted once there (a 3-fold eigenvalue free
    # in the first of six runs at weight 12.2 and deflated in the other five counted 2.86 on
    # average, the first run's overshoot hiding the others' undercount).
    left_free = [index >= exact and any(
        (~q.fixed & _near(q.nodes, q.residuals, value, radius, slack)
         & (q.residuals <= CONVERGED_RESIDUAL * float(np.abs(q.nodes).max()))).any()
        for q in quadratures) for index, (value, radius, _) in enumerate(found)]
    completed = []
    for q in quadratures:
        fixed = q.fixed.copy()
        counts = np.ones(len(q.nodes))
        missing = []
        taker = _one_to_one(q, found[:exact], slack)
        for index, ((value, radius, count), free) in enumerate(
                zip(found, np.logical_or.reduce([repeated, is_sampled, left_free]))):
            here = _near(q.nodes, q.residuals, value, radius, slack)
            if free:
                fixed &= ~here
            elif index < exact and taker[index] >= 0:
                # The check's count is all its copies': the run's node nearest to it takes it.
                # Its other nodes within the rounding slack keep their own counts: the slack
                # (100 eps of the largest) can exceed the spacing of distinct small eigenvalues,
                # each found once by the checked run or sampled here (a GGN of rank 36 whose
                # smallest eigenvalues sit 5e-6 of the largest apart lost 3 of them in a later
                # run, each zeroed beside a neighbour: numerical rank [33, 34.5] for 36; probe
                # 198).
                fixed[taker[index]] = True
                counts[taker[index]] = count
            elif index < exact:
                # Its nodes here are its neighbours' (the checked run's nearer eigenvalues): it
                # is missing.
                missing.append((value, radius, count))
            elif (fixed & here).any():
                continue  # each deflated node one eigenvalue (close ones are distinct pairs)
            elif here.any():
                # A node the run left free (too heavy) counts it by its probe. (A missing node
                # beside it counted it twice: a checked 8-fold eigenvalue weighed 10.3.)
                continue
            else:
                missing.append((value, radius, count))
        nodes = np.concatenate([q.nodes, [v for v, _, _ in missing]])
        probe = np.concatenate([q.probe, np.zeros(len(missing))])
        fixed = np.concatenate([fixed, np.ones(len(missing), dtype=bool)])
        counts = np.concatenate([counts, [c for _, _, c in missing]])
        weights = _weighed(probe, fixed, counts, dim)
        order = np.argsort(nodes, kind="stable")
        completed.append(_Quadrature(
            nodes[order], weights[order], fixed[order],
            np.concatenate([q.residuals, [r for _, r, _ in missing]])[order], probe[order],
            q.lacking, q.floor, q.resolution))
    note = None if not any(repeated) else (
        "repeated eigenvalues over the runs, weighed by their probes instead of once: "
        + ", ".join(f"{value:.4g} (mean probe weight {share:.1f} over {runs} runs)"
                    for (value, _, _), share, is_repeated in zip(found, shares, repeated)
                    if is_repeated))
    return completed, note


def _one_to_one(quadrature: _Quadrature, found: list[tuple[float, float, float]], slack: float
                ) -> np.ndarray:
    """For each of ``found`` (``(value, residual, count)``, the checked run's eigenvalues), the
    index of the node of ``quadrature`` that is that eigenvalue (-1: none), each node one
    eigenvalue's at most, nearest first. A node is it where :func:`_near` says so, with the
    rounding ``slack`` only for a node converged away from zero (deflated, or left free as too
    heavy): an unconverged node, or the null space's, stands for the eigenvalues within its
    residual, and a neighbour the slack reaches is not one of them (a later run's null-space node
    at 2.9e-6 of the largest took a checked 1.4e-5, below the numerical rank's cut; an
    unconverged 3.1e-5 took a checked 2.4e-5, its own eigenvalue then lost; probe 198)."""
    taker = np.full(len(found), -1)
    nodes, residuals = quadrature.nodes, quadrature.residuals
    scale = max(float(np.abs(nodes).max(initial=0.0)), LEAST_SCALE)
    converged = quadrature.fixed | (_converged(nodes, residuals, scale)
                                    & (np.abs(nodes) > CONVERGED_RESIDUAL * scale))
    slacks = np.where(converged, slack, 0.0)
    candidates = sorted(
        (abs(float(nodes[node]) - value), index, int(node))
        for index, (value, radius, _) in enumerate(found)
        for node in np.flatnonzero(_near(nodes, residuals, value, radius, slacks)))
    used: set[int] = set()
    for _, index, node in candidates:
        if taker[index] < 0 and node not in used:
            taker[index] = node
            used.add(node)
    return taker


def _merge_close(nodes: np.ndarray, weights: np.ndarray, eps: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Nodes within ``10 eps`` of the largest ``|node|`` of each other merged into one
    (weighted mean value, summed weight), so that an eigenvalue found by several runs is one node
    of the combined quadrature; a merged weight within ``1e-9`` of an integer is that integer
    (a count of eigenvalues, not a rounding residue)."""
    order = np.argsort(nodes, kind="stable")
    nodes, weights = nodes[order], weights[order]
    tolerance = 10 * eps * max(float(np.abs(nodes).max()), LEAST_SCALE)
    group = np.concatenate([[0], np.cumsum(np.diff(nodes) > tolerance)])
    merged_weights = np.bincount(group, weights=weights)
    merged_nodes = np.bincount(group, weights=nodes * weights) / np.maximum(merged_weights, 1e-300)
    integers = np.round(merged_weights)
    snap = np.abs(merged_weights - integers) <= 1e-9 * np.maximum(merged_weights, 1.0)
    return merged_nodes, np.where(snap, integers, merged_weights)


def _allocations(quadrature: _Quadrature, bound: int) -> list[np.ndarray]:
    """The quadrature's weights with its ``lacking`` guessed eigenvalues taken from the free
    nodes (in proportion to their weights) and given to each node in turn, within the rank
    ``bound`` (:func:`_within_bound`): one ``[m]`` weight vector per node, none where nothing
    was guessed."""
    if not quadrature.lacking:
        return []
    free = np.where(quadrature.fixed, 0.0, quadrature.weights)
    # (clipped at zero: free nodes that hold exactly the guessed eigenvalues, a repeat check's
    # room of 20 over free weights summing to 20, came out at -1e-16; probe 92)
    base = np.maximum(quadrature.weights - quadrature.lacking * free / free.sum(), 0.0)
    return [_within_bound([quadrature], [base + quadrature.lacking * np.eye(len(base))[j]],
                          bound)[0] for j in range(len(base))]


@dataclass
class _Intervals:
    """95 % intervals of the srank, the numerical rank and the trace."""

    srank: tuple[float, float]
    numerical: tuple[float, float]
    trace: tuple[float, float]


def _intervals(quadratures: list[_Quadrature], threshold: float, rtol: float, seed: int,
               eps: float, bound: int) -> _Intervals:
    """Intervals from sampling (bootstrap) and resolution (Chebyshev-Markov-Stieltjes).

    Each run's free weights are redrawn (:func:`_bootstrap_weights`); each draw's counts are
    widened to what its quadrature proves (:func:`_count_bounds`) at the srank's cut and at the
    numerical rank's ``rtol * max |lambda|``, and by the eigenvalues an invariant run may have
    missed (:func:`_hidden`, at most the rank ``bound`` allows; above the numerical rank's cut,
    :func:`_hidden_above`); runs are averaged draw by draw.
    """
    rng, trace_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    bounds = np.zeros((4, BOOTSTRAP_DRAWS))  # srank low, high; numerical low, high
    traces = np.zeros((2, BOOTSTRAP_DRAWS))  # low, high
    for quadrature in quadratures:
        draws = _bootstrap_weights(quadrature, BOOTSTRAP_DRAWS, rng)
        # The trace's draws let every free node stand for one eigenvalue at least: a probe
        # nearly orthogonal to an eigenvector weighs it far below one, and redrawn from that
        # weight its mass hardly moves (95 % trace intervals held the exact trace in 82-92 % of
        # 120 seeds on operators of P <= 75 with P / 3 products; 95-100 % this way). The floor
        # only raises weights, so it moves the draws' centre too, by a bias that averaging runs
        # does not shrink: each draw's trace is also taken with the plain weights, and the
        # interval holds both (an operator of rank 8 sampled in 10 of 20 runs had its trace
        # 4.500 in [4.500, 6.66] for 4.451). The counts' draws keep the plain weights: floored,
        # they moved those intervals up, and one missed.
        trace_draws = [_bootstrap_weights(quadrature, BOOTSTRAP_DRAWS, trace_rng, least=floor)
                       for floor in (1.0, 0.0)]
        magnitude = np.abs(quadrature.nodes)
        tolerance = rtol * float(magnitude.max())
        above = magnitude > tolerance
        # Each node's value is known to within its Ritz residual where it is deflated (an
        # eigenvalue lies that close) and to the basis's rounding, 4 eps of the largest: the
        # masses and the trace move by as much (a fully deflated run's interval had no width,
        # and missed an srank whose mass share cleared the threshold by 2.5e-5).
        if quadrature.determined:
            # No sampling is left to cover the products' own rounding, which the Ritz residuals
            # do not see (they measure the computed operator): each eigenvalue is allowed what
            # two runs' values of one eigenvalue differ by from rounding alone (float32 factor
            # products put them up to 45 eps of the largest off the float64 ones, and 4 eps
            # intervals missed the trace in up to 8 of 20 seeds; probe 83). The free node is the
            # null space the rank bound proves: exactly zero.
            error = np.where(quadrature.fixed, rounding_slack(eps, float(magnitude.max()))
                             + quadrature.residuals, 0.0)
        else:
            error = 4 * eps * float(magnitude.max()) + np.where(quadrature.fixed,
                                                                quadrature.residuals, 0.0)
        # What an invariant run lacks under its floor moves the trace and the mass by up to
        # the floor each, and some of it may lie above a numerical cut below that floor: as
        # much as a rank bound leaves room for (a GGN's, an EF's), else as many as the run's
        # last beta lets hide there (:func:`_hidden_above`; all of them, where no bound caps
        # them, had put a trained MLP's Hessian, whose cut is 20 times its last beta, at
        # [384, 1907] for 384; probe 69).
        small, hidden, hidden_mass = _hidden(quadrature, bound)
        trace_hidden = hidden_mass / math.sqrt(HIDDEN_SHARE)  # (HIDDEN_SHARE: the trace's)
        capped = bound < round(float(quadrature.weights.sum()))  # (the weights sum to dim)
        unseen = _hidden_above(quadrature, hidden, tolerance, capped)
        # Where the run guessed which nodes repeat, every allocation of the guessed counts is
        # as likely: the intervals hold them all.
        least, most = np.full(3, np.inf), np.full(3, -np.inf)
        allocations = _allocations(quadrature, bound)
        if allocations:
            rows = np.array(allocations)
            allocated = np.column_stack([
                srank_per_row(quadrature.nodes, np.full(len(rows), threshold), rows),
                rows[:, above].sum(axis=1), rows @ quadrature.nodes])
            least, most = allocated.min(axis=0), allocated.max(axis=0)
        # Every draw at once (a loop over them took 4 s of a call on a 120 x 120 operator).
        shifts = (draws @ error + hidden_mass) / np.maximum(draws @ magnitude, 1e-300)
        at_threshold = np.full(len(draws), threshold)
        estimates = np.minimum(srank_per_row(quadrature.nodes, at_threshold, draws), least[0])
        lower, upper = _count_bounds(quadrature, draws,
                                     _srank_cuts(quadrature.nodes, draws, threshold))
        counts = draws[:, above].sum(axis=1)
        # Under a rank bound, the counts with the trace's floored weights too, held beside the
        # plain ones: a run near a factor operator's bound left a few free nodes drawn far
        # below one eigenvalue each, and its intervals missed low (srank [87, 91] for 93,
        # numerical [134, 140] for 144; a fisher_lanczos missed in 5 of 40 seeds; probe 100).
        # Without a bound its free nodes stand for many eigenvalues each, and the floor only
        # widened intervals that held.
        floored_sranks, floored_counts = estimates, counts
        if capped:
            floored_sranks = srank_per_row(quadrature.nodes, at_threshold, trace_draws[0])
            floored_counts = trace_draws[0][:, above].sum(axis=1)
        bounds[0] += np.minimum.reduce([
            estimates, lower, floored_sranks,
            srank_per_row(quadrature.nodes, np.maximum(threshold - 2 * shifts, 1e-12), draws)])
        bounds[1] += np.maximum.reduce([
            estimates, upper, np.full(len(draws), most[0]), floored_sranks,
            srank_per_row(quadrature.nodes, np.minimum(threshold + 2 * shifts, 1.0), draws)])
        lower, upper = _count_bounds(quadrature, draws, np.nextafter(tolerance, np.inf),
                                     rounding_slack(eps, float(magnitude.max())))
        if unseen:
            # (the small nodes above the cut, Ritz values of their own, count beside the
            # lacking eigenvalues that may join them, up to all that the small nodes hold)
            upper = np.maximum(upper, draws[:, above & ~small].sum(axis=1) + np.minimum(
                draws[:, above & small].sum(axis=1) + unseen, hidden))
        bounds[2] += np.minimum.reduce([counts, lower, np.full(len(draws), least[1]),
                                        floored_counts])
        bounds[3] += np.maximum.reduce([counts, upper, np.full(len(draws), most[1]),
                                        floored_counts])
        ends = [(draw @ quadrature.nodes, draw @ error) for draw in trace_draws]
        traces[0] += np.minimum.reduce([np.minimum(trace, least[2]) - rounded
                                        for trace, rounded in ends]) - trace_hidden
        traces[1] += np.maximum.reduce([np.maximum(trace, most[2]) + rounded
                                        for trace, rounded in ends]) + trace_hidden
    bounds /= len(quadratures)
    traces /= len(quadratures)

    def interval(low: np.ndarray, high: np.ndarray) -> tuple[float, float]:
        return float(np.quantile(low, 0.025)), float(np.quantile(high, 0.975))

    return _Intervals(interval(*bounds[:2]), interval(*bounds[2:]), interval(*traces))
