"""Data-set curvature: memory and time of ``effective_rank`` on a DataLoader against its size.

For each data-set size ``n``, a fresh process (so the resident-set peak is the call's own) builds
an MLP 784-256-10 (P = 203,530, float32) and ``n`` seeded Gaussian samples with random labels,
and times one call of ``method`` with ``lanczos_steps`` products on

- ``loader``: a ``DataLoader`` of batches of ``--batch-size`` (hessrank streams it), and
- ``one batch``: the same ``n`` samples as one batch (skipped above ``--max-one-batch``),

recording the result's peak memory (the kernel's resident-set high-water mark over the call) and
the spectrum's srank (the two agree to rounding: same loss, same products). Memory of the loader
route stays that of one batch plus the Lanczos basis; the one-batch route grows with ``n``.

    OMP_NUM_THREADS=1 python benchmarks/streaming.py --sizes 1024 4096 16384 65536
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessrank


def measure(n: int, route: str, method: str, steps: int, batch_size: int) -> dict[str, float]:
    """One call in this process; returns seconds, peak memory and srank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 784, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    data = DataLoader(TensorDataset(x, y), batch_size=batch_size) if route == "loader" else (x, y)
    result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), data, method,
                                     lanczos_steps=steps, max_memory=64 * 2**30,
                                     measure_memory=True, progress=False)
    return {"seconds": result.seconds, "peak_mib": (result.peak_memory or 0) / 2**20,
            "srank": result.ranks["srank"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--method", default="lanczos")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-one-batch", type=int, default=16384)
    parser.add_argument("--child", nargs=2, metavar=("N", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, route = int(args.child[0]), args.child[1]
        print(json.dumps(measure(n, route, args.method, args.steps, args.batch_size)))
        return
    print(f"{args.method}, {args.steps} products, batches of {args.batch_size}, MLP 784-256-10")
    print("| n | route | seconds | peak memory (MiB) | srank |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        for route in ("loader", "one batch"):
            if route == "one batch" and n > args.max_one_batch:
                continue
            output = subprocess.run(
                [sys.executable, __file__, "--method", args.method, "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--child", str(n), route],
                check=True, capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            print(f"| {n:,} | {route} | {row['seconds']:.2f} | {row['peak_mib']:.0f} | "
                  f"{row['srank']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
