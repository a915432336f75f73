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
    matmat: Callable[[Tensor], Tensor], starts: Tensor, steps: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``steps`` Lanczos steps from each row of ``starts`` (float64, ``[m, P]``) in lockstep.

    All ``m`` runs advance together, so each step is one batched product ``matmat`` (``[m, P]``
    -> ``[m, P]``). Full reorthogonalisation (twice, classical Gram-Schmidt) against each run's
    previous vectors keeps the Ritz values free of spurious copies. A run that reaches an
    invariant subspace stops there. Returns each run's diagonal ``alpha`` and off-diagonal
    ``beta`` of ``T``.
    """
    runs, dim = starts.shape
    steps = min(steps, dim)
    basis = torch.zeros(runs, steps, dim, dtype=torch.float64, device=starts.device)
    alphas = torch.zeros(runs, steps, dtype=torch.float64)
    betas = torch.zeros(runs, steps, dtype=torch.float64)
    lengths = np.full(runs, steps)
    active = torch.ones(runs, dtype=torch.bool)
    vectors = starts / starts.norm(dim=1, keepdim=True)
    scale = torch.zeros(runs, dtype=torch.float64)
    for j in range(steps):
        basis[:, j] = vectors
        w = matmat(vectors).to(torch.float64)
        alpha = (w * vectors).sum(dim=1)
        w -= alpha[:, None] * vectors
        if j > 0:
            w -= betas[:, j - 1, None].to(w.device) * basis[:, j - 1]
        for _ in range(2):
            coefficients = torch.einsum("mkp,mp->mk", basis[:, : j + 1], w)
            w -= torch.einsum("mk,mkp->mp", coefficients, basis[:, : j + 1])
        beta = w.norm(dim=1).cpu()
        alphas[:, j] = alpha.cpu()
        scale = torch.maximum(scale, torch.maximum(alpha.abs().cpu(), beta))
        finished = active & (beta <= 1e-10 * scale.clamp_min(1e-300))
        lengths[finished.numpy()] = j + 1
        active &= ~finished
        if j == steps - 1 or not active.any():
            break
        betas[:, j] = beta
        vectors = torch.where(active[:, None].to(w.device), w / beta.clamp_min(1e-300)[:, None]
                              .to(w.device), torch.zeros_like(w))
    return [(alphas[r, : lengths[r]].numpy(), betas[r, : lengths[r] - 1].numpy())
            for r in range(runs)]


def tridiagonal_quadrature(alpha: np.ndarray, beta: np.ndarray) -> Quadrature:
    """Ritz values and Gauss weights of the tridiagonal matrix ``(alpha, beta)``."""
    from scipy.linalg import eigh_tridiagonal

    nodes, vectors = eigh_tridiagonal(alpha, beta)
    return Quadrature(nodes=nodes, weights=vectors[0] ** 2)


def rademacher(dim: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """A random ``+-1`` vector in float64 from a private generator (global RNG untouched)."""
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64)
    return (signs.to(torch.float64) * 2 - 1).to(device)
