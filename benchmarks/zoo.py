"""``fisher`` / forward+backward on models hessrank has no case of its own for.

Each torchvision model (random weights, evaluation mode, 10 classes, ``n`` random 3 x 32 x 32
images, cross-entropy, float32) is warmed up with one call, then measured in ``--rounds`` paired
rounds: three forward+backward passes (median kept) and one
``hessrank.effective_rank(..., "fisher")`` call, back to back in one process, so both see the same
machine load; the figure is the median over rounds of the per-round ratio. Also printed: the
rules the parameters took (``paths``) and the call's peak memory as hessrank measures it.

``--gpt2`` instead measures HuggingFace's GPT-2 (``transformers``, not a dependency: install it
to run this; 2 layers, width 128, 4 heads, vocabulary 512, ``n`` sequences of 64 tokens, per-token
cross-entropy, logits through a wrapper) the same way, with two more calls in each round: without
the ``hf-conv1d`` rule (removed from the registry for the call: the code before the rule) and
with ``backend="func"`` (the general path only).

Usage::

    python benchmarks/zoo.py                    # n = 32, 3 rounds, 2 threads
    python benchmarks/zoo.py --n 64 --rounds 5
    python benchmarks/zoo.py --gpt2 --n 128 --rounds 5
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
from hessrank.curvature import rules


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


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


class _Logits(nn.Module):
    """A HuggingFace causal language model's logits ``[n, T, V]`` from token ids."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=ids).logits


def gpt2(n: int, rounds: int) -> None:
    """HuggingFace's GPT-2: ``fisher`` and ``fisher`` on the general path, paired by round."""
    import transformers

    vocabulary, context = 512, 64
    config = transformers.GPT2Config(vocab_size=vocabulary, n_positions=context, n_embd=128,
                                     n_layer=2, n_head=4, attn_pdrop=0.0, embd_pdrop=0.0,
                                     resid_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = _Logits(transformers.GPT2LMHeadModel(config)).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocabulary, (n, context), generator=generator)
    labels = torch.randint(0, vocabulary, (n, context), generator=generator)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets)

    params = list(model.parameters())
    rule = next(rule for rule in rules.RULES if rule.name == "hf-conv1d")

    def call(options: dict[str, str], with_rule: bool) -> hessrank.RankResult:
        if not with_rule:
            rules.RULES.remove(rule)
        try:
            return hessrank.effective_rank(model, loss_fn, (ids, labels), "fisher",
                                           progress=False, **options)
        finally:
            if not with_rule:
                rules.RULES.insert(0, rule)

    calls = {"fisher": ({}, True), "fisher without the hf-conv1d rule (as before it)": ({}, False),
             "fisher, backend='func' (the general path only)": ({"backend": "func"}, True)}
    results = {name: call(*arguments) for name, arguments in calls.items()}
    ratios: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        unit = statistics.median(timed(lambda: torch.autograd.grad(
            loss_fn(model(ids), labels), params)) for _ in range(3))
        for name, arguments in calls.items():
            ratios[name].append(timed(lambda arguments=arguments: call(*arguments)) / unit)
    top = results["fisher"].eigenvalues[0]
    gap = max(float(max(abs(a - b) for a, b in zip(results["fisher"].eigenvalues,
                                                   other.eigenvalues)))
              for other in results.values())
    print(f"GPT-2 (HuggingFace), P = {sum(p.numel() for p in params):,}, n = {n}, "
          f"{rounds} paired rounds; the eigenvalues of the three agree to {gap / top:.1e} of "
          "the top")
    for name, values in ratios.items():
        paths = collections.Counter(results[name].paths.values())
        print(f"  {name}: {statistics.median(values):.2f} x forward+backward "
              f"({', '.join(f'{rule} {count}' for rule, count in paths.most_common())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpt2", action="store_true",
                        help="HuggingFace's GPT-2 instead (needs transformers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.gpt2:
        gpt2(args.n, args.rounds)
        return
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

        forward_backward()
        result = hessrank.effective_rank(model, loss_fn, (x, y), method="fisher",
                                         measure_memory=True, progress=False)
        ratios, units = [], []
        for _ in range(args.rounds):
            units.append(statistics.median(timed(forward_backward) for _ in range(3)))
            ratios.append(timed(lambda: hessrank.effective_rank(
                model, loss_fn, (x, y),  # noqa: B023
                method="fisher", progress=False)) / units[-1])
        paths = collections.Counter(result.paths.values())
        peak = "" if result.peak_memory is None else f"{result.peak_memory / 2**20:.0f}"
        print(f"| {name} | {sum(p.numel() for p in params):,} | "
              f"{statistics.median(units):.3f} | {statistics.median(ratios):.2f} | "
              f"{', '.join(f'{rule} {count}' for rule, count in paths.most_common())} | "
              f"{peak} |", flush=True)


if __name__ == "__main__":
    main()
