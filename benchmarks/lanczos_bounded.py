"""Lanczos on operators with a rank bound and repeated eigenvalues: how often the intervals hold.

A GGN (rank at most ``n C'``) or an EF (at most ``n``) of a linear layer under MSE repeats every
eigenvalue ``C`` times (``kron(I_C, X^T X / n)``), and symmetric models repeat theirs: one probe
cannot count the copies, and the counts it samples can exceed what the bound allows. This script
counts, over seeds and budgets, how often the 95 % intervals of the trace, the srank and the
numerical rank hold the exact values, with the mean ``|srank error|``:

- ``operators``: ``lanczos_spectrum`` on ``LowRankOperator`` (rank bound stated, float32
  products) with repeated eigenvalues, against their stated spectra;
- ``models``: ``ggn_lanczos`` through the public API on linear layers and MLPs' last layers
  under MSE (small n), against the dense ``ggn``;
- ``ordinary``: ``fisher_lanczos`` and ``ggn_lanczos`` on small trained MLPs, whose eigenvalues
  are distinct: what the tests for repeats cost where there are none (the intervals' widths).

    OMP_NUM_THREADS=1 python benchmarks/lanczos_bounded.py [--seeds 40]

The "before" figures of ``benchmarks/README.md`` are this script run with ``PYTHONPATH`` on a
checkout of the older commit (the script itself needs only the public API and
``lanczos_spectrum``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import hessrank
from hessrank.ranks import spectral_ranks
from hessrank.spectrum.lanczos import lanczos_spectrum
from hessrank.spectrum.operator import LowRankOperator

#: name: (nonzero eigenvalues, P)
OPERATORS = {
    "2- to 6-fold, rank 20, P = 80": (np.repeat([10, 6, 3, 1.5, 0.7], [2, 3, 4, 5, 6]), 80),
    "three 3-fold, rank 9, P = 60": (np.repeat([5.0, 2.0, 1.0], [3, 3, 3]), 60),
    "a 4-fold top and 12 simple, P = 100": (
        np.concatenate([[8.0] * 4, np.exp(-np.arange(12) / 3.0)]), 100),
    "eight 2-fold, rank 16, P = 50": (np.repeat(np.exp(-np.arange(8) / 2.0), 2), 50),
    "a 3-fold top and 7 simple, P = 70": (
        np.concatenate([[3.0] * 3, [2, 1.7, 1.2, 0.9, 0.5, 0.3, 0.2]]), 70),
}
OPERATOR_BUDGETS = (8, 16, 27, 35)
RTOL = 1e-4


def _held(interval: tuple[float, float], value: float) -> bool:
    slack = 1e-6 * max(1.0, abs(value))
    return interval[0] - slack <= value <= interval[1] + slack


def _row(name: str, budget: int, outcomes: list[tuple[bool, bool, bool, float]]) -> str:
    held = np.array([outcome[:3] for outcome in outcomes]).sum(axis=0)
    error = float(np.mean([outcome[3] for outcome in outcomes]))
    return (f"| {name} | {budget} | {held[0]} / {len(outcomes)} | {held[1]} | {held[2]} | "
            f"{error:.2f} |")


def operators(seeds: int) -> None:
    for name, (values, dim) in OPERATORS.items():
        values = np.asarray(values, dtype=float)
        full = np.concatenate([values, np.zeros(dim - len(values))])
        exact = spectral_ranks(full, 0.99, RTOL)
        for budget in OPERATOR_BUDGETS:
            outcomes = []
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(1000 + seed)
                basis, _ = torch.linalg.qr(torch.randn(dim, len(values), generator=generator,
                                                       dtype=torch.float64))
                operator = LowRankOperator(basis, torch.tensor(values), dtype=torch.float32)
                result = lanczos_spectrum(operator, max_products=budget, seed=seed, rtol=RTOL)
                estimate = spectral_ranks(result.eigenvalues, 0.99, RTOL, result.weights)
                outcomes.append((_held(result.trace_interval, float(values.sum())),
                                 _held(result.rank_interval, exact["srank"]),
                                 _held(result.numerical_interval, exact["numerical"]),
                                 abs(estimate["srank"] - exact["srank"])))
            print(_row(name, budget, outcomes), flush=True)


def _linear(inputs: int, classes: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return nn.Linear(inputs, classes), (torch.randn(n, inputs), torch.randn(n, classes))


def _last_layer(inputs: int, hidden: int, classes: int, n: int
                ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    model[0].requires_grad_(False)
    return model, (torch.randn(n, inputs) * 2, torch.randn(n, classes))


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "linear 8 -> 4, n = 5 (P = 36, bound 20)": lambda: _linear(8, 4, 5),
    "linear 10 -> 3, n = 6 (P = 33, bound 18)": lambda: _linear(10, 3, 6),
    "linear 14 -> 2, n = 9 (P = 30, bound 18)": lambda: _linear(14, 2, 9),
    "last layer 10 -> 3, n = 7 (P = 33, bound 21)": lambda: _last_layer(5, 10, 3, 7),
    "last layer 12 -> 2, n = 8 (P = 26, bound 16)": lambda: _last_layer(4, 12, 2, 8),
}
MODEL_BUDGETS = (6, 9, 12, 20)


def models(seeds: int) -> None:
    loss = nn.MSELoss()
    for name, make in MODELS.items():
        model, batch = make()
        exact = hessrank.effective_rank(model, loss, batch, method="ggn")
        for budget in MODEL_BUDGETS:
            outcomes = []
            for seed in range(seeds):
                result = hessrank.effective_rank(model, loss, batch, method="ggn_lanczos",
                                                 seed=seed, lanczos_steps=budget)
                numerical = hessrank.effective_rank(model, loss, batch, method="ggn",
                                                    rtol=result.rtol).ranks["numerical"]
                outcomes.append((_held(result.trace_interval, exact.trace),
                                 _held(result.rank_interval, exact.rank),
                                 _held(result.numerical_interval, numerical),
                                 abs(result.rank - exact.rank)))
            print(_row(name, budget, outcomes), flush=True)


def _trained(layers: Callable[[], list[nn.Module]], n: int, inputs: int, classes: int,
             steps: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A float32 model trained in float64, its layers made after the seed is set, with its
    float32 batch."""
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).double()
    inputs_, labels = torch.randn(n, inputs, dtype=torch.float64), torch.randint(0, classes, (n,))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(inputs_), labels).backward()
        optimiser.step()
    return model.float(), (inputs_.float(), labels)


ORDINARY: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "GELU MLP 6-12-5, n = 24, trained": lambda: _trained(
        lambda: [nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 5)], 24, 6, 5, 40),
    "tanh MLP 6-10-10-4, n = 40, trained": lambda: _trained(
        lambda: [nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 4)],
        40, 6, 4, 60),
    "ReLU MLP 10-16-6, n = 5, trained": lambda: _trained(
        lambda: [nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 6)], 5, 10, 6, 10),
}
ORDINARY_BUDGETS = (11, 24)


def ordinary(seeds: int) -> None:
    print("\n| case | method | products | trace interval held | trace interval width / trace, "
          "median | largest |")
    print("|---|---|---|---|---|---|")
    loss = nn.CrossEntropyLoss()
    for name, make in ORDINARY.items():
        model, batch = make()
        for method in ("fisher_lanczos", "ggn_lanczos"):
            exact = hessrank.effective_rank(model, loss, batch, method=method.split("_")[0])
            for budget in ORDINARY_BUDGETS:
                results = [hessrank.effective_rank(model, loss, batch, method=method, seed=seed,
                                                   lanczos_steps=budget)
                           for seed in range(seeds)]
                held = sum(_held(r.trace_interval, exact.trace) for r in results)
                widths = [(r.trace_interval[1] - r.trace_interval[0]) / exact.trace
                          for r in results]
                print(f"| {name} | `{method}` | {budget} | {held} / {seeds} | "
                      f"{np.median(widths):.3g} | {max(widths):.3g} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=40)
    seeds = parser.parse_args().seeds
    print("| case | products | trace interval held | srank interval held | numerical rank "
          "interval held | mean abs srank error |")
    print("|---|---|---|---|---|---|")
    operators(seeds)
    models(seeds)
    ordinary(seeds)


if __name__ == "__main__":
    main()
