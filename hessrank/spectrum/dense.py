"""Eigenvalues of dense symmetric matrices, in float64, ordered by decreasing magnitude.

Every eigenvalue here comes from torch's float64 solve (LAPACK ``dsyevd``, backward stable).
Measured and not adopted (``benchmarks/eigensolve.py``, ``benchmarks/README.md``, "The dense
eigen-solve"):

- **A float32 solve** of the ``ggn`` Gram (4608 x 4608, the benchmark MLP's float32 Gram). Its
  eigenvalues alone took about 0.45x the float64 solve, but nothing proves them to the accuracy
  issue 9 asks (every eigenvalue within 1e-6 of the largest): ``eigvalsh`` was off by 6.2e-7 and
  ``eigh`` by 1.2e-6 of the largest. A proof needs eigenvectors ``V``: with
  ``R = K V - V diag(lambda)``, ``E = V^T V - I`` and ``||E|| < 1``, the polar factor ``Q`` of
  ``V`` makes ``Q^T K Q - diag(lambda)`` symmetric with norm at most
  ``(||R|| + 2 (1 - sqrt(1 - ||E||)) max|lambda|) / sqrt(1 - ||E||)``, and Weyl's inequality
  bounds every eigenvalue's error by that. Float32 vectors leave ``||E||_2 = 8e-6`` (``3e-6`` at
  512), so the bound is 1.05e-5 of the largest (3.9e-6 at 512) and proves nothing at 1e-6; and
  ``eigh`` with vectors took 2.5x the float64 ``eigvalsh`` before the check's two float64 ``m^3``
  products.
- **scipy's ``dsyevd`` on one thread** for small matrices: 0.80x torch's time at 512, 0.66x at
  1024, none at 2048. It needs ``threadpoolctl`` to hold scipy's BLAS to one thread (a runtime
  dependency beyond the declared ones), and no gain of a whole ``fisher`` call was established.
- **The solve on one core while the gradient check's backward pass runs on the other**
  (``benchmarks/solve_overlap.py``): right after two-thread work OpenMP's idle pool thread
  spin-waits on the solve's core and slows it by a quarter, which leaves the ``fisher`` call
  no faster.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from hessrank.problem import dtype_name


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
    try:  # set inside: a Ctrl-C that lands as it is set still finds the restore
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(previous)


#: What the float64 eigen-solve holds beyond its float64 input, in matrices of its size (peak
#: resident memory of :func:`symmetric_eigenvalues` and :func:`symmetric_eigenpairs` above their
#: input, measured at P = 2000 and 3000: 1.39-1.57 and 3.19-4.30; eigenvectors had been left out
#: of the exact Hessian's prediction, and calls asking for them peaked at 1.8x it; probe 71).
SOLVE_MATRICES = {False: 1.5, True: 3.5}


class NotFiniteError(ValueError):
    """The curvature of a finite model and loss holds NaN or Inf; ``dtype``: the curvature's."""

    def __init__(self, message: str, dtype: torch.dtype) -> None:
        super().__init__(message)
        self.dtype = dtype


def not_finite_error(dtype: torch.dtype, nonfinite_entry: str | None = None) -> NotFiniteError:
    """The curvature of a finite model and loss holds NaN or Inf, computed in ``dtype``: the
    two causes, and what to do about each; ``nonfinite_entry``, where the inputs or targets
    hold a NaN or infinite entry, names it (``inputs[0] holds inf at [2, 1] (1 entry)``), the
    first cause."""
    overflow = f"overflow {dtype_name(dtype)} (above {torch.finfo(dtype).max:.2g})"
    if dtype != torch.float64:
        overflow += (": analyse a float64 copy (copy.deepcopy(model).double(), with float64 "
                     "inputs), or check the model's scale")
    where = ("a NaN or infinite entry of the inputs or targets makes them so, unless the model "
             "replaces it before it meets a parameter or it only masks, as an additive -inf "
             "before a softmax does" if nonfinite_entry is None else
             f"{nonfinite_entry}, which makes them so unless the model replaces it before it "
             "meets a parameter or it only masks, as an additive -inf before a softmax does: "
             "replace it (torch.nan_to_num) or keep it out of the graph")
    return NotFiniteError(
        "the curvature matrix holds NaN or Inf, though the model and the loss are finite. "
        f"Either autograd's derivatives are NaN at these inputs ({where}; a branch torch.where "
        "does not select still enters the backward pass: torch.where(x > 0, x.sqrt(), x) gives "
        "0 * NaN at x < 0; check torch.autograd.grad(loss, parameters) for NaN, and make the "
        "unselected branch finite: x.clamp(min=0).sqrt()), or its entries (products of "
        f"gradients, second derivatives) {overflow}", dtype)


def _check_finite(matrix: Tensor) -> None:
    """Raise :func:`not_finite_error` unless every entry is finite (one reduction; LAPACK
    would fail to converge, without the reason)."""
    if not bool(torch.isfinite(matrix).all()):
        raise not_finite_error(matrix.dtype)


def symmetric_eigenvalues(matrix: Tensor) -> np.ndarray:
    """All eigenvalues of a symmetric matrix (float64 solve on the matrix's device).

    Raises:
        ValueError: the matrix holds NaN or Inf (:func:`not_finite_error`).
    """
    _check_finite(matrix)
    with _solver_threads(matrix):
        values = torch.linalg.eigvalsh(matrix.to(torch.float64))
    return by_magnitude(values.cpu().numpy())


def symmetric_eigenpairs(matrix: Tensor) -> tuple[np.ndarray, Tensor]:
    """Eigenvalues by decreasing magnitude and the matching eigenvectors as columns (float64).

    Raises:
        ValueError: the matrix holds NaN or Inf (:func:`not_finite_error`).
    """
    _check_finite(matrix)
    with _solver_threads(matrix):
        values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    values = values.cpu().numpy()
    order = np.lexsort((-values, -np.abs(values)))
    return values[order], vectors[:, torch.from_numpy(order).to(vectors.device)]
