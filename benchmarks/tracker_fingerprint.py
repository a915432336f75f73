"""What the tracker's update fingerprint costs a ``step(step=...)``: reading it
(``hessrank.tracker._versions``) and comparing it with the last (``_same_versions``), against
the former reading, one copy and one comparison a parameter, paired in one process (the median
of ``--repeats`` alternating rounds).

Usage::

    python benchmarks/tracker_fingerprint.py --tensors 2000 --side 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from hessrank.tracker import FINGERPRINT_ENTRIES, _same_versions, _versions


def _per_parameter(model: nn.Module) -> list[torch.Tensor]:
    """The former reading: a copy of each parameter's entries."""
    return [p.detach().reshape(-1)[::max(1, p.numel() // FINGERPRINT_ENTRIES)].clone()
            for p in model.parameters()]


def _same_per_parameter(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all()
               for a, b in zip(first, second))


def _seconds(read, same, model: nn.Module) -> float:
    last = read(model)
    started = time.perf_counter()
    now = read(model)
    same(last, now)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = nn.ParameterList([nn.Parameter(torch.randn(args.side, args.side))
                              for _ in range(args.tensors)])
    rounds: dict[str, list[float]] = {"per parameter": [], "joined": []}
    for _ in range(args.repeats):
        rounds["per parameter"].append(_seconds(_per_parameter, _same_per_parameter, model))
        rounds["joined"].append(_seconds(_versions, _same_versions, model))
    medians = {name: statistics.median(times) for name, times in rounds.items()}
    for name, seconds in medians.items():
        print(f"{name:>14}: {seconds * 1e3:7.2f} ms a step ({args.tensors} tensors of "
              f"{args.side}x{args.side})")
    print(f"{'ratio':>14}: {medians['per parameter'] / medians['joined']:.1f}x")


if __name__ == "__main__":
    main()
