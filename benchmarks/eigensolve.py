"""The dense eigen-solve behind ``fisher`` and ``ggn``: which solver, measured (issue 9).

    python benchmarks/eigensolve.py                  # parts 1 and 2, a few minutes
    python benchmarks/eigensolve.py --skip-grams     # part 1 only
    OMP_NUM_THREADS=2 python benchmarks/eigensolve.py --other   # part 3 only

1. Float64 eigenvalues of a float32 Gram-like matrix per size: torch (its MKL) on one thread, as
   ``hessrank.spectrum.dense`` runs it up to 2048, against scipy's ``dsyevd`` (the OpenBLAS of
   the scipy wheels) held to one thread by threadpoolctl. Paired rounds in this one process;
   medians of the per-round ratios.
2. The benchmark's own Grams (MLP 784-512-512-10, n = 512, float32: ``fisher`` 512 x 512,
   ``ggn`` 4608 x 4608), on two threads: the float64 ``eigvalsh`` today, float32 ``eigvalsh`` and
   ``eigh``, one float64 ``m^3`` product (each of the two a residual check needs); the float32
   errors against float64 and the certificate a float32 ``eigh`` could give: with
   ``R = K V - V diag(lambda)`` and ``E = V^T V - I``, every eigenvalue lies within
   ``(||R||_2 + 2 (1 - sqrt(1 - ||E||_2)) max|lambda|) / sqrt(1 - ||E||_2)`` (Weyl's inequality on
   ``Q^T K Q`` with ``Q`` the polar factor of ``V``). Norms here are exact (``||R||_2`` by power
   iteration, a lower estimate, so the bound shown is a lower estimate too).
3. ``--other``: the 512 x 512 solve on torch's two threads and on NumPy's OpenBLAS (its own
   threads, as a library call would leave them), each alone and between two of torch's
   two-thread GEMMs (as in a ``fisher`` call); and the second stage of a two-stage solve, the
   band matrix's eigenvalues (SciPy's ``eigvals_banded``), at 512 and 4608.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def paired(cases: dict[str, Callable[[], Any]], rounds: int, base: str) -> dict[str, Any]:
    """Median seconds, median per-round ratio to ``base`` and that ratio's range (``low``,
    ``high``) of each case (after a warm-up), the cases' order rotated round by round."""
    for run in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        names = list(cases)
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    ratios = {name: [a / b for a, b in zip(t, times[base])] for name, t in times.items()}
    return {name: {"seconds": statistics.median(t), "ratio": statistics.median(ratios[name]),
                   "low": min(ratios[name]), "high": max(ratios[name])}
            for name, t in times.items()}


def solver_sizes(sizes: list[int], rounds: int) -> dict[str, Any]:
    import scipy.linalg
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    out = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in sizes:
            f = torch.randn(m, m + 8, generator=torch.Generator().manual_seed(0))
            gram = (f @ f.T).double()  # a float32 Gram, widened

            def scipy_one_thread(gram: torch.Tensor = gram) -> Any:
                with blas.limit(limits=1):
                    return scipy.linalg.eigh(gram.numpy(), eigvals_only=True, driver="evd",
                                             check_finite=False)

            out[m] = paired({"torch_1t": lambda gram=gram: torch.linalg.eigvalsh(gram),
                             "scipy_evd_1t": scipy_one_thread}, rounds, "torch_1t")
            print(f"m = {m}: torch 1 thread {out[m]['torch_1t']['seconds'] * 1e3:.1f} ms, scipy "
                  f"evd 1 thread {out[m]['scipy_evd_1t']['seconds'] * 1e3:.1f} ms, ratio "
                  f"{out[m]['scipy_evd_1t']['ratio']:.2f}", flush=True)
    finally:
        torch.set_num_threads(previous)
    return out


def benchmark_grams() -> dict[int, torch.Tensor]:
    """The float32 Grams ``fisher`` and ``ggn`` solve on the benchmark MLP (captured)."""
    import run

    import hessrank
    import hessrank.estimators.gram as gram_module

    caught: dict[int, torch.Tensor] = {}
    solve = gram_module.symmetric_eigenvalues

    def capture(matrix: torch.Tensor) -> np.ndarray:
        caught.setdefault(matrix.shape[0], matrix.clone())
        return solve(matrix)

    spec = run.mlp_spec("hessrank")
    model, (x, y) = run.build_model(spec), run.build_batch(spec)
    gram_module.symmetric_eigenvalues = capture  # type: ignore[assignment]
    try:
        for method in ("fisher", "ggn"):
            hessrank.effective_rank(model, nn.CrossEntropyLoss(), (x, y), method=method)
    finally:
        gram_module.symmetric_eigenvalues = solve  # type: ignore[assignment]
    return caught


def float32_study(gram: torch.Tensor, rounds: int) -> dict[str, Any]:
    m = gram.shape[0]
    k64 = gram.double()
    v64 = torch.linalg.eigh(gram)[1].double()
    timing = paired({"f64_eigvalsh": lambda: torch.linalg.eigvalsh(k64),
                     "f32_eigvalsh": lambda: torch.linalg.eigvalsh(gram),
                     "f32_eigh": lambda: torch.linalg.eigh(gram),
                     "f64_product": lambda: k64 @ v64}, rounds, "f64_eigvalsh")
    reference = torch.linalg.eigvalsh(k64)
    top = reference.abs().max().item()
    values32 = torch.linalg.eigvalsh(gram).double()
    lam, vectors = torch.linalg.eigh(gram)
    lam, vectors = lam.double(), vectors.double()
    residual = k64 @ vectors - vectors * lam
    defect = vectors.T @ vectors - torch.eye(m, dtype=torch.float64)
    x = torch.randn(m, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(30):
        x = residual.T @ (residual @ x)
        x /= x.norm()
    r2 = (residual @ x).norm().item()
    e2 = torch.linalg.eigvalsh(defect).abs().max().item()
    bound = (r2 + 2 * (1 - (1 - e2) ** 0.5) * lam.abs().max().item()) / (1 - e2) ** 0.5
    out = {"timing": timing,
           "f32_eigvalsh_error": ((values32 - reference).abs().max() / top).item(),
           "f32_eigh_error": ((lam - reference).abs().max() / top).item(),
           "residual_norm": r2 / top, "orthogonality_defect": e2, "certificate": bound / top}
    print(f"m = {m} (2 threads): " + ", ".join(
        f"{name} {t['seconds']:.3f} s ({t['ratio']:.2f}x)" for name, t in timing.items()))
    print(f"  float32 error / top: eigvalsh {out['f32_eigvalsh_error']:.2e}, eigh "
          f"{out['f32_eigh_error']:.2e}; ||R||_2 / top >= {r2 / top:.2e}, ||E||_2 = {e2:.2e}, "
          f"certificate / top >= {bound / top:.2e}", flush=True)
    return out


def other_solvers(rounds: int) -> dict[str, float]:
    """Part 3: median milliseconds of each case (see the module docstring)."""
    import scipy.linalg

    torch.set_num_threads(2)
    f = torch.randn(512, 900, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram, single = f @ f.T, f.float()
    array = gram.numpy()

    def one_thread() -> None:
        torch.set_num_threads(1)
        torch.linalg.eigvalsh(gram)
        torch.set_num_threads(2)

    def between_gemms(solve: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            single @ single.T
            solve()
            single @ single.T
        return run

    cases: dict[str, Callable[[], Any]] = {
        "torch 1 thread": one_thread, "torch 2 threads": lambda: torch.linalg.eigvalsh(gram),
        "numpy (OpenBLAS threads)": lambda: np.linalg.eigvalsh(array),
        "GEMM, torch 1 thread, GEMM": between_gemms(one_thread),
        "GEMM, numpy, GEMM": between_gemms(lambda: np.linalg.eigvalsh(array))}
    generator = np.random.default_rng(0)
    for size, width in ((512, 8), (512, 32), (4608, 16), (4608, 32)):
        band = generator.standard_normal((width + 1, size))
        cases[f"eigvals_banded {size}, bandwidth {width}"] = (
            lambda band=band: scipy.linalg.eigvals_banded(band, check_finite=False))
    out = {}
    for name, case in cases.items():
        case()  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            case()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times) * 1e3
        print(f"{name}: {out[name]:.1f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,512,1024,1536,2048")
    ap.add_argument("--rounds", type=int, default=11, help="paired rounds per size (part 1)")
    ap.add_argument("--gram-rounds", type=int, default=3, help="paired rounds per Gram (part 2)")
    ap.add_argument("--skip-grams", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--other", action="store_true", help="part 3 alone")
    args = ap.parse_args()
    if args.other:
        results_other = other_solvers(args.rounds)
        if args.out:
            Path(args.out).write_text(json.dumps(results_other, indent=1))
        return
    results: dict[str, Any] = {"sizes": solver_sizes([int(s) for s in args.sizes.split(",")],
                                                     args.rounds)}
    if not args.skip_grams:
        torch.set_num_threads(2)
        results["grams"] = {m: float32_study(g, args.gram_rounds)
                            for m, g in sorted(benchmark_grams().items())}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
