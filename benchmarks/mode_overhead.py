"""The Gram methods' capturing forward under :class:`~hessrank.problem.OperationSizes` (the
torch function mode recording each parameter's sums for the gradient check's tolerance), paired
against the same forward+backward without it, in one process (15 rounds, median ratio)::

    OMP_NUM_THREADS=2 python benchmarks/mode_overhead.py
"""

import statistics
import time

import torch
import torchvision
from torch import nn

from hessrank.problem import OperationSizes


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cases = {
        "mlp 784-512-512-10, n=512": (
            nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10)), torch.randn(512, 784)),
        "resnet18 32x32, n=128": (torchvision.models.resnet18(num_classes=10).eval(),
                                  torch.randn(128, 3, 32, 32)),
    }
    for name, (model, x) in cases.items():
        params = list(model.parameters())
        ratios = []
        for _ in range(15):
            start = time.perf_counter()
            model(x).sum().backward()
            plain = time.perf_counter() - start
            start = time.perf_counter()
            with OperationSizes(params):
                out = model(x)
            out.sum().backward()
            ratios.append((time.perf_counter() - start) / plain)
        print(f"{name}: forward+backward with the mode / without, median of 15 paired: "
              f"{statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
