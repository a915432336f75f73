"""The Lanczos solver's own rounding on long vectors, against an operator of known spectrum.

``U diag(values) U^T`` with dense orthonormal ``U`` (``[P, 8]``, float64), its products computed
in float64 and returned in float32, so that the operator's eigenvalues are ``values`` and
zeros to the products' float32 rounding. ``lanczos_spectrum`` at 40 products, with and
without the rank bound 8 given; printed: the largest error of the eight Ritz values relative
to the largest eigenvalue, the trace and its interval against the exact 30.7. With
``--reductions`` (this tree's solver only), first the reductions themselves at each length:
the relative error against float64 of a float32 dot product and squared norm over the whole
vector and of the solver's (``_dot``, ``_norm``), and their times::

    OMP_NUM_THREADS=1 python benchmarks/lanczos_rounding.py [--dims 100000 1000000] [--reductions]

Run it with ``PYTHONPATH=<a worktree of an older commit>`` to measure that commit's solver.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import numpy as np
import torch

from hessrank.spectrum.lanczos import lanczos_spectrum
from hessrank.spectrum.operator import LowRankOperator

VALUES = [10.0, 7.0, 5.0, 3.0, 2.0, 1.5, 1.2, 1.0]


def _milliseconds(call: Callable[[], object], repeats: int = 20) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e3


def reductions(dims: list[int]) -> None:
    from hessrank.spectrum.lanczos import _dot, _norm

    print("| P | dot error, float32 | solver's | squared norm error, float32 | solver's | "
          "dot ms, float32 / solver's | norm ms, float32 / solver's |")
    print("|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for dim in dims:
        first = torch.randn(dim, generator=generator)
        second = first + 0.1 * torch.randn(dim, generator=generator)
        dot = float(first.double() @ second.double())
        square = float(first.double() @ first.double())
        errors = (abs(float(first @ second) - dot) / abs(dot),
                  abs(_dot(first, second) - dot) / abs(dot),
                  abs(float(first.norm()) ** 2 - square) / square,
                  abs(_norm(first) ** 2 - square) / square)
        times = [_milliseconds(functools.partial(call, *arguments)) for call, arguments in (
            (torch.dot, (first, second)), (_dot, (first, second)), (torch.linalg.vector_norm,
                                                                  (first,)), (_norm, (first,)))]
        print(f"| {dim:,} | " + " | ".join(f"{error:.1e}" for error in errors)
              + f" | {times[0]:.2f} / {times[1]:.2f} | {times[2]:.2f} / {times[3]:.2f} |",
              flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[10**5, 10**6, 4 * 10**6])
    parser.add_argument("--reductions", action="store_true",
                        help="first measure the reductions (this tree's solver only)")
    args = parser.parse_args()
    if args.reductions:
        reductions(args.dims)
    print("| P | rank bound given | products | max eigenvalue error / top | trace | "
          "trace interval (exact 30.7) |")
    print("|---|---|---|---|---|---|")
    for dim in args.dims:
        for stated in (True, False):
            basis, _ = torch.linalg.qr(torch.randn(dim, len(VALUES), generator=torch.Generator()
                                                   .manual_seed(0), dtype=torch.float64))
            operator = LowRankOperator(basis, torch.tensor(VALUES, dtype=torch.float64),
                                       states_rank=stated)
            result = lanczos_spectrum(operator, max_products=40, seed=0)
            found = np.sort(result.ritz_values)[::-1][: len(VALUES)]
            error = (float(np.abs(found - VALUES).max()) / VALUES[0]
                     if len(found) == len(VALUES) else float("nan"))
            low, high = result.trace_interval
            holds = "holds" if low <= sum(VALUES) <= high else "**misses**"
            print(f"| {dim:,} | {'yes' if stated else 'no'} | {result.num_products} | "
                  f"{error:.1e} | {result.trace:.9g} | [{low:.9g}, {high:.9g}] ({holds}) |",
                  flush=True)


if __name__ == "__main__":
    main()
