"""The row Gram ``X X^T`` a triangle of blocks at a time (:mod:`hessrank.curvature.row_gram`)
against the plain product, on the shapes hessrank's rules form: paired, interleaved rounds in
one process, medians of the ratios.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/row_gram.py --rounds 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from hessrank.curvature.row_gram import add_row_gram

#: (rows, columns): the MLP's activation and output-gradient Grams (n = 512), an LSTM block of
#: explicit per-sample gradients (n = 128), a convolution's chunk, and narrow ones that stay plain.
SHAPES = [(512, 784), (512, 512), (512, 4000), (1024, 784), (256, 784), (128, 16362),
          (128, 4096), (512, 256), (512, 10)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(*shape, generator=generator) for shape in SHAPES]
    ratios: dict[tuple[int, int], list[float]] = {shape: [] for shape in SHAPES}
    plain_ms: dict[tuple[int, int], list[float]] = {shape: [] for shape in SHAPES}
    for round_ in range(args.rounds):
        for shape, x in zip(SHAPES, rows):
            times = {}
            for triangle in (False, True) if round_ % 2 else (True, False):  # order alternates
                gram = torch.zeros(shape[0], shape[0])
                start = time.perf_counter()
                if triangle:
                    add_row_gram(gram, x)
                else:
                    gram.addmm_(x, x.T)
                times[triangle] = time.perf_counter() - start
            ratios[shape].append(times[True] / times[False])
            plain_ms[shape].append(times[False] * 1e3)
    print(f"| rows x columns | plain product (ms) | triangle / plain (median of {args.rounds}) |")
    print("|---|---|---|")
    for shape in SHAPES:
        print(f"| {shape[0]} x {shape[1]} | {statistics.median(plain_ms[shape]):.3f} | "
              f"{statistics.median(ratios[shape]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
