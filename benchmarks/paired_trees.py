"""``fisher`` / forward+backward for several source trees, paired round by round.

One worker process per tree (``PYTHONPATH`` set to the tree, so each imports its own hessrank),
all started at once and asked in turn for one round each: three plain forward+backward passes
(median kept) and one ``hessrank.effective_rank(model, nn.CrossEntropyLoss(), (x, y), "fisher")``
call, the same seeded MLP 784-512-512-10 and batch (n = 512, float32, 2 threads) as
``run.py --only fisher``, or with ``--arch`` one of ``run.py``'s architectures at n = 128. The
trees of one round run within a second of each other, so they see the same machine load; each
tree's figure is the median over rounds of its per-round ratio, and the rounds are also split by
the machine's regime (a forward+backward below ``--fast-ms`` is the shared machine's fast state,
where ratios differ from the throttled one: ``README.md``, run C).

Usage (a tree is a checkout, e.g. ``git worktree add /tmp/base <commit>``)::

    python benchmarks/paired_trees.py /tmp/base . --rounds 30
    python benchmarks/paired_trees.py /tmp/base . --arch encoder --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fisher_case(threads: int, arch: str = "mlp"
                ) -> tuple[Callable[[], None], Callable[..., None], str]:
    """The MLP and batch of ``run.py --only fisher`` (or ``run.py``'s ``arch`` at n = 128) with
    torch on ``threads`` threads: its plain forward+backward, hessrank's ``fisher`` call (each
    warmed up once), and the path of the hessrank that runs (imported here, so a worker's
    ``PYTHONPATH`` picks the tree)."""
    import warnings

    import torch
    from torch import nn

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    import hessrank

    if arch == "mlp":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(512, 784, generator=generator)
        y = torch.randint(0, 10, (512,), generator=generator)
    else:
        from run import build_batch, build_model  # this folder

        spec = {"model": arch, "n": 128, "seed": 0}
        model, (x, y) = build_model(spec), build_batch(spec)
    loss = nn.CrossEntropyLoss()

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    def fisher(**options: Any) -> None:
        hessrank.effective_rank(model, loss, (x, y), "fisher", **options)

    fwd_bwd()
    fisher()
    return fwd_bwd, fisher, hessrank.__file__


def worker(threads: int, arch: str) -> None:
    """Answer each line on stdin with one round's timings (a JSON line)."""
    fwd_bwd, fisher, source = fisher_case(threads, arch)
    print(json.dumps({"ready": source}), flush=True)
    for _ in sys.stdin:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fwd_bwd()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        fisher()
        print(json.dumps({"fwd_bwd": statistics.median(times),
                          "fisher": time.perf_counter() - start}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="*", help="source trees (checkouts) to compare")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="mlp",
                        help="mlp (the 670k MLP, n = 512) or an architecture of run.py (n = 128)")
    parser.add_argument("--fast-ms", type=float, default=25.0,
                        help="a round whose forward+backward is faster is in the fast regime")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.threads, args.arch)
        return 0
    if not args.trees:
        parser.error("give at least one source tree")
    procs = []
    for tree in args.trees:
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--arch",
             args.arch], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for tree, proc in zip(args.trees, procs):
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())["ready"]
        print(f"{tree}: {ready}")
    rows: dict[str, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for r in range(args.rounds):
        order = list(zip(args.trees, procs))
        order = order[r % len(order):] + order[:r % len(order)]
        for tree, proc in order:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            rows[tree].append(json.loads(proc.stdout.readline()))
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    fast = [all(rows[t][r]["fwd_bwd"] * 1e3 < args.fast_ms for t in args.trees)
            for r in range(args.rounds)]
    print(f"{args.rounds} rounds, {sum(fast)} in the fast regime (every forward+backward "
          f"< {args.fast_ms:g} ms)")
    for tree in args.trees:
        line = [f"{tree}:"]
        for label, keep in (("all", [True] * args.rounds), ("fast", fast),
                            ("throttled", [not f for f in fast])):
            kept = [row for row, k in zip(rows[tree], keep) if k]
            if kept:
                ratios = [row["fisher"] / row["fwd_bwd"] for row in kept]
                line.append(f"{label} {statistics.median(ratios):.2f} "
                            f"(fwd+bwd {statistics.median(r['fwd_bwd'] for r in kept) * 1e3:.1f} "
                            f"ms, n={len(kept)})")
        print("  ".join(line))
        print("  ratios: " + " ".join(f"{row['fisher'] / row['fwd_bwd']:.2f}"
                                      for row in rows[tree]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
