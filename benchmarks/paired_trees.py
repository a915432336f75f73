"""``fisher`` (or ``--method``) / forward+backward for several source trees, paired round by round.

One worker process per tree (``PYTHONPATH`` set to the tree, so each imports its own hessrank),
all started at once and asked in turn for one round each: three plain forward+backward passes
(median kept) and one ``hessrank.effective_rank(model, nn.CrossEntropyLoss(), (x, y), "fisher")``
call, the same seeded MLP 784-512-512-10 and batch (n = 512, float32, 2 threads) as
``run.py --only fisher``, or with ``--arch`` one of ``run.py``'s architectures at n = 128;
``--method`` times another method, ``--batches K`` the batch split into a data set of ``K``
batches (a list, which hessrank streams batch by batch), ``--option name=value`` passes an
estimator option (``lanczos_steps=40``: the default spends ``min(640, P/3)`` products). The
trees of one round run within a second of each other, so they see the same machine load; each
tree's figure is the median over rounds of its per-round ratio, and the rounds are also split by
the machine's regime (a forward+backward below ``--fast-ms`` is the shared machine's fast state,
where ratios differ from the throttled one: ``README.md``, run C).

Usage (a tree is a checkout, e.g. ``git worktree add /tmp/base <commit>``)::

    python benchmarks/paired_trees.py /tmp/base . --rounds 30
    python benchmarks/paired_trees.py /tmp/base . --arch encoder --rounds 10
    python benchmarks/paired_trees.py /tmp/base . --arch gpt --method lanczos --batches 4 \
        --option lanczos_steps=40 --rounds 6
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


def method_case(threads: int, arch: str = "mlp", method: str = "fisher", batches: int = 1,
                options: dict[str, Any] | None = None
                ) -> tuple[Callable[[], None], Callable[..., None], str]:
    """The MLP and batch of ``run.py --only fisher`` (or ``run.py``'s ``arch`` at n = 128) with
    torch on ``threads`` threads: its plain forward+backward, hessrank's ``method`` call (with
    the estimator ``options``) on the batch (or on it split into ``batches`` batches; each
    warmed up once), and the path of the hessrank that runs (imported here, so a worker's
    ``PYTHONPATH`` picks the tree)."""
    import warnings

    import torch
    from torch import nn

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    import hessrank

    model, (x, y) = case_model(arch)
    loss = nn.CrossEntropyLoss()

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    data: Any = (x, y) if batches == 1 else list(zip(x.chunk(batches), y.chunk(batches)))

    def call(**extra: Any) -> None:
        hessrank.effective_rank(model, loss, data, method, progress=False, **(options or {}),
                                **extra)

    fwd_bwd()
    call()
    return fwd_bwd, call, hessrank.__file__


def case_model(arch: str) -> tuple[Any, tuple[Any, Any]]:
    """The seeded model and batch: ``run.py --only fisher``'s MLP 784-512-512-10 at n = 512
    (``mlp``), or ``run.py``'s ``arch`` at n = 128."""
    import torch
    from torch import nn

    if arch == "mlp":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))
        generator = torch.Generator().manual_seed(1)
        return model, (torch.randn(512, 784, generator=generator),
                       torch.randint(0, 10, (512,), generator=generator))
    from run import build_batch, build_model  # this folder

    spec = {"model": arch, "n": 128, "seed": 0}
    return build_model(spec), build_batch(spec)


def worker(threads: int, arch: str, method: str, batches: int, options: dict[str, Any]) -> None:
    """Answer each line on stdin with one round's timings (a JSON line)."""
    fwd_bwd, call, source = method_case(threads, arch, method, batches, options)
    print(json.dumps({"ready": source}), flush=True)
    for _ in sys.stdin:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fwd_bwd()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        call()
        print(json.dumps({"fwd_bwd": statistics.median(times),
                          "method": time.perf_counter() - start}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="*", help="source trees (checkouts) to compare")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="mlp",
                        help="mlp (the 670k MLP, n = 512) or an architecture of run.py (n = 128)")
    parser.add_argument("--method", default="fisher", help="the method timed")
    parser.add_argument("--batches", type=int, default=1,
                        help="split the batch into this many (a data set)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an estimator option (a number), e.g. lanczos_steps=40")
    parser.add_argument("--fast-ms", type=float, default=25.0,
                        help="a round whose forward+backward is faster is in the fast regime")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = {name: json.loads(value) for name, _, value in
               (option.partition("=") for option in args.option)}
    if args.worker:
        worker(args.threads, args.arch, args.method, args.batches, options)
        return 0
    if not args.trees:
        parser.error("give at least one source tree")
    procs = []
    for tree in args.trees:
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--arch",
             args.arch, "--method", args.method, "--batches", str(args.batches),
             *(item for option in args.option for item in ("--option", option))], env=env,
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
                ratios = [row["method"] / row["fwd_bwd"] for row in kept]
                line.append(f"{label} {statistics.median(ratios):.2f} "
                            f"(fwd+bwd {statistics.median(r['fwd_bwd'] for r in kept) * 1e3:.1f} "
                            f"ms, call {statistics.median(r['method'] for r in kept):.3f} s, "
                            f"n={len(kept)})")
        print("  ".join(line))
        print("  ratios: " + " ".join(f"{row['method'] / row['fwd_bwd']:.2f}"
                                      for row in rows[tree]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
