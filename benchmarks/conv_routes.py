"""Each convolution of ResNet-18 (CIFAR-sized inputs, as ``benchmarks/run.py``'s arch group):
its weight Gram by samples as groups and by the input's patches, timed in one process (the
median of paired rounds, the order alternating), with the route hessrank's cost model picks on
the device (:data:`hessrank.curvature.rules.conv.GROUPED_SLOWDOWN`).

Usage::

    python benchmarks/conv_routes.py --device cuda --n 128
    OMP_NUM_THREADS=2 python benchmarks/conv_routes.py --device cpu --n 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from run import build_batch, build_model
from torch import Tensor, nn

from hessrank.curvature.rules.conv import ConvFactors, ConvRule, patches, route_costs
from hessrank.curvature.rules.factors import LayerFactors


def _captured(model: nn.Module, inputs: Tensor, labels: Tensor
              ) -> dict[str, tuple[nn.Conv2d, Tensor, Tensor]]:
    """Each convolution's input and output gradient for the batch's mean cross-entropy."""
    seen: dict[str, tuple[nn.Conv2d, Tensor, Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(module: nn.Module, args: tuple, output: Tensor, name: str = name) -> None:
                output.retain_grad()
                seen[name] = (module, args[0].detach(), output)  # type: ignore[assignment]
            handles.append(module.register_forward_hook(hook))
    nn.CrossEntropyLoss()(model(inputs), labels).backward()
    for handle in handles:
        handle.remove()
    return {name: (module, x, out.grad) for name, (module, x, out) in seen.items()}


def _routes(factors: ConvFactors) -> dict[str, Callable[[], Tensor]]:
    """The two routes' Grams, each formed from the captured factors (the patches inside)."""
    k, n, c_out, h_out, w_out = factors.output_grads.shape

    def by_patches() -> Tensor:
        return LayerFactors(
            activations=patches(factors.inputs, factors.kernel, factors.stride,
                                factors.dilation, (h_out, w_out)),
            output_grads=factors.output_grads.reshape(k, n, c_out, -1).transpose(2, 3),
            weight_shape=factors.weight_shape, with_bias=False).gram()

    def by_groups() -> Tensor:
        return ConvFactors.gram(_GroupsOnly(**vars(factors)))

    return {"groups": by_groups, "patches": by_patches}


class _GroupsOnly(ConvFactors):
    """The factors, always by samples as groups."""

    def position_pairs(self) -> LayerFactors | None:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cuda":  # as every hessrank call does
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    spec = {"model": "resnet18", "n": args.n, "seed": 0, "device": args.device}
    model, (inputs, labels) = build_model(spec), build_batch(spec)
    rule = ConvRule()
    totals = {"groups": 0.0, "patches": 0.0, "picked": 0.0}
    print(f"ResNet-18, n = {args.n}, {args.device}; milliseconds, median of {args.rounds}")
    print(f"{'layer':24s} {'T':>4s} {'C_in':>5s} {'C_out':>5s} {'k':>2s} {'picked':>8s} "
          f"{'groups':>8s} {'patches':>8s}")
    for name, (module, x, grad) in _captured(model, inputs, labels).items():
        factors = rule.tensor_factors(module, x, grad[None], args.n, frozenset({"weight"}))
        assert isinstance(factors, ConvFactors)
        routes = _routes(factors)
        times: dict[str, list[float]] = {route: [] for route in routes}
        for round_ in range(args.rounds + 1):
            for route in sorted(routes, reverse=bool(round_ % 2)):
                sync()
                start = time.perf_counter()
                routes[route]()
                sync()
                if round_:  # the first round warms up
                    times[route].append(1e3 * (time.perf_counter() - start))
        ms = {route: statistics.median(values) for route, values in times.items()}
        positions = grad.shape[2] * grad.shape[3]
        patch_cost, groups_cost = route_costs(args.n, positions, x.shape[1], grad.shape[1],
                                              module.kernel_size[0] * module.kernel_size[1],
                                              module.groups, args.device)
        picked = "patches" if patch_cost < groups_cost else "groups"
        for route in routes:
            totals[route] += ms[route]
        totals["picked"] += ms[picked]
        print(f"{name:24s} {positions:4d} {x.shape[1]:5d} {grad.shape[1]:5d} "
              f"{module.kernel_size[0]:2d} {picked:>8s} {ms['groups']:8.2f} {ms['patches']:8.2f}",
              flush=True)
    print(f"all by groups {totals['groups']:.1f} ms, all by patches {totals['patches']:.1f} ms, "
          f"as picked {totals['picked']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
