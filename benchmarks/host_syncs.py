"""How often one ``fisher`` call waits for the GPU, and where: each synchronising operation of
one warm call (``torch.cuda.set_sync_debug_mode``), counted by the hessrank line that issued it,
and the call's wall time (the median of 7 warm calls), on ``benchmarks/run.py``'s arch models
at n = 128.

Usage::

    python benchmarks/host_syncs.py --archs resnet18,gpt,lstm
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import traceback
import warnings

import torch
from run import build_batch, build_model
from torch import nn

import hessrank


def _sync_sites(call: object) -> collections.Counter[str]:
    """The synchronisations of one run of ``call``, by the innermost hessrank frame."""
    sites: collections.Counter[str] = collections.Counter()

    def count(*_: object, **__: object) -> None:
        frames = [frame for frame in traceback.extract_stack() if "hessrank/" in frame.filename]
        sites[f"{frames[-1].filename.split('hessrank/')[-1]}:{frames[-1].lineno} "
              f"{frames[-1].name}" if frames else "outside hessrank"] += 1

    shown = warnings.showwarning
    warnings.showwarning = count
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            call()  # type: ignore[operator]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown
    return sites


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="resnet18,gpt,lstm")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--sites", type=int, default=10, help="most frequent sites shown")
    args = parser.parse_args()
    for arch in args.archs.split(","):
        spec = {"model": arch, "n": args.n, "seed": 0, "device": "cuda"}
        model, (inputs, labels) = build_model(spec), build_batch(spec)

        def call() -> None:
            hessrank.effective_rank(model, nn.CrossEntropyLoss(), (inputs, labels),  # noqa: B023
                                    method="fisher", progress=False)

        for _ in range(3):
            call()
        seconds = []
        for _ in range(7):
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        sites = _sync_sites(call)
        print(f"{arch}: fisher {1e3 * statistics.median(seconds):.1f} ms a call (median of 7), "
              f"{sum(sites.values())} synchronisations", flush=True)
        for site, times in sites.most_common(args.sites):
            print(f"  {times:5d}  {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
