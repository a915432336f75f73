"""``fisher`` / forward+backward on torchvision models hessrank has no case of its own for.

Each model (random weights, evaluation mode, 10 classes, ``n`` random 3 x 32 x 32 images,
cross-entropy, float32) is warmed up with one call, then measured in ``--rounds`` paired rounds:
three forward+backward passes (median kept) and one ``hessrank.effective_rank(..., "fisher")``
call, back to back in one process, so both see the same machine load; the figure is the median
over rounds of the per-round ratio. Also printed: the rules the parameters took (``paths``) and
the call's peak memory as hessrank measures it.

Usage::

    python benchmarks/zoo.py                    # n = 32, 3 rounds, 2 threads
    python benchmarks/zoo.py --n 64 --rounds 5
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torchvision.models as tv
from torch import nn

import hessrank


def _vit() -> nn.Module:
    return tv.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                hidden_dim=128, mlp_dim=256, num_classes=10)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: tv.efficientnet_b0(num_classes=10),
    "regnet_y_400mf": lambda: tv.regnet_y_400mf(num_classes=10),
    "densenet121": lambda: tv.densenet121(num_classes=10),
    "convnext_tiny": lambda: tv.convnext_tiny(num_classes=10),
    "vit (4 layers, width 128, patches 4 x 4)": _vit,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    loss_fn = nn.CrossEntropyLoss()
    print(f"| model (n = {args.n}) | P | forward+backward (s) | `fisher` / forward+backward "
          "| rules (parameters) | `fisher` peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make().eval()
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(args.n, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (args.n,), generator=generator)
        params = list(model.parameters())

        def forward_backward(model: nn.Module = model, x: torch.Tensor = x,
                             y: torch.Tensor = y, params: list = params) -> None:
            torch.autograd.grad(loss_fn(model(x), y), params)

        def timed(work: Callable[[], object]) -> float:
            start = time.perf_counter()
            work()
            return time.perf_counter() - start

        forward_backward()
        result = hessrank.effective_rank(model, loss_fn, (x, y), method="fisher")
        ratios, units = [], []
        for _ in range(args.rounds):
            units.append(statistics.median(timed(forward_backward) for _ in range(3)))
            ratios.append(timed(lambda: hessrank.effective_rank(
                model, loss_fn, (x, y), method="fisher")) / units[-1])  # noqa: B023
        paths = collections.Counter(result.paths.values())
        peak = "" if result.peak_memory is None else f"{result.peak_memory / 2**20:.0f}"
        print(f"| {name} | {sum(p.numel() for p in params):,} | "
              f"{statistics.median(units):.3f} | {statistics.median(ratios):.2f} | "
              f"{', '.join(f'{rule} {count}' for rule, count in paths.most_common())} | "
              f"{peak} |", flush=True)


if __name__ == "__main__":
    main()
