"""Eigenvalues of dense symmetric matrices, in float64, ordered by decreasing magnitude."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor


def by_magnitude(eigenvalues: np.ndarray) -> np.ndarray:
    """Sort signed eigenvalues by decreasing ``|lambda|`` (ties: larger value first)."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    return eigenvalues[np.lexsort((-eigenvalues, -np.abs(eigenvalues)))]


#: Up to this size a CPU eigen-solve runs on one thread: LAPACK gains little from threads there,
#: and on a machine shared with other jobs OpenMP oversubscription made a 512 x 512 solve 4-50x
#: slower on 2 threads than on one (``benchmarks/README.md``).
SINGLE_THREAD_SIZE = 2048


@contextmanager
def _solver_threads(matrix: Tensor) -> Iterator[None]:
    """One thread for a small CPU eigen-solve; torch's thread count is restored on exit."""
    if matrix.device.type != "cpu" or matrix.shape[0] > SINGLE_THREAD_SIZE:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def symmetric_eigenvalues(matrix: Tensor) -> np.ndarray:
    """All eigenvalues of a symmetric matrix (float64 solve on the matrix's device)."""
    with _solver_threads(matrix):
        values = torch.linalg.eigvalsh(matrix.to(torch.float64))
    return by_magnitude(values.cpu().numpy())


def symmetric_eigenpairs(matrix: Tensor) -> tuple[np.ndarray, Tensor]:
    """Eigenvalues by decreasing magnitude and the matching eigenvectors as columns (float64)."""
    with _solver_threads(matrix):
        values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    values = values.cpu().numpy()
    order = np.lexsort((-values, -np.abs(values)))
    return values[order], vectors[:, torch.from_numpy(order).to(vectors.device)]
