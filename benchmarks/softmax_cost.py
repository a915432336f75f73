"""What the saturation-safe log-softmax costs a Hessian-vector product, paired in one process.

``hessrank/curvature/softmax.py`` runs the Hessian's log-softmax through a backward without
cancellation. Its gradient graph holds more logits-sized tensors than torch's fused kernel and
each product runs a few more passes over the logits. This times one product
(:class:`~hessrank.curvature.hessian.HessianOperator`) with it and without it, alternating round
by round (the same model, batch and vector), as the model's dtype decides it and as a float64
model always runs it, on ``run.py``'s architectures at n = 128 (GPT
with its per-token loss over 4.2M logits; the MLP 784-512-512-10 at n = 512 with ``mlp``). It
also reports the operator's graph bytes for both.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/softmax_cost.py --arch gpt --rounds 20
    OMP_NUM_THREADS=2 python benchmarks/softmax_cost.py --arch mlp --rounds 40
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import torch
from paired_trees import case_model  # this folder

from hessrank.curvature import hessian
from hessrank.problem import build_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gpt")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = case_model(args.arch)
    problem = build_problem(model, torch.nn.CrossEntropyLoss(), batch, None, "eval")
    safe = hessian.SaturationSafeSoftmax
    variants: dict[str, Any] = {
        "torch's": contextlib.nullcontext,  # the log-softmax as torch runs it
        "as run": safe,  # the model's dtype decides (a float32 model: where saturated)
        "always safe": lambda _: safe(torch.float64),  # as a float64 model's always runs
    }
    operators = {}
    for name, mode in variants.items():
        hessian.SaturationSafeSoftmax = mode
        operators[name] = hessian.HessianOperator(problem)
    hessian.SaturationSafeSoftmax = safe
    vector = torch.randn(operators["as run"].dim, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, operator in operators.items():
            start = time.perf_counter()
            operator.matvec(vector)
            seconds[name].append(time.perf_counter() - start)
    for name, operator in operators.items():
        print(f"{name:>12} log-softmax: product {statistics.median(seconds[name]) * 1e3:8.1f} ms "
              f"(median of {args.rounds}), graph {operator.graph_bytes / 2**20:8.1f} MiB")
    for name in ("as run", "always safe"):
        ratios = [s / t for s, t in zip(seconds[name], seconds["torch's"])]
        print(f"paired ratio {name} / torch's: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")

if __name__ == "__main__":
    main()
