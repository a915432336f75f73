"""Lanczos with full reorthogonalisation, and stochastic Lanczos quadrature (SLQ).

``k`` Lanczos steps from a unit vector ``v`` give a tridiagonal ``T``; its eigenvalues (Ritz values)
approximate the extremes of the spectrum, and with ``T = U diag(theta) U^T`` the pairs
``(theta_j, U_0j^2)`` are the Gauss quadrature of the spectral measure ``sum_i (q_i . v)^2
delta_{lambda_i}``. Averaged over random probes and multiplied by ``P`` this estimates the spectral
density, so counts like "eigenvalues carrying 99% of the mass" can be estimated beyond the ``k``
values Lanczos itself resolves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Quadrature:
    """Gauss quadrature of one probe: ``nodes`` (Ritz values) and ``weights`` (sum to 1)."""

    nodes: np.ndarray
    weights: np.ndarray


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor], start: Tensor, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Run up to ``steps`` Lanczos steps from ``start`` (float64, ``[P]``).

    Full reorthogonalisation (twice, classical Gram-Schmidt) against all previous vectors keeps
    the Ritz values free of spurious copies. Stops early at an invariant subspace.
    Returns the diagonal ``alpha`` and off-diagonal ``beta`` of ``T``.
    """
    dim = start.numel()
    steps = min(steps, dim)
    basis = torch.zeros(steps, dim, dtype=torch.float64, device=start.device)
    alphas: list[float] = []
    betas: list[float] = []
    vector = start / start.norm()
    scale = 0.0
    for j in range(steps):
        basis[j] = vector
        w = matvec(vector).to(torch.float64)
        alpha = float(w @ vector)
        alphas.append(alpha)
        w -= alpha * vector
        if j > 0:
            w -= betas[-1] * basis[j - 1]
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        scale = max(scale, abs(alpha), beta)
        if j == steps - 1 or beta <= 1e-10 * max(scale, 1e-300):
            break
        betas.append(beta)
        vector = w / beta
    return np.array(alphas), np.array(betas[: len(alphas) - 1])


def tridiagonal_quadrature(alpha: np.ndarray, beta: np.ndarray) -> Quadrature:
    """Ritz values and Gauss weights of the tridiagonal matrix ``(alpha, beta)``."""
    from scipy.linalg import eigh_tridiagonal

    nodes, vectors = eigh_tridiagonal(alpha, beta)
    return Quadrature(nodes=nodes, weights=vectors[0] ** 2)


def rademacher(dim: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """A random ``+-1`` vector in float64 from a private generator (global RNG untouched)."""
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64)
    return (signs.to(torch.float64) * 2 - 1).to(device)
