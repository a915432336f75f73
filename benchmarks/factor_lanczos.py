"""``fisher_lanczos`` and ``ggn_lanczos`` at small ``n``: the rank bound at work.

A factor operator ``F F^T`` has rank at most its columns, ``n`` (EF) or ``n C'`` (GGN), often far
below the default budget of ``min(640, ceil(P / 3))`` products. Its Lanczos basis holds at most
``krylov_rows(r)`` rows, and a first run that finds ``r`` eigenvalues away from zero has the
whole spectrum. This script measures, through the public API, against the dense ``fisher`` /
``ggn`` Gram spectra of the same batch:

- ``sweep``: small MLPs (tanh, ReLU, GELU) and a small CNN at n = 2 to 64: the products spent,
  the largest eigenvalue error against the dense one (relative to the top), the trace
  interval's width, and whether the run found the whole spectrum.
- ``coverage``: a float32 MLP whose GGN has its smallest nonzero eigenvalues a few float32
  rounding slacks apart (n = 12, C = 4, P = 224; 20 seeds): how often ``ggn_lanczos``'s and
  ``fisher_lanczos``'s numerical-rank and srank intervals miss the dense Gram spectra's of the
  float64 copy, and their mean widths.
- ``resnet``: torchvision's ResNet-18 on 32 x 32 inputs at n = 8: the predicted memory (read
  from the refusal at ``max_memory=1``), and for ``fisher_lanczos`` a run with its measured
  peak and time against ``fisher``'s, both against the EF's eigenvalues from float64
  per-sample gradients.

    OMP_NUM_THREADS=1 python benchmarks/factor_lanczos.py [sweep] [coverage] [resnet]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

import hessrank


def _mlp(activation: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(30, 40), activation(), nn.Linear(40, 40), activation(),
                         nn.Linear(40, 5))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 5, 6)), nn.Conv2d(1, 16, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 3 * 4, 5))


MODELS = {"tanh MLP": lambda: _mlp(nn.Tanh), "ReLU MLP": lambda: _mlp(nn.ReLU),
          "GELU MLP": lambda: _mlp(nn.GELU), "CNN": _cnn}


def sweep() -> None:
    print("| model | method | n | rank bound | products | max eigenvalue error / top | "
          "trace interval width / trace | spectrum complete |")
    print("|---|---|---|---|---|---|---|---|")
    loss = nn.CrossEntropyLoss()
    for (name, make), method in ((item, method) for item in MODELS.items()
                                 for method in ("fisher_lanczos", "ggn_lanczos")):
        for n in (2, 8, 32, 64):
            torch.manual_seed(n)
            model = make()
            batch = (torch.randn(n, 30), torch.randint(0, 5, (n,)))
            dense = hessrank.effective_rank(model, loss, batch, method=method.split("_")[0])
            result = hessrank.effective_rank(model, loss, batch, method=method)
            bound = result.max_rank
            found = np.sort(result.eigenvalues)[-bound:]
            reference = np.sort(dense.eigenvalues)[-bound:]
            top = float(np.abs(reference).max())
            error = (float(np.abs(found - reference).max()) / top
                     if len(found) == len(reference) else float("nan"))
            assert result.trace_interval is not None  # a Lanczos method's
            low, high = result.trace_interval
            complete = any("the spectrum is complete" in note for note in result.notes)
            print(f"| {name} | `{method}` | {n} | {bound} | {result.num_hvps} | {error:.1e} | "
                  f"{(high - low) / abs(dense.trace):.1e} | {'yes' if complete else 'no'} |",
                  flush=True)


class _Twin(nn.Module):
    """softplus, then a tanh layer written with ``F.linear`` on parameters of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(6, 10), nn.Linear(10, 4)
        self.weight = nn.Parameter(0.3 * torch.randn(10, 10))
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.softplus(self.first(x))
        return self.last(torch.tanh(nn.functional.linear(hidden, self.weight, self.bias)))


def coverage(seeds: int = 20) -> None:
    print("| method | numerical interval missed | srank interval missed | mean numerical width "
          "| mean srank width |")
    print("|---|---|---|---|---|")
    loss = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    batch = (torch.randn(12, 6), torch.randint(0, 4, (12,)))
    wide = (batch[0].double(), batch[1])
    for method in ("ggn_lanczos", "fisher_lanczos"):
        missed, widths = np.zeros(2, dtype=int), np.zeros(2)
        for seed in range(seeds):
            torch.manual_seed(2 + seed)
            model = _Twin()
            result = hessrank.effective_rank(model, loss, batch, method=method)
            eigenvalues = hessrank.effective_rank(copy.deepcopy(model).double(), loss, wide,
                                                  method=method.split("_")[0]).eigenvalues
            true = hessrank.spectral_ranks(eigenvalues, threshold=result.threshold,
                                           rtol=result.rtol)
            assert result.numerical_interval is not None and result.rank_interval is not None
            for which, (interval, value) in enumerate(((result.numerical_interval,
                                                        true["numerical"]),
                                                       (result.rank_interval, true["srank"]))):
                missed[which] += not interval[0] <= value <= interval[1]
                widths[which] += (interval[1] - interval[0]) / seeds
        print(f"| `{method}` | {missed[0]} / {seeds} | {missed[1]} / {seeds} | {widths[0]:.2f} | "
              f"{widths[1]:.2f} |", flush=True)


def resnet() -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    loss = nn.CrossEntropyLoss()
    for method in ("fisher_lanczos", "ggn_lanczos"):
        try:
            hessrank.effective_rank(model, loss, batch, method=method, max_memory=1)
        except hessrank.BudgetError as error:
            print(f"{method}: predicted {error.memory_bytes / 2**30:.2f} GiB", flush=True)
    start = time.perf_counter()
    result = hessrank.effective_rank(model, loss, batch, method="fisher_lanczos",
                                     measure_memory=True)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    dense = hessrank.effective_rank(model, loss, batch, method="fisher")
    dense_seconds = time.perf_counter() - start
    # the EF's nonzero eigenvalues in float64: per-sample gradients by one backward pass each
    reference = copy.deepcopy(model).double()
    gradients = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss(reference(x[None].double()), y[None]), list(reference.parameters()))])
        for x, y in zip(*batch)])
    exact = np.sort(torch.linalg.eigvalsh(gradients @ gradients.T / len(gradients)).numpy())
    top = float(exact[-1])
    for name, spectrum in (("fisher_lanczos", result), ("fisher", dense)):
        found = np.sort(spectrum.eigenvalues)[-len(exact):]
        print(f"{name}: eigenvalue error {float(np.abs(found - exact).max()) / top:.1e} of the "
              f"top against float64 per-sample gradients")
    assert result.trace_interval is not None
    low, high = result.trace_interval
    print(f"fisher_lanczos: {result.num_hvps} products, {seconds:.1f} s, peak "
          f"{(result.peak_memory or 0) / 2**30:.2f} GiB, trace {result.trace:.6f} in "
          f"[{low:.6f}, {high:.6f}] for {exact.sum():.6f}; fisher {dense_seconds:.1f} s; "
          f"P = {result.num_params:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = {"sweep": sweep, "coverage": coverage, "resnet": resnet}
    parser.add_argument("parts", nargs="*", help=f"what to measure: {', '.join(parts)} "
                        "(default all)")
    chosen = parser.parse_args().parts or list(parts)
    for unknown in set(chosen) - set(parts):
        parser.error(f"unknown part {unknown!r}: choose from {', '.join(parts)}")
    for part in chosen:
        parts[part]()


if __name__ == "__main__":
    main()
