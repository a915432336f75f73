"""Symmetric operators given by matrix-vector products: the one interface every solver takes."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class SymmetricOperator(Protocol):
    """A symmetric ``dim x dim`` matrix ``A`` known only through products.

    Attributes:
        dim: the size ``P`` of the matrix.
        dtype: the dtype the products are computed in.
        device: where the products are computed.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, vectors: Tensor) -> Tensor:
        """Each row of ``vectors`` (``[k, dim]``) times the matrix; returns ``[k, dim]``."""
        ...


class DenseOperator:
    """A symmetric matrix held in memory, as a :class:`SymmetricOperator` (references, tests).

    Args:
        matrix: ``[P, P]`` symmetric tensor.

    Raises:
        ValueError: if ``matrix`` is not square or not symmetric.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square [P, P], got shape {tuple(matrix.shape)}")
        scale = float(matrix.abs().max()) if matrix.numel() else 0.0
        tolerance = 100 * torch.finfo(matrix.dtype).eps * max(scale, 1e-300)
        if matrix.numel() and float((matrix - matrix.T).abs().max()) > tolerance:
            raise ValueError("matrix is not symmetric: pass (A + A.T) / 2")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_products = 0

    def matmat(self, vectors: Tensor) -> Tensor:
        """``vectors @ A`` for ``[k, P]`` rows (``A`` is symmetric); returns ``[k, P]``."""
        self.num_products += int(vectors.shape[0])
        return vectors.to(dtype=self.dtype, device=self.device) @ self.matrix


class LowRankOperator:
    """``U diag(values) U^T`` from orthonormal columns ``U``, as a :class:`SymmetricOperator`
    with a known spectrum at any ``P`` (references, tests, benchmarks): ``values`` and ``P - r``
    zeros.

    Args:
        basis: ``[P, r]`` orthonormal columns; products are computed in its dtype (float64
            keeps their rounding far below a float32 solver's).
        values: ``[r]`` eigenvalues.
        dtype: the dtype the products are returned in.
        states_rank: whether the operator states ``r`` as its ``rank_bound``.
    """

    def __init__(self, basis: Tensor, values: Tensor, dtype: torch.dtype = torch.float32,
                 states_rank: bool = True) -> None:
        if basis.dim() != 2 or values.shape != (basis.shape[1],):
            raise ValueError(f"basis must be [P, r] and values [r], got {tuple(basis.shape)} "
                             f"and {tuple(values.shape)}")
        self.basis = basis
        self.values = values.to(basis.dtype)
        self.dim = int(basis.shape[0])
        self.dtype = dtype
        self.device = basis.device
        if states_rank:
            self.rank_bound = int(basis.shape[1])

    def matmat(self, vectors: Tensor) -> Tensor:
        """``vectors U diag(values) U^T`` for ``[k, P]`` rows; returns ``[k, P]``."""
        vectors = vectors.to(self.basis.dtype)
        return (((vectors @ self.basis) * self.values) @ self.basis.T).to(self.dtype)
