"""Where a ``fisher`` call spends its time: ``cProfile`` over a few calls on a ``run.py``
architecture (n = 128, float32, 2 threads), after the forward+backward it is measured against.

Usage::

    python benchmarks/profile_fisher.py lstm --calls 5
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable

from paired_trees import method_case  # this folder: the same model, batch and warm-up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arch", help="an architecture of run.py (lstm, gru, encoder, gpt, ...)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--lines", type=int, default=30, help="profile lines to print")
    args = parser.parse_args()
    fwd_bwd, fisher, _ = method_case(2, args.arch)  # warmed up

    def seconds(call: Callable[[], None]) -> float:
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    base, call = seconds(fwd_bwd), seconds(fisher)
    print(f"{args.arch}: forward+backward {base * 1e3:.1f} ms, fisher {call * 1e3:.1f} ms "
          f"({call / base:.2f}x), medians of {args.calls}")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        fisher()
    profile.disable()
    pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(args.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
