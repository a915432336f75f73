"""Where a ``fisher`` call on the 670k MLP spends its time, and what two fixed costs weigh.

The MLP, batch and threads of ``run.py --only fisher`` (784-512-512-10, n = 512, float32, 2
threads), or with ``--arch`` one of ``run.py``'s architectures at n = 128. Default: the call's
phases, timed by wrapping this tree's internal functions (so it follows this tree's code, not
older ones), against a plain forward+backward measured in the same rounds. ``--ab``: the whole
call with and without one fixed cost, alternated in one process, with the median paired ratio:

- ``memory``: the call with ``measure_memory=True`` against the default (no measurement):
  the peak-memory monitor's ``malloc_trim`` at the start of a call (``hessrank/monitor.py``),
  whose cost is mostly the page faults of reallocating the memory it returned;
- ``solver-threads``: the 512 x 512 eigen-solve on one thread (the default,
  ``hessrank/spectrum/dense.py``) against torch's thread count.

Usage::

    python benchmarks/fisher_phases.py --calls 12
    python benchmarks/fisher_phases.py --arch lstm --calls 12
    python benchmarks/fisher_phases.py --ab memory --calls 16
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from paired_trees import method_case  # this folder: the same MLP, batch and warm-up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ab", choices=("memory", "solver-threads"))
    parser.add_argument("--arch", default="mlp",
                        help="mlp (n = 512) or an architecture of run.py (n = 128)")
    args = parser.parse_args()
    fwd_bwd, fisher, _ = method_case(args.threads, args.arch)

    def timed(run: Callable[[], None]) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    if args.ab:
        return compare(args, fisher)
    spent: dict[str, float] = collections.defaultdict(float)
    wrap_phases(spent)
    fisher()
    spent.clear()
    calls, units = [], []
    for _ in range(args.calls):
        calls.append(timed(fisher))
        units.append(statistics.median(timed(fwd_bwd) for _ in range(3)))
    unit = statistics.median(units)
    print(f"fisher {statistics.median(calls) * 1e3:.1f} ms, forward+backward {unit * 1e3:.1f} "
          f"ms: {statistics.median(c / u for c, u in zip(calls, units)):.2f} forward+backwards "
          f"(medians of {args.calls} calls; phases are means per call)")
    for label, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        per_call = seconds / args.calls
        print(f"  {label:42s} {per_call * 1e3:6.1f} ms  {per_call / unit:5.2f} fwd+bwd")
    return 0


def wrap_phases(spent: dict[str, float]) -> None:
    """Time this tree's phases of a Gram call (nested phases are also inside their parents)."""
    import torch

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
        setattr(owner, name, timed)

    gram = importlib.import_module("hessrank.curvature.gram")
    estimators = importlib.import_module("hessrank.estimators.gram")
    factors = importlib.import_module("hessrank.curvature.rules.factors")
    problem = importlib.import_module("hessrank.problem")
    wrap(estimators, "compute_gram", "compute_gram (all below but the solve)")
    wrap(estimators, "symmetric_eigenvalues", "eigen-solve")
    wrap(problem.CurvatureProblem, "forward", "forward (capturing)")
    wrap(gram, "shard_cotangents", "loss-side cotangents and checks")
    wrap(gram, "_backward_batched", "capturing backward")
    wrap(torch.autograd, "grad", "every autograd.grad (backward passes)")
    wrap(factors.LayerFactors, "gram_and_claims", "rule Grams and the check's claims")
    recurrent = importlib.import_module("hessrank.curvature.rules.recurrent")
    for cell in (recurrent.LSTMCell, recurrent.GRUCell, recurrent.PlainCell):
        wrap(cell, "backward", "recurrent rule's backward recurrence")
    wrap(gram, "_difference", "the check's error norms")


def compare(args: argparse.Namespace, fisher: Callable[..., None]) -> int:
    """The call with and without one fixed cost, alternated; the median paired ratio."""
    dense = importlib.import_module("hessrank.spectrum.dense")
    single = dense.SINGLE_THREAD_SIZE
    variants: dict[str, tuple[Callable[[], None], dict[str, Any]]] = (
        {"measure_memory=True": (lambda: None, {"measure_memory": True}),
         "default": (lambda: None, {})}
        if args.ab == "memory" else
        {"solve on one thread": (lambda: setattr(dense, "SINGLE_THREAD_SIZE", single), {}),
         f"on {args.threads}": (lambda: setattr(dense, "SINGLE_THREAD_SIZE", 0), {})})
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.calls):
        for name, (apply, options) in variants.items():
            apply()
            start = time.perf_counter()
            fisher(**options)
            times[name].append(time.perf_counter() - start)
    first, second = times.values()
    print(", ".join(f"{name} {statistics.median(t) * 1e3:.1f} ms" for name, t in times.items())
          + f"; paired ratio {statistics.median(a / b for a, b in zip(first, second)):.3f} "
          f"({args.calls} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
