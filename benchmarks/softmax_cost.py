"""What the saturation-safe log-softmax costs a Hessian-vector product and the factors' loss-side
readings, paired in one process.

``hessrank/curvature/saturation.py`` runs the Hessian's log-softmax through a backward without
cancellation. Its gradient graph holds more logits-sized tensors than torch's fused kernel and
each product runs a few more passes over the logits. This times one product
(:class:`~hessrank.curvature.hessian.HessianOperator`) with it and without it, alternating round
by round (the same model, batch and vector), as the model's dtype decides it and as a float64
model always runs it, on ``run.py``'s architectures at n = 128 (GPT
with its per-token loss over 4.2M logits; the MLP 784-512-512-10 at n = 512 with ``mlp``). It
also reports the operator's graph bytes for both.

With ``--readings`` it times instead the loss-side readings of the output factors of
``fisher`` and ``ggn`` (outputs of at most 4,096 entries a sample;
:mod:`hessrank.curvature.loss`: the loss's gradients and curvature w.r.t. the model's outputs,
checked), with the loss as given and as run (their float64 readings through
:func:`~hessrank.curvature.saturation.saturation_safe`), in the model's dtype (``--dtype
float64``: every reading is float64's).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/softmax_cost.py --arch gpt --rounds 20
    OMP_NUM_THREADS=2 python benchmarks/softmax_cost.py --arch mlp --rounds 40
    OMP_NUM_THREADS=2 python benchmarks/softmax_cost.py --arch mlp --rounds 20 --readings \
        --dtype float64
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any

import torch
from eigensolve import paired  # this folder
from paired_trees import case_model

from hessrank.curvature import hessian, loss
from hessrank.problem import build_problem


def readings(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             rounds: int) -> None:
    """Print the loss-side readings' times with the loss as given and as run, paired."""
    inputs, targets = batch
    with torch.no_grad():
        outputs = model(inputs)
    cross_entropy = torch.nn.CrossEntropyLoss()
    calls = {
        "fisher": lambda: loss.fisher_cotangents(cross_entropy, outputs, targets, []),
        # (the exact GGN's [n, C, C] blocks only where an output is small: not GPT's 50k
        # classes at each of its positions)
        **({"ggn": lambda: loss.ggn_cotangents(cross_entropy, outputs, targets,
                                               torch.Generator().manual_seed(0), [])}
           if outputs[0].numel() <= 4096 else {}),
    }
    safe = loss.saturation_safe

    def under(wrapper: Any, call: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            loss.saturation_safe = wrapper
            try:
                call()
            finally:
                loss.saturation_safe = safe
        return run

    for name, call in calls.items():
        timing = paired({"as given": under(lambda loss_fn, log_softmax=True: loss_fn, call),
                         "as run": under(safe, call)}, rounds, "as given")
        given, run = timing["as given"], timing["as run"]
        print(f"{name:>16}: loss as given {given['seconds'] * 1e3:8.1f} ms, as run "
              f"{run['seconds'] * 1e3:8.1f} ms (medians of {rounds}); paired ratio median "
              f"{run['ratio']:.3f} (range {run['low']:.3f}-{run['high']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gpt")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--readings", action="store_true",
                        help="time the factors' loss-side readings instead of a product")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, (inputs, targets) = case_model(args.arch)
    dtype = getattr(torch, args.dtype)
    model, batch = model.to(dtype), (inputs.to(dtype) if inputs.is_floating_point()
                                     else inputs, targets)
    if args.readings:
        readings(model, batch, args.rounds)
        return
    problem = build_problem(model, torch.nn.CrossEntropyLoss(), batch, None, "eval")
    safe = hessian.SaturationSafe
    variants: dict[str, Any] = {
        "torch's": contextlib.nullcontext,  # the log-softmax as torch runs it
        "as run": safe,  # the model's dtype decides (a float32 model: where saturated)
        "always safe": lambda _: safe(torch.float64),  # as a float64 model's always runs
    }
    operators = {}
    for name, mode in variants.items():
        hessian.SaturationSafe = mode
        operators[name] = hessian.HessianOperator(problem)
    hessian.SaturationSafe = safe
    vector = torch.randn(operators["as run"].dim, generator=torch.Generator().manual_seed(0))
    timing = paired({name: lambda operator=operator: operator.matvec(vector)
                     for name, operator in operators.items()}, args.rounds, "torch's")
    for name, operator in operators.items():
        print(f"{name:>12} log-softmax: product {timing[name]['seconds'] * 1e3:8.1f} ms "
              f"(median of {args.rounds}), graph {operator.graph_bytes / 2**20:8.1f} MiB")
    for name in ("as run", "always safe"):
        print(f"paired ratio {name} / torch's: median {timing[name]['ratio']:.3f} "
              f"(range {timing[name]['low']:.3f}-{timing[name]['high']:.3f})")

if __name__ == "__main__":
    main()
