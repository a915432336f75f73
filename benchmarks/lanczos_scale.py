"""Lanczos solver benchmark: accuracy against the exact Hessian spectrum, and cost at P = 10^7.

``accuracy``: MLPs small enough for a dense float64 Hessian (shipped digits and synthetic data;
ReLU, tanh, GELU; at initialisation and trained), or with ``--cases architectures`` a CNN, a
ResNet, a GRU and a transformer layer on the digits;
:func:`hessrank.spectrum.lanczos.lanczos_spectrum` on the Hessian operator with a budget of
``P / 3`` products, against the exact eigenvalues; prints a markdown table.

``interval-parts``: what makes up the srank interval's width (the P = 682 rows of ``accuracy``
and one P = 1482 row): the resolution part alone (Chebyshev-Markov-Stieltjes at the estimate's
cut), the sampling part alone (the parametric bootstrap without it), and the sampling spread a
perfectly resolved quadrature with the same deflation would still have (exact eigenpairs, 200
Rademacher probes).

``scale``: the MLP 784-2789-2789-10 (P = 10^7) of ``run.py`` on 256 synthetic 28 x 28 inputs;
times a gradient (the median of three calls before the solver and three after), one
Hessian-vector product and the whole solver (per product, with the page faults and system time
of its run: fresh memory the kernel hands out page by page), and reports the peak resident
memory of the process. Run it alone, on one thread; ``PYTHONPATH=<another tree>`` times that
tree's library, to alternate two in paired runs::

    OMP_NUM_THREADS=1 python benchmarks/lanczos_scale.py accuracy
    OMP_NUM_THREADS=1 python benchmarks/lanczos_scale.py null-space
    OMP_NUM_THREADS=1 python benchmarks/lanczos_scale.py interval-parts
    OMP_NUM_THREADS=1 python benchmarks/lanczos_scale.py scale
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hessrank.cli import presets
from hessrank.curvature.hessian import HessianOperator, dense_hessian
from hessrank.problem import build_problem
from hessrank.ranks import default_rtol, spectral_ranks, srank
from hessrank.spectrum import lanczos
from hessrank.spectrum.dense import symmetric_eigenvalues
from hessrank.spectrum.lanczos import lanczos_spectrum


@dataclass(frozen=True)
class AccuracyCase:
    """A model on a seeded batch, optionally trained first (full-batch Adam): a CLI preset
    (``mlp``, ``cnn``, ``resnet``; depth 2) or, on the digits' 8 rows of 8 pixels as a sequence,
    ``gru`` (one ``nn.GRU`` layer, the last state to a linear head) or ``transformer`` (a linear
    embedding, one ``nn.TransformerEncoderLayer`` with 2 heads, mean pooling, a linear head)."""

    data: str
    activation: str
    width: int = 16
    samples: int = 128
    train_steps: int = 0
    model: str = "mlp"

    def label(self) -> str:
        trained = f", trained {self.train_steps} steps" if self.train_steps else ""
        kind = "" if self.model == "mlp" else f"{self.model} "
        return f"{kind}{self.data} {self.activation} w{self.width} n{self.samples}{trained}"


ACCURACY_CASES = [
    *(AccuracyCase(data, activation) for data in ("digits", "synthetic")
      for activation in ("relu", "tanh", "gelu")),
    *(AccuracyCase("digits", activation, train_steps=300) for activation in ("relu", "tanh")),
    *(AccuracyCase("digits", activation, width=8, samples=64) for activation in ("tanh", "gelu")),
]

#: Architectures other than MLPs (``--cases architectures``), P = 1,158 to 1,954.
ARCHITECTURE_CASES = [
    AccuracyCase("digits", "relu", width=8, samples=96, model="cnn"),
    AccuracyCase("digits", "relu", width=6, samples=96, model="resnet"),
    AccuracyCase("digits", "tanh", width=14, samples=96, model="gru"),
    AccuracyCase("digits", "relu", width=12, samples=96, model="transformer"),
]


class _Rows(nn.Module):
    """A sequence model over the rows of ``[n, 1, H, W]`` images: ``[n, H, W]`` in."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.flatten(0, 1).reshape(images.shape[0], *images.shape[2:]))


class _GRU(nn.Module):
    def __init__(self, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(features, width, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(rows)[0][:, -1])


class _Transformer(nn.Module):
    def __init__(self, features: int, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.layer = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(rows)).mean(dim=1))


def _case_model(case: AccuracyCase, input_shape: tuple[int, ...], classes: int,
                seed: int) -> nn.Module:
    if case.model in presets.PRESETS:
        return presets.build_model(
            case.model, input_shape=input_shape, num_classes=classes,
            activation=case.activation, width=case.width, depth=2, seed=seed,
            dtype=torch.float32, device="cpu", weights=None)
    sequence = {"gru": _GRU, "transformer": _Transformer}[case.model]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _Rows(sequence(input_shape[-1], case.width, classes)).eval()


def hessian_operator(case: AccuracyCase, seed: int = 0) -> HessianOperator:
    """The Hessian operator of ``case``'s model with cross-entropy on its batch."""
    dataset = presets.load_data(case.data, samples=case.samples, seed=seed)
    model = _case_model(case, tuple(dataset.inputs.shape[1:]), dataset.num_classes, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(case.train_steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(dataset.inputs), dataset.targets).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    problem = build_problem(model, nn.CrossEntropyLoss(), (dataset.inputs, dataset.targets),
                            None, "eval")
    return HessianOperator(problem)


def accuracy(seeds: int, threshold: float, runs: int, cases: list[AccuracyCase],
             summary: bool = False) -> None:
    """Print the accuracy table (errors relative to the exact values): a row per case and seed,
    or with ``summary`` a row per case over its seeds (worst errors, intervals that contain the
    exact value, the trace's included).

    ``runs`` splits the ``P / 3`` products into that many independent Lanczos runs (through the
    solver's basis-memory cap), to compare one long run with several short ones.
    """
    if summary:
        print("| model | P | seeds | max srank err | max numerical err | max trace err / sum abs "
              "| max srank interval width / srank | intervals containing the exact srank, "
              "numerical rank, trace |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print("| model | P | exact srank | srank err | srank interval (width / srank) | "
              "exact numerical | numerical err | numerical interval | trace err / sum abs | "
              "sum abs err |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        operator = hessian_operator(case)
        dim = operator.dim
        exact = symmetric_eigenvalues(dense_hessian(operator, 256))
        rtol = default_rtol(dim, float(torch.finfo(torch.float32).eps))
        truth = spectral_ranks(exact, threshold, rtol)
        mass = float(np.abs(exact).sum())
        worst = {"srank": 0.0, "numerical": 0.0, "trace": 0.0, "width": 0.0}
        contained = {"srank": 0, "numerical": 0, "trace": 0}
        for seed in range(seeds):
            result = lanczos_spectrum(operator, max_products=dim // 3, threshold=threshold,
                                      seed=seed, max_basis_bytes=dim // 3 // runs * dim * 4)
            ranks = spectral_ranks(result.eigenvalues, threshold, rtol, result.weights)
            low, high = result.rank_interval
            numerical_low, numerical_high = result.numerical_interval
            errors = {"srank": ranks["srank"] / truth["srank"] - 1,
                      "numerical": ranks["numerical"] / truth["numerical"] - 1,
                      "trace": (result.trace - exact.sum()) / mass,
                      "width": (high - low) / truth["srank"]}
            for name, error in errors.items():
                worst[name] = max(worst[name], abs(error))
            for name, (value, (bottom, top)) in {
                    "srank": (truth["srank"], result.rank_interval),
                    "numerical": (truth["numerical"], result.numerical_interval),
                    "trace": (exact.sum(), result.trace_interval)}.items():
                contained[name] += bottom <= value <= top
            if summary:
                continue
            print(
                f"| {case.label()}, seed {seed} | {dim} | {truth['srank']:.0f} | "
                f"{errors['srank']:+.1%} | [{low:.0f}, {high:.0f}] "
                f"({errors['width']:.0%}, {_contains(low, truth['srank'], high)}) | "
                f"{truth['numerical']:.0f} | {errors['numerical']:+.1%} | "
                f"[{numerical_low:.0f}, {numerical_high:.0f}] "
                f"({_contains(numerical_low, truth['numerical'], numerical_high)}) | "
                f"{errors['trace']:+.1%} | "
                f"{float(np.abs(result.eigenvalues) @ result.weights) / mass - 1:+.1%} |"
            )
        if summary:
            print(f"| {case.label()} | {dim} | {seeds} | {worst['srank']:.1%} | "
                  f"{worst['numerical']:.1%} | {worst['trace']:.1%} | {worst['width']:.0%} | "
                  f"{contained['srank']}, {contained['numerical']}, {contained['trace']} |")
    print(f"\nbudget: P // 3 products in {runs} run(s); threshold {threshold}; "
          "numerical rtol = P eps32")


def _contains(low: float, value: float, high: float) -> str:
    return "contains" if low <= value <= high else "**misses**"


def seconds(work) -> float:
    """Wall time of ``work()``, queued GPU work included."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(work, repeats: int) -> float:
    """Median wall time of ``work()`` over ``repeats`` calls."""
    return statistics.median(seconds(work) for _ in range(repeats))


def scale(width: int, products: int, samples: int, paired: bool, device: str) -> None:
    """Time and memory of the solver on an MLP 784 -> width -> width -> 10; with ``paired``, also
    the solver with full reorthogonalisation at every step (same process). On a GPU the memory
    is the peak of allocated device memory, on the CPU the process's peak resident memory."""
    dataset = presets.load_data("synthetic", samples=samples, seed=0, image_size=28,
                                device=device)
    model = presets.build_model(
        "mlp", input_shape=(1, 28, 28), num_classes=10, activation="relu", width=width, depth=2,
        seed=0, dtype=torch.float32, device=device, weights=None,
    )
    problem = build_problem(model, nn.CrossEntropyLoss(), (dataset.inputs, dataset.targets),
                            None, "eval")
    params = list(model.parameters())

    def gradient() -> None:
        torch.autograd.grad(problem.loss(), params)

    gradient_times = [seconds(gradient) for _ in range(3)]
    operator = HessianOperator(problem)
    probe = torch.ones(1, operator.dim, device=device)
    product_seconds = median_seconds(lambda: operator.matmat(probe), 3)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    lanczos_spectrum(operator, max_products=5)  # warm-up: first-call costs (GPU libraries)
    runs = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    solver_seconds = seconds(lambda: runs.append(lanczos_spectrum(operator, max_products=products)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    result = runs[0]
    per_product = solver_seconds / result.num_products
    faults = (after.ru_minflt - before.ru_minflt) / result.num_products
    system = (after.ru_stime - before.ru_stime) / result.num_products
    gradient_seconds = statistics.median(gradient_times + [seconds(gradient) for _ in range(3)])
    full_per_product = None
    if paired:
        # Alternate with runs that remove every overlap (threshold 0: the previous full
        # reorthogonalisation), in this process, so that load drift hits both alike.
        semi_times, full_times = [per_product], []
        default_fraction = lanczos.ORTHOGONALITY_FRACTION
        for fraction, times in [(0.0, full_times), (default_fraction, semi_times),
                                (0.0, full_times)]:
            lanczos.ORTHOGONALITY_FRACTION = fraction
            try:
                times.append(seconds(lambda: lanczos_spectrum(operator, max_products=products))
                             / result.num_products)
            finally:
                lanczos.ORTHOGONALITY_FRACTION = default_fraction
        print(f"per product, semi-orthogonal runs {np.round(semi_times, 3)} s, full "
              f"{np.round(full_times, 3)} s")
        per_product = statistics.median(semi_times)
        full_per_product = statistics.median(full_times)
    if cuda:
        peak, where = torch.cuda.max_memory_allocated(), f"{torch.cuda.get_device_name()} memory"
    else:
        peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "resident memory"
    print(f"P = {operator.dim:,}, {samples} samples, device {device}, "
          f"torch threads = {torch.get_num_threads()}")
    print(f"gradient                 {gradient_seconds:.3f} s")
    print(f"Hessian-vector product   {product_seconds:.3f} s  "
          f"({product_seconds / gradient_seconds:.2f}x gradient)")
    print(f"solver, per product      {per_product:.3f} s  "
          f"({per_product / gradient_seconds:.2f}x gradient; {result.num_products} products, "
          f"first timed run {solver_seconds:.1f} s; {faults:,.0f} page faults and "
          f"{system:.3f} s system time a product)")
    if full_per_product is not None:
        print(f"full reorthogonalisation {full_per_product:.3f} s  "
              f"({full_per_product / gradient_seconds:.2f}x gradient; semi-orthogonal / full = "
              f"{per_product / full_per_product:.2f})")
    print(f"peak {where:<20}{peak / 2**30:.2f} GiB")
    print(f"top Ritz values          {np.array2string(result.ritz_values[:5], precision=4)}")
    print("notes: " + "; ".join(result.notes))


class _Complement:
    """The operator restricted to the orthogonal complement of ``null`` (``[k, P]``
    orthonormal rows): ``[P - k]`` coordinates in an orthonormal basis of it (float64)."""

    def __init__(self, operator: HessianOperator, null: torch.Tensor) -> None:
        dim = operator.dim
        generator = torch.Generator().manual_seed(0)
        spanning = torch.cat([null.T, torch.randn(dim, dim, generator=generator,
                                                  dtype=torch.float64)], dim=1)
        self.basis = torch.linalg.qr(spanning)[0][:, len(null):dim]  # [P, P - k]
        self.operator, self.dim = operator, dim - len(null)
        self.dtype, self.device = operator.dtype, operator.device

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        full = (vectors.double() @ self.basis.T).to(self.operator.dtype)
        return (self.operator.matmat(full).double() @ self.basis).to(vectors.dtype)


def input_null_space(case: AccuracyCase, operator: HessianOperator, seed: int) -> torch.Tensor:
    """``[k, P]`` orthonormal directions ``e_a u^T`` of the first Linear weight (``[width, d]``,
    the first parameter) with ``u`` in the null space of the batch's flattened inputs: the
    loss is constant along them for every value of the other parameters, so they are exact null
    directions of the Hessian (``width x (d - rank)`` of them)."""
    inputs = presets.load_data(case.data, samples=case.samples, seed=seed).inputs
    flat = inputs.reshape(len(inputs), -1).double()
    _, values, right = torch.linalg.svd(flat)
    null = right[int((values > 1e-10 * values[0]).sum()):]  # [d - rank, d]
    width, d = operator.params[0].shape
    directions = torch.zeros(width * len(null), operator.dim, dtype=torch.float64)
    for a in range(width):
        directions[a * len(null):(a + 1) * len(null), a * d:(a + 1) * d] = null
    return directions


def null_space(seeds: int, threshold: float) -> None:
    """The P = 682 rows of the accuracy table, and the same with the Lanczos run restricted to
    the complement of the first layer's input null space (its eigenvalues then added back as
    exact zeros): does deflating that structural null space help the numerical rank?"""
    print("| model, seed | P | exact null directions (Hessian on them / max) | numerical err, "
          "plain | deflated | srank err, plain | deflated |")
    print("|---|---|---|---|---|---|---|")
    for case in ACCURACY_CASES:
        if case.width != 8:
            continue
        operator = hessian_operator(case)
        hessian = dense_hessian(operator, 256).double()
        exact = symmetric_eigenvalues(hessian)
        rtol = default_rtol(operator.dim, float(torch.finfo(torch.float32).eps))
        truth = spectral_ranks(exact, threshold, rtol)
        null = input_null_space(case, operator, seed=0)
        residual = float((null @ hessian).abs().max() / hessian.abs().max())
        restricted = _Complement(operator, null)
        for seed in range(seeds):
            errors = []
            for target in (operator, restricted):
                result = lanczos_spectrum(target, max_products=operator.dim // 3,
                                          threshold=threshold, seed=seed, rtol=rtol)
                ranks = spectral_ranks(result.eigenvalues, threshold, rtol, result.weights)
                errors.append((ranks["numerical"] / truth["numerical"] - 1,
                               ranks["srank"] / truth["srank"] - 1))
            print(f"| {case.label()}, seed {seed} | {operator.dim} | {len(null)} ({residual:.0e}) "
                  f"| {errors[0][0]:+.1%} | {errors[1][0]:+.1%} | {errors[0][1]:+.1%} "
                  f"| {errors[1][1]:+.1%} |")


#: The rows of ``interval-parts``: the two P = 682 cases of ``accuracy`` and one P = 1482 case.
INTERVAL_CASES = [ACCURACY_CASES[-2], ACCURACY_CASES[-1], ACCURACY_CASES[0]]


def interval_parts(seeds: int, threshold: float, probes: int = 200) -> None:
    """Print the srank interval's width and its two parts at ``P // 3`` products, relative to
    the exact srank, for :data:`INTERVAL_CASES` (one Lanczos run each, as ``accuracy`` makes)."""
    print("| model | P | exact srank | srank err | interval width | resolution part alone | "
          "sampling part alone | sampling at perfect resolution |")
    print("|---|---|---|---|---|---|---|---|")
    for case in INTERVAL_CASES:
        operator = hessian_operator(case)
        dim = operator.dim
        exact, vectors = np.linalg.eigh(dense_hessian(operator, 256).double().cpu().numpy())
        truth = srank(exact, threshold)
        eps = float(torch.finfo(torch.float32).eps)
        rtol = default_rtol(dim, eps)
        for seed in range(seeds):
            start = lanczos.rademacher(dim, torch.Generator().manual_seed(seed), operator.device,
                                       torch.float32)
            alpha, beta, last_beta, _ = lanczos.lanczos_run(operator, start, dim // 3)
            quadrature, _ = lanczos._deflated_quadrature(
                lanczos._ritz_pairs(alpha, beta, last_beta), dim, last_beta)
            nodes, weights = quadrature.nodes, quadrature.weights
            estimate = srank(nodes, threshold, weights)
            low, high = lanczos._intervals([quadrature], threshold, rtol, seed, eps, dim).srank
            (bottom,), (top,) = lanczos._count_bounds(
                quadrature, weights[None], lanczos._srank_cuts(nodes, weights[None], threshold))
            resolution = max(estimate, top) - min(estimate, bottom)
            draws = lanczos._bootstrap_weights(quadrature, lanczos.BOOTSTRAP_DRAWS,
                                               np.random.default_rng(seed))
            sampled = [srank(nodes, threshold, w) for w in draws]
            sampling = float(np.quantile(sampled, 0.975) - np.quantile(sampled, 0.025))
            perfect = _perfect_resolution_spread(exact, vectors, nodes[quadrature.fixed],
                                                 threshold, probes, seed)
            print(f"| {case.label()}, seed {seed} | {dim} | {truth:.0f} | "
                  f"{estimate / truth - 1:+.1%} | {(high - low) / truth:.0%} | "
                  f"{resolution / truth:.0%} | {sampling / truth:.0%} | {perfect / truth:.0%} |")
    print(f"\nbudget: P // 3 products in one run; threshold {threshold}; widths relative to "
          "the exact srank; the sampling columns span 2.5 % to 97.5 %")


def _perfect_resolution_spread(exact: np.ndarray, vectors: np.ndarray, deflated: np.ndarray,
                               threshold: float, probes: int, seed: int) -> float:
    """The 95 % spread of a one-probe srank whose quadrature resolves every eigenvalue: the
    exact eigenvalues nearest the run's deflated Ritz values weigh 1, the others
    ``(q_i . z)^2`` for a Rademacher ``z``, rescaled to the free total (as the solver's ratio
    estimator does)."""
    fixed = np.zeros(len(exact), dtype=bool)
    fixed[[int(np.argmin(np.abs(exact - value))) for value in deflated]] = True
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(probes):
        free = (vectors[:, ~fixed].T @ rng.choice([-1.0, 1.0], len(exact))) ** 2
        weights = np.ones(len(exact))
        weights[~fixed] = (~fixed).sum() * free / free.sum()
        values.append(srank(exact, threshold, weights))
    return float(np.quantile(values, 0.975) - np.quantile(values, 0.025))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    acc = sub.add_parser("accuracy", help="errors against the exact spectrum at P/3 products")
    acc.add_argument("--seeds", type=int, default=2)
    acc.add_argument("--threshold", type=float, default=0.99)
    acc.add_argument("--runs", type=int, default=1, help="split the budget into this many runs")
    acc.add_argument("--cases", choices=("mlp", "architectures"), default="mlp",
                     help="the MLPs (default) or a CNN, a ResNet, a GRU and a transformer")
    acc.add_argument("--summary", action="store_true",
                     help="one row per case over its seeds instead of a row per seed")
    deflate = sub.add_parser("null-space", help="the P = 682 rows with the first layer's input "
                             "null space deflated")
    deflate.add_argument("--seeds", type=int, default=2)
    deflate.add_argument("--threshold", type=float, default=0.99)
    parts = sub.add_parser("interval-parts", help="the srank interval's width and its parts "
                           "(P = 682 and one P = 1482 case)")
    parts.add_argument("--seeds", type=int, default=2)
    parts.add_argument("--threshold", type=float, default=0.99)
    big = sub.add_parser("scale", help="time and peak memory at P = 10^7")
    big.add_argument("--width", type=int, default=2789)  # run.py's P = 10^7 MLP
    big.add_argument("--products", type=int, default=100)
    big.add_argument("--samples", type=int, default=256)
    big.add_argument("--paired", action="store_true",
                     help="alternate with full reorthogonalisation at every step (2 runs each); "
                          "per product = median")
    big.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    if args.mode == "accuracy":
        accuracy(args.seeds, args.threshold, args.runs,
                 ACCURACY_CASES if args.cases == "mlp" else ARCHITECTURE_CASES, args.summary)
    elif args.mode == "null-space":
        null_space(args.seeds, args.threshold)
    elif args.mode == "interval-parts":
        interval_parts(args.seeds, args.threshold)
    else:
        scale(args.width, args.products, args.samples, args.paired, args.device)


if __name__ == "__main__":
    main()
