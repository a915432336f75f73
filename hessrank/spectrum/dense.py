"""Eigenvalues of dense symmetric matrices, in float64, ordered by decreasing magnitude."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def by_magnitude(eigenvalues: np.ndarray) -> np.ndarray:
    """Sort signed eigenvalues by decreasing ``|lambda|`` (ties: larger value first)."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    return eigenvalues[np.lexsort((-eigenvalues, -np.abs(eigenvalues)))]


def symmetric_eigenvalues(matrix: Tensor) -> np.ndarray:
    """All eigenvalues of a symmetric matrix (float64 solve on the matrix's device)."""
    values = torch.linalg.eigvalsh(matrix.to(torch.float64))
    return by_magnitude(values.cpu().numpy())


def symmetric_eigenpairs(matrix: Tensor) -> tuple[np.ndarray, Tensor]:
    """Eigenvalues by decreasing magnitude and the matching eigenvectors as columns (float64)."""
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    values = values.cpu().numpy()
    order = np.lexsort((-values, -np.abs(values)))
    return values[order], vectors[:, torch.from_numpy(order).to(vectors.device)]
