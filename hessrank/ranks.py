"""Rank definitions on a spectrum.

Every function takes the spectrum as eigenvalues (any sign: singular values of a symmetric matrix
are ``|lambda|``) and optional non-negative ``weights``: the multiplicity of each eigenvalue.
Unit weights give the definitions on a plain spectrum; fractional weights let the same functions
read a quadrature of a spectral density (stochastic Lanczos quadrature), where each node stands for
``weight`` eigenvalues.

Definitions, with singular values ``s_1 >= s_2 >= ...``:

- ``srank`` (Kumar et al.): smallest ``k`` with ``(s_1 + ... + s_k) / sum(s) >= threshold``.
- ``numerical``: number of ``s_i > rtol * s_1``.
- ``entropy`` (Roy & Vetterli): ``exp(-sum p_i log p_i)`` with ``p = s / sum(s)``.
- ``stable``: ``sum(s_i^2) / s_1^2``.
- ``participation``: ``sum(s)^2 / sum(s^2)``.

All of them are invariant to scaling the matrix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hessrank.guard import underflow_ignored
from hessrank.problem import check_number

RANK_NAMES = ("srank", "numerical", "entropy", "stable", "participation")


def _as_array(values: Any) -> Any:
    """A torch tensor's values as a NumPy array (in float64 or complex128, on the CPU, without
    its graph: one that requires grad, a bfloat16 one or a GPU one had been refused by NumPy's
    or torch's bare errors; probe 234); anything else as it is."""
    if not isinstance(values, torch.Tensor):
        return values
    wide = torch.complex128 if values.is_complex() else torch.float64
    return values.detach().to("cpu", wide).numpy()


def _checked(eigenvalues: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``|eigenvalues|`` ``[m]`` in float64, and ``weights`` as ``[B, m]`` rows (one row of ones
    when None; a one-dimensional ``[m]`` is one row).

    Raises:
        ValueError: a spectrum that is not one-dimensional or not finite, or weights of another
            length, negative or not finite.
    """
    eigenvalues, weights = _as_array(eigenvalues), _as_array(weights)
    if np.iscomplexobj(eigenvalues):  # (NumPy's float cast drops the imaginary parts)
        raise ValueError("eigenvalues are complex: a symmetric matrix's are real; pass "
                         "np.linalg.eigvalsh(matrix), or the magnitudes np.abs(values)")
    values = np.abs(np.asarray(eigenvalues, dtype=np.float64))
    if values.ndim > 1:
        raise ValueError(f"eigenvalues must be one-dimensional, got shape {values.shape}: pass "
                         "a matrix's eigenvalues (np.linalg.eigvalsh(matrix)), not the matrix")
    values = values.ravel()
    if not np.isfinite(values).all():
        raise ValueError(f"the spectrum holds {int((~np.isfinite(values)).sum())} NaN or "
                         "infinite value(s): its ranks are undefined; check the matrix it came "
                         "from (an overflow, a NaN in the model or the loss)")
    given = np.ones(values.size) if weights is None else np.asarray(weights, dtype=np.float64)
    rows = np.atleast_2d(given)
    if rows.ndim > 2 or rows.shape[1] != values.size:
        raise ValueError(f"weights has shape {given.shape}, eigenvalues {values.shape}")
    if not (np.isfinite(rows).all() and (rows >= 0).all()):
        raise ValueError("weights must be finite and non-negative: each is how many "
                         "eigenvalues its node stands for")
    return values, rows


def _singular_values(
    eigenvalues: np.ndarray, weights: np.ndarray | None, scaled: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """|eigenvalues| sorted decreasingly, divided by the largest where ``scaled`` (every rank
    here is scale-free, and a spectrum near the ends of float64's range neither overflows nor
    underflows), with their weights (ones when ``weights`` is None).

    Raises:
        ValueError: as :func:`_checked`.
    """
    values, rows = _checked(eigenvalues, None if weights is None else np.ravel(weights))
    weights = rows[0]
    # A node of weight zero stands for no eigenvalue: it is not the largest (nor any other).
    kept = weights > 0
    values, weights = values[kept], weights[kept]
    order = np.argsort(-values, kind="stable")
    largest = values[order[0]] if values.size else 0.0
    return (values[order] / largest if largest > 0 and scaled else values[order]), weights[order]


def whole_count(count: float) -> float:
    """A count summed from quadrature weights without the rounding of the sum: within ``1e-9``
    of a whole number (relative), that number (a full-rank P = 51 counted as
    50.99999999999999 fell outside an interval ending there; probe 89)."""
    whole = round(count)
    return float(whole) if abs(count - whole) <= 1e-9 * max(abs(count), 1.0) else float(count)


@underflow_ignored
def srank(
    eigenvalues: np.ndarray, threshold: float = 0.99, weights: np.ndarray | None = None
) -> float:
    """srank: how many of the largest ``|eigenvalues|`` hold ``threshold`` of the total mass.

    Always a whole number, as the definition's smallest ``k`` is. With quadrature weights the
    eigenvalues a node stands for are taken as equal: the count is the weight of the nodes before
    the boundary node plus the share of its weight needed to reach the threshold, rounded up
    (a deflated node of weight one, an eigenvalue found, counts whole, as it does in the exact
    spectrum). The cumulative sum reaches ``threshold`` of the total when it is within 4 ulps of
    it (float64 rounding of the sum): at ``threshold=1`` eigenvalues below about ``1e-15`` of
    the total do not count (``[1] + [1e-16] * 10`` has srank 1).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return float(srank_per_row(eigenvalues, np.array([threshold]),
                               None if weights is None else np.ravel(weights))[0])


@underflow_ignored
def srank_per_row(
    eigenvalues: np.ndarray, thresholds: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """:func:`srank` of one spectrum under each row of ``weights`` ``[B, m]`` (a quadrature's
    redrawn weights), each at its own threshold (``thresholds`` ``[B]``, each in (0, 1]): ``[B]``
    counts, one pass over all rows (a Lanczos run's 200 bootstrap draws had called
    :func:`srank` four times each).

    Raises:
        ValueError: as :func:`_checked`; a threshold outside (0, 1] or a ``thresholds`` of
            another length than the rows.
    """
    values, rows = _checked(eigenvalues, weights)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (len(rows),) or not ((thresholds > 0) & (thresholds <= 1)).all():
        raise ValueError(f"thresholds must be {len(rows)} values in (0, 1], one per row of "
                         f"weights, got {thresholds}")
    order = np.argsort(-values, kind="stable")
    values, rows = values[order], rows[:, order]
    # Nodes of weight zero stand for no eigenvalue: they stay in place, adding nothing to the
    # sums, and are never the largest, whose value divides the rest (scale-free).
    kept = rows > 0
    count, size = rows.shape
    if size == 0:  # an empty spectrum
        return np.zeros(count)
    largest = values[kept.argmax(axis=1)]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scaled = np.where(kept & (largest[:, None] > 0), values / largest[:, None], values)
    mass = np.where(kept, scaled, 0.0) * rows
    cumulative = np.cumsum(mass, axis=1)
    total = cumulative[:, -1]
    result = np.zeros(count)
    live = np.flatnonzero(total > 0.0)
    if live.size == 0:
        return result
    cumulative, mass, rows, kept = cumulative[live], mass[live], rows[live], kept[live]
    target = thresholds[live] * total[live]
    # Tolerate rounding in the cumulative sum: a spectrum that reaches the target up to a few
    # ulps of the total reaches it. (The first node whose cumulative sum reaches it adds mass,
    # so it is one that stands for eigenvalues; the last such node at most.)
    index = (cumulative < (target * (1.0 - 4 * np.finfo(float).eps))[:, None]).sum(axis=1)
    index = np.minimum(index, size - 1 - kept[:, ::-1].argmax(axis=1))
    at = np.arange(len(live))
    before = np.where(index > 0, cumulative[at, index - 1], 0.0)
    weight_before = np.where(index > 0, np.cumsum(rows, axis=1)[at, index - 1], 0.0)
    boundary = mass[at, index]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(boundary > 0, np.clip((target - before) / boundary, 0.0, 1.0), 1.0)
    counts = weight_before + fraction * rows[at, index]
    # Rounded up, past the rounding of the weights' sum (a count of 12 summed as 12.000000001);
    # unit weights count the nodes up to the boundary's.
    unit = np.where(kept, rows == 1.0, True).all(axis=1)
    result[live] = np.where(unit, weight_before + 1,
                            np.ceil(counts - 1e-9 * np.maximum(counts, 1.0)))
    return result + 0.0  # (a count rounded up from below 1e-9 is 0, not -0)


@underflow_ignored
def numerical_rank(
    eigenvalues: np.ndarray, rtol: float, weights: np.ndarray | None = None
) -> float:
    """Number (total weight) of ``|eigenvalues|`` above ``rtol`` times the largest.

    Raises:
        ValueError: ``rtol`` outside ``[0, 1)`` (from 1 on nothing is above it: the rank would
            be 0 whatever the spectrum) or not finite (see also :func:`_singular_values`).
    """
    if not (math.isfinite(rtol) and 0 <= rtol < 1):
        raise ValueError(f"rtol must lie in [0, 1), got {rtol}: it is relative to the largest "
                         "|eigenvalue|, and from 1 on no eigenvalue is above it")
    if rtol == 0.0:  # every nonzero value, unscaled: a ratio to the largest underflows to 0
        # more than 1e308 below it (1e-300 beside 1e300 had not counted; probe 163)
        s, w = _singular_values(eigenvalues, weights, scaled=False)
        return whole_count(float(w[s > 0].sum()))
    s, w = _singular_values(eigenvalues, weights)
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    return whole_count(float(w[s > rtol * s[0]].sum()))


@underflow_ignored
def entropy_rank(eigenvalues: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Roy & Vetterli effective rank: exp of the Shannon entropy of ``s / sum(s)``."""
    s, w = _singular_values(eigenvalues, weights)
    total = (s * w).sum()
    if total <= 0.0:
        return 0.0
    p = s / total
    positive = p > 0
    return float(np.exp(-(w[positive] * p[positive] * np.log(p[positive])).sum()))


@underflow_ignored
def stable_rank(eigenvalues: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Stable rank ``||A||_F^2 / ||A||_2^2 = sum(s^2) / s_1^2``."""
    s, w = _singular_values(eigenvalues, weights)
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    return float((w * s**2).sum() / s[0] ** 2)


@underflow_ignored
def participation_ratio(eigenvalues: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Participation ratio ``sum(s)^2 / sum(s^2)``."""
    s, w = _singular_values(eigenvalues, weights)
    squares = (w * s**2).sum()
    if squares <= 0.0:
        return 0.0
    return float((w * s).sum() ** 2 / squares)


#: The largest default numerical-rank tolerance: the ``numpy.linalg.matrix_rank`` rule reaches 1
#: (every eigenvalue below it) at a size of ``1 / eps``, 8.4 million in float32.
MAX_DEFAULT_RTOL = 0.1


def default_rtol(size: int, dtype_eps: float) -> float:
    """The ``numpy.linalg.matrix_rank`` rule, matrix size times the machine epsilon of the data
    (``dtype_eps``: a number, ``torch.finfo(dtype).eps``), at most ``MAX_DEFAULT_RTOL`` = 0.1
    (reached by a float32 operator with ``P >= 840,000`` parameters)."""
    return float(min(max(size, 1) * dtype_eps, MAX_DEFAULT_RTOL))


@underflow_ignored
def spectral_ranks(
    eigenvalues: np.ndarray,
    threshold: float = 0.99,
    rtol: float | None = None,
    weights: np.ndarray | None = None,
    max_rank: int | None = None,
) -> dict[str, float]:
    """Every rank definition of this module on one spectrum.

    Args:
        eigenvalues: the spectrum (any sign; singular values of a symmetric matrix are
            ``|lambda|``), or the nodes of a quadrature with ``weights``.
        threshold: srank threshold in (0, 1].
        rtol: numerical-rank tolerance relative to the largest ``|eigenvalue|``; default
            ``len(eigenvalues) * eps(float64)``; pass the model dtype's rule
            (:func:`default_rtol`) when the spectrum comes from float32 arithmetic.
        weights: multiplicity of each eigenvalue (a quadrature of a spectral density), None
            for a plain spectrum.
        max_rank: the matrix's largest possible rank (its size, or a factorisation's width),
            for a quadrature: its ranks are estimates, and where one falls outside the bounds
            every rank of a nonzero matrix obeys, ``[1, max_rank]``, it is the bound (a
            quadrature whose top node weighs less than one gives a stable rank below 1).

    Returns:
        ``{"srank", "numerical", "entropy", "stable", "participation"}`` -> value.

    Raises:
        ValueError: ``threshold`` outside (0, 1], ``rtol`` outside [0, 1), a spectrum
            that is not one-dimensional or holds NaN or Inf, or ``weights`` of another shape,
            negative or not finite.
    """
    check_rank_options(threshold, rtol)
    eigenvalues, weights = _as_array(eigenvalues), _as_array(weights)
    if rtol is None:
        rtol = default_rtol(len(np.ravel(eigenvalues)), float(np.finfo(np.float64).eps))
    ranks = {
        "srank": srank(eigenvalues, threshold, weights),
        "numerical": numerical_rank(eigenvalues, rtol, weights),
        "entropy": entropy_rank(eigenvalues, weights),
        "stable": stable_rank(eigenvalues, weights),
        "participation": participation_ratio(eigenvalues, weights),
    }
    if weights is not None and max_rank is not None and np.abs(
            np.ravel(eigenvalues)[np.ravel(weights) > 0]).max(initial=0) > 0:
        ranks = {name: within_rank_bounds(value, max_rank) for name, value in ranks.items()}
    return ranks


def check_rank_options(threshold: float, rtol: float | None) -> None:
    """Raise a ValueError naming the argument at fault unless ``threshold`` is a number in
    ``(0, 1]`` and ``rtol`` None or a number in ``[0, 1)`` (Python or NumPy numbers)."""
    check_number("threshold", threshold, high=1.0)
    check_number("rtol", rtol, allow_none=True, low=-math.inf, inclusive_low=True)
    if rtol is not None and not 0.0 <= float(rtol) < 1.0:
        raise ValueError(f"rtol must lie in [0, 1), got {rtol!r}" + (
            ": no eigenvalue exceeds rtol times the largest at rtol >= 1, so every numerical "
            "rank would be 0" if float(rtol) >= 1.0 else ""))


def within_rank_bounds(value: float, max_rank: int) -> float:
    """``value`` moved into ``[1, max_rank]``, the range of every rank of a nonzero matrix."""
    return float(min(max(value, 1.0), max(max_rank, 1)))
