"""Peak memory of hessrank's Gram methods on ``run.py``'s architectures (and its CNNs, ``cnn`` and
``lenet``), one fresh subprocess per case, measured as ``run.py`` measures it (a warm-up call,
``malloc_trim``, then the resident-set high-water mark above the pre-call level), beside the
memory the call predicts once its first pass has run (read from its refusal just above the
prediction made before the work, as a budget would refuse it)::

    python benchmarks/peak_memory.py --archs lstm,encoder,gpt            # fisher, n = 128
    python benchmarks/peak_memory.py --archs gpt --method ggn --mc-samples 1
    python benchmarks/peak_memory.py --archs cnn,lenet,lstm --method ggn --n 64
    python benchmarks/peak_memory.py --archs resnet18 --method ggn --n 64 --fresh
    python benchmarks/peak_memory.py --archs encoder,gpt --eigenvectors 20 --fresh

``--fresh`` measures as the test suite does (``tests/fresh.py``): a new process warmed on tiny
models only, so that the call's own allocations are not served by memory a warm-up call of the
same size left behind (ggn on ResNet-18 at n = 64 measured 500-540 MiB after such a warm-up,
where a conv rule that held its chunk twice peaked at 724-757 MiB in fresh processes).

For A/B comparisons of a change: run it in each source tree (``git worktree``), alternating.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from torch import nn

import hessrank

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1] / "tests"))

import run  # noqa: E402  (benchmarks/run.py, next to this file)
from fresh import in_fresh_processes  # noqa: E402  (tests/fresh.py)


def call_peak(spec: dict[str, Any]) -> int:
    """The call's peak memory (``measure_memory=True``), in this process."""
    opts = spec["opts"]
    return hessrank.effective_rank(run.build_model(spec), nn.CrossEntropyLoss(),
                                   run.build_batch(spec), method=opts["method"],
                                   measure_memory=True, progress=False,
                                   **opts["kwargs"]).peak_memory


def predicted_bytes(spec: dict[str, Any], method: str, options: dict[str, Any]) -> int:
    """The refined prediction of a ``run.py`` case (:func:`refined_prediction`)."""
    return refined_prediction(run.build_model(spec), run.build_batch(spec), method, options)


def refined_prediction(model: nn.Module, batch: object, method: str,
                       options: dict[str, Any]) -> int:
    """The refined prediction: the call refused before the work at ``max_memory=1`` gives the
    prediction made then, an upper bound where reading the outputs would tighten it (a GGN's
    Gram holds the columns of the positions its loss weighs, read where the budget admits the
    loss side); where the call runs one byte below it, the least budget it runs at (to 1 %); else
    at one byte above the figure,
    the refusal once its first pass has run, and so on while a later refinement refuses (the
    cotangents' size, once they are formed). For ``exact``, whose refusal names one column of
    products at a time (the least it runs with), ``predict_exact_cost``: as many columns as fit
    without a budget, as a call without one runs."""
    if method == "exact":
        return hessrank.predict_exact_cost(model, nn.CrossEntropyLoss(), batch,
                                           eigenvectors=options.get("eigenvectors", 0))[0]

    def refusal_at(budget: int) -> int | None:
        try:
            hessrank.effective_rank(model, nn.CrossEntropyLoss(), batch, method=method,
                                    max_memory=budget, **options)
        except hessrank.BudgetError as refusal:
            return int(refusal.memory_bytes)
        return None

    bound = refusal_at(1)
    if bound is None:
        return 1
    figure = refusal_at(bound - 1)
    if figure is None:  # admitted below the bound: the least budget admitted, to 1 %
        refused, admitted = 1, bound - 1
        while admitted > 1.01 * refused:
            middle = int(math.sqrt(refused * admitted))
            if refusal_at(middle) is None:
                admitted = middle
            else:
                refused = middle
        return admitted
    for _ in range(4):
        later = refusal_at(figure + 1)
        if later is None:
            return figure
        figure = later
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="lstm,encoder,gpt",
                        help="comma-separated architectures of run.py")
    parser.add_argument("--method", default="fisher", choices=("fisher", "ggn"))
    parser.add_argument("--mc-samples", type=int, default=None, help="ggn: Monte-Carlo columns")
    parser.add_argument("--eigenvectors", type=int, default=0,
                        help="eigenvectors in parameter space to form")
    parser.add_argument("--n", type=int, default=run.ARCH_N, help="batch size")
    parser.add_argument("--fresh", action="store_true",
                        help="measure in a process warmed on tiny models only (tests/fresh.py)")
    args = parser.parse_args()
    options: dict[str, object] = {} if args.mc_samples is None else {
        "mc_samples": args.mc_samples}
    if args.eigenvectors:
        options["eigenvectors"] = args.eigenvectors
    for arch in args.archs.split(","):
        if arch not in (*run.ARCHS, "cnn", "lenet"):
            parser.error(f"unknown architecture {arch!r}")
        spec = {"model": arch, "n": args.n, "seed": 0, "tool": "hessrank", "warm": True,
                "device": "cpu", "opts": {"method": args.method, "kwargs": options}}
        if arch in ("cnn", "lenet"):
            spec.update(model="cnn", variant="lenet" if arch == "lenet" else "mnist")
        if args.fresh:
            from peak_memory import call_peak  # by reference, for the fresh process
            out = {"peak_bytes": in_fresh_processes([(call_peak, (spec,))])[0]}
        else:
            out = run.memory_case(spec, 1200.0)
        if "error" in out:
            print(f"{arch:12} {args.method:6} error: {out['error']}")
            continue
        predicted = predicted_bytes(spec, args.method, options)
        print(f"{arch:12} {args.method:6} peak {out['peak_bytes'] / 2**20:8.0f} MiB  "
              f"predicted {predicted / 2**20:8.0f} MiB  peak / predicted "
              f"{out['peak_bytes'] / predicted:5.2f}  (one n x P float32 tensor: "
              f"{args.n * run.num_params(run.build_model(spec)) * 4 / 2**20:.0f} MiB)",
              flush=True)


if __name__ == "__main__":
    main()
