"""How much training seeds as one batched computation gains over training them one after another.

    python examples/plasticity/bench_batching.py [--seeds 1 5 15] [--epochs 5] [--threads 1]

Trains the main setting's MLP (784-128-128-10, Adam, batch 32) on one task of 600 synthetic
MNIST-shaped samples, once with all S seeds batched and once as S single-seed runs, and prints
the wall time of each and the ratio. No curvature is measured: this is the training loop alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make examples/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plasticity.experiment import COUNT, Config, Trainer
from plasticity.problems import Problem, SetupError, synthetic_pool


def train_seconds(seeds: list[int], problem: Problem, epochs: int) -> float:
    """Wall time of one task of training for ``seeds`` batched."""
    cfg = Config(problem="synthetic", num_samples=600, epochs=epochs, seeds=seeds, hess_methods=[])
    trainer = Trainer(cfg, problem)
    task = problem.task(seeds, 0)
    began = time.perf_counter()
    trainer.train_task(task, 0)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 5, 15], help="seed counts")
    p.add_argument("--epochs", type=int, default=5, help="passes over the 600 samples")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    try:  # every count before any training (--seeds 0 had crashed after the warm-up)
        for seeds in args.seeds:
            COUNT.check("--seeds", seeds)
        COUNT.check("--epochs", args.epochs)
        COUNT.check("--threads", args.threads)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    problem = Problem(synthetic_pool(600, 784, 10, 0), "random_label")
    train_seconds([0], problem, 1)  # warm-up
    print("seeds  batched_s  sequential_s  speed-up")
    for n in args.seeds:
        seeds = list(range(n))
        batched = train_seconds(seeds, problem, args.epochs)
        sequential = sum(train_seconds([s], problem, args.epochs) for s in seeds)
        print(f"{n:5d}  {batched:9.2f}  {sequential:12.2f}  {sequential / batched:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
