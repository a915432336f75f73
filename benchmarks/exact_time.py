"""How close the predictions of float64 eigen-solves come to the solves themselves.

``exact`` refuses a call over ``max_seconds`` before any work, from a prediction: the products
timed on a chunk, and the eigen-solve from a 512 x 512 trial scaled to ``P``
(:func:`hessrank.estimators.base.eigen_solve_seconds`). This times the solve of random symmetric
matrices at a few sizes, with and without eigenvectors, beside the prediction made in the same
process (ratios, not seconds, carry over between machines). With ``--gram``, it times whole
``ggn`` and ``fisher`` calls on an MLP instead, beside the time they predict (their Gram's
eigen-solves, read from the refusal at ``max_seconds=1e-9``; their passes over the model are not
predicted, so a call takes at least its prediction). With ``--lanczos``, whole Lanczos calls
beside their prediction (their products and vector work, for the most products the solver may
spend, their operator's build and symmetry check, and the call's time before the check), and a
ResNet-18's ``lanczos`` of 10 steps, where those fixed costs are most of the call. Each call
is timed under ``max_seconds=1e9``, which makes it time its prediction as a budget does::

    OMP_NUM_THREADS=1 python benchmarks/exact_time.py [--sizes 1024 2048 3290] [--gram|--lanczos]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import hessrank
from hessrank.estimators.base import eigen_solve_seconds
from hessrank.spectrum.dense import symmetric_eigenpairs, symmetric_eigenvalues

#: (method, samples n, MLP widths, options): Gram sizes n C (ggn) and n (fisher), C the last
#: width.
GRAM_CALLS = [("ggn", 100, (20, 64, 10), {}), ("ggn", 200, (20, 64, 10), {}),
              ("ggn", 200, (20, 64, 20), {}), ("ggn", 200, (20, 64, 20), {"eigenvectors": 3}),
              ("ggn", 200, (20, 64, 20), {"per_layer": True}),
              ("fisher", 2048, (20, 64, 10), {})]
#: Lanczos calls on an MLP of P = 159,010: the factor operators' runs end near their rank
#: bound (n, or n C), the Hessian's spends its 640 products on a basis of 640 rows.
LANCZOS_CALLS = [("fisher_lanczos", 16, (784, 200, 10), {}),
                 ("fisher_lanczos", 256, (784, 200, 10), {}),
                 ("ggn_lanczos", 16, (784, 200, 10), {}),
                 ("lanczos", 64, (784, 200, 10), {}),
                 ("lanczos", 8, "resnet18", {"lanczos_steps": 10})]


def _model_batch(n: int, architecture: tuple[int, int, int] | str
                 ) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], str]:
    """An MLP of the given widths, or a torchvision ResNet-18 (10 classes, 32 x 32 images), in
    eval mode, with a batch of ``n`` samples, and its name."""
    torch.manual_seed(0)
    if architecture == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10).eval()
        return model, (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))), "ResNet-18"
    inputs, hidden, classes = architecture
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    return (model, (torch.randn(n, inputs), torch.randint(0, classes, (n,))),
            f"{inputs}-{hidden}-{classes}")


def whole_calls(calls: list[tuple[str, int, tuple[int, int, int] | str, dict]]) -> None:
    """Each call's prediction (read from its refusal at ``max_seconds=1e-9``) beside the call
    (under ``max_seconds=1e9``, after one call of the same method on the model warmed it up)."""
    print("| method | n | model | options | predicted (s) | whole call (s) | call / predicted |")
    print("|---|---|---|---|---|---|---|")
    loss = nn.CrossEntropyLoss()
    for method, n, architecture, options in calls:
        model, batch, name = _model_batch(n, architecture)
        hessrank.effective_rank(model, loss, batch, method=method, **options)  # warm-up
        try:
            hessrank.effective_rank(model, loss, batch, method=method, max_seconds=1e-9,
                                    **options)
            raise RuntimeError("the call was not refused at max_seconds=1e-9")
        except hessrank.BudgetError as refusal:
            predicted = refusal.seconds
        start = time.perf_counter()
        hessrank.effective_rank(model, loss, batch, method=method, max_seconds=1e9, **options)
        measured = time.perf_counter() - start
        shown = ", ".join(f"{key}={value}" for key, value in options.items()) or "-"
        print(f"| {method} | {n} | {name} | {shown} | {predicted:.2f} | "
              f"{measured:.2f} | {measured / predicted:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3290])
    parser.add_argument("--gram", action="store_true",
                        help="time whole ggn / fisher calls against their prediction instead")
    parser.add_argument("--lanczos", action="store_true",
                        help="time whole Lanczos calls against their prediction instead")
    args = parser.parse_args()
    if args.gram or args.lanczos:
        whole_calls(GRAM_CALLS if args.gram else LANCZOS_CALLS)
        return
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    print("| P | eigenvectors | predicted (s) | measured (s) | measured / predicted |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        matrix = torch.randn(size, size, generator=generator, dtype=torch.float64)
        matrix = matrix + matrix.T
        for vectors in (False, True):
            predicted = eigen_solve_seconds(size, device, vectors=vectors)
            start = time.perf_counter()
            (symmetric_eigenpairs if vectors else symmetric_eigenvalues)(matrix)
            measured = time.perf_counter() - start
            print(f"| {size} | {'yes' if vectors else 'no'} | {predicted:.2f} | {measured:.2f} | "
                  f"{measured / predicted:.2f} |", flush=True)


if __name__ == "__main__":
    main()
