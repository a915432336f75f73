"""Would running the MLP ``fisher`` call's 512 x 512 eigen-solve on one core, while the gradient
check's backward pass runs on the other, hide the solve? Measured, not adopted.

A CPU solve of up to 2048 x 2048 runs on one thread (``hessrank/spectrum/dense.py``), so during
it the second core idles, and the check's backward pass does not depend on it. This script times
the two pieces of work of ``run.py --only fisher``'s MLP (784-512-512-10, n = 512, float32; a
plain forward+backward stands in for the check's backward), each alone on one thread, then
together: the solve on a worker thread, the backward on the calling thread with one thread,
started either from idle or right after two-thread work (the Gram's GEMMs come just before the
check in a ``fisher`` call). Medians of ``--rounds``.

Usage::

    python benchmarks/solve_overlap.py --rounds 15
    OMP_WAIT_POLICY=passive python benchmarks/solve_overlap.py --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch import nn


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    inputs, targets = torch.randn(512, 784), torch.randint(0, 10, (512,))
    params = list(model.parameters())
    factor = torch.randn(512, 4096, dtype=torch.float64)
    gram = factor @ factor.T
    two_thread_work = torch.randn(512, 3000)

    def backward() -> None:
        loss = nn.functional.cross_entropy(model(inputs), targets)
        torch.autograd.grad(loss, params)

    def solve() -> None:
        torch.linalg.eigvalsh(gram)

    def together(after_two_threads: bool) -> tuple[float, float]:
        if after_two_threads:
            torch.set_num_threads(2)
            for _ in range(3):
                two_thread_work @ two_thread_work.T
        torch.set_num_threads(1)
        solved: list[float] = []

        def worker() -> None:
            torch.set_num_threads(1)
            solved.append(_seconds(solve))

        thread = threading.Thread(target=worker)
        thread.start()
        backward_time = _seconds(backward)
        thread.join()
        return backward_time, solved[0]

    torch.set_num_threads(1)
    backward()
    solve()
    rows = {"alone (one thread each, in turn)": [(_seconds(backward), _seconds(solve))
                                                 for _ in range(args.rounds)]}
    for label, after in (("together, from idle", False),
                         ("together, right after two-thread work", True)):
        rows[label] = [together(after) for _ in range(args.rounds)]
    print(f"median of {args.rounds} rounds, ms: backward (calling thread) | solve (worker)")
    for label, pairs in rows.items():
        backward_ms = statistics.median(b for b, _ in pairs) * 1e3
        solve_ms = statistics.median(s for _, s in pairs) * 1e3
        print(f"  {label:40s} {backward_ms:6.1f} | {solve_ms:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
