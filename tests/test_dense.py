"""The dense float64 eigenvalue solve against spectra known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.spectrum import dense

F64_TOL = 1e-12  # of the largest |eigenvalue|: float64 backward error, with room for m = 300


def _rotated(values: np.ndarray, seed: int = 0) -> torch.Tensor:
    """``Q diag(values) Q^T`` with a random orthogonal ``Q``, exactly symmetric (float64)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator,
                                       dtype=torch.float64))
    matrix = (q * torch.from_numpy(values)) @ q.T
    return (matrix + matrix.T) / 2


#: name -> the exact eigenvalues of an m x m test matrix
CASES = {
    "well-conditioned": lambda m: np.linspace(1.0, 2.0, m),
    "clustered": lambda m: np.repeat([1.0, 1.0 - 1e-9, 1e-3, 1e-12], -(-m // 4))[:m],
    "rank-deficient": lambda m: np.concatenate([np.geomspace(1.0, 1e-3, m // 4),
                                                np.zeros(m - m // 4)]),
    "indefinite": lambda m: np.linspace(-1.0, 0.5, m),
}


@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_finds_the_spectrum_by_magnitude(kind: str, m: int) -> None:
    exact = dense.by_magnitude(CASES[kind](m))
    found = dense.symmetric_eigenvalues(_rotated(exact))
    np.testing.assert_allclose(found, exact, rtol=0, atol=F64_TOL * np.abs(exact).max())
    assert np.all(np.diff(np.abs(found)) <= F64_TOL * np.abs(exact).max())


def test_a_float32_gram_is_solved_in_float64() -> None:
    """The estimators' case: a float32 rank-deficient Gram, widened once (its float32 solve
    would leave the zero eigenvalues at about 1e-7 of the top, not 1e-12)."""
    factor = torch.randn(200, 60, generator=torch.Generator().manual_seed(3))
    gram = factor @ factor.T
    found = dense.symmetric_eigenvalues(gram)
    reference = dense.by_magnitude(torch.linalg.eigvalsh(gram.double()).numpy())
    np.testing.assert_allclose(found, reference, rtol=0, atol=F64_TOL * reference[0])


def test_leaves_the_input_and_thread_count_alone() -> None:
    matrix = _rotated(np.linspace(1, 2, 40))
    copy, threads = matrix.clone(), torch.get_num_threads()
    dense.symmetric_eigenvalues(matrix)
    assert torch.equal(matrix, copy) and torch.get_num_threads() == threads
