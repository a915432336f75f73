"""How close ``exact``'s prediction of its float64 eigen-solve comes to the solve itself.

``exact`` refuses a call over ``max_seconds`` before any work, from a prediction: the products
timed on a chunk, and the eigen-solve from a 512 x 512 trial scaled to ``P``
(:func:`hessrank.estimators.base.eigen_solve_seconds`). This times the solve of random symmetric
matrices at a few sizes, with and without eigenvectors, beside the prediction made in the same
process (ratios, not seconds, carry over between machines)::

    OMP_NUM_THREADS=1 python benchmarks/exact_time.py [--sizes 1024 2048 3290]
"""

from __future__ import annotations

import argparse
import time

import torch

from hessrank.estimators.base import eigen_solve_seconds
from hessrank.spectrum.dense import symmetric_eigenpairs, symmetric_eigenvalues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3290])
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    print("| P | eigenvectors | predicted (s) | measured (s) | measured / predicted |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        matrix = torch.randn(size, size, generator=generator, dtype=torch.float64)
        matrix = matrix + matrix.T
        for vectors in (False, True):
            predicted = eigen_solve_seconds(size, device, vectors=vectors)
            start = time.perf_counter()
            (symmetric_eigenpairs if vectors else symmetric_eigenvalues)(matrix)
            measured = time.perf_counter() - start
            print(f"| {size} | {'yes' if vectors else 'no'} | {predicted:.2f} | {measured:.2f} | "
                  f"{measured / predicted:.2f} |", flush=True)


if __name__ == "__main__":
    main()
