"""hessrank against its peers, in one process, as ratios (issue 3).

    python benchmarks/run.py                   # everything (tens of minutes on 2 CPU threads)
    python benchmarks/run.py --quick           # fewer repeats, shorter sweeps
    python benchmarks/run.py --only fisher,ggn # some groups: see GROUPS

Times are medians of repeats measured in this one process. Each timed run of a case is preceded
by a plain forward+backward of the same batch (median of three), and the case's ratio is the
median over repeats of case time / that forward+backward time, so load from other processes on
the machine shows up in both. Peak memory is measured separately: each case runs once more in a
fresh subprocess, which resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``)
after building the model and batch and reports ``VmHWM`` minus the resident set before the call.
A peer case whose predicted memory or time exceeds the caps is skipped and marked with the
prediction. Results go to ``OUT/results.json`` and plots to ``OUT/figures/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # peers.py, and the working tree's hessrank
import peers  # noqa: E402

GROUPS = ("fisher", "ggn", "cnn", "exact", "lanczos", "hvp", "scale", "sweep_n", "sweep_p")
MLP = (784, 512, 512, 10)
SMALL_MLP = (32, 64, 40, 10)
N = 512
SWEEP_NS = (64, 128, 256, 512, 1024, 2048, 4096)
SWEEP_PS = (10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6, 3 * 10**6, 10**7)
SWEEP_P_N = 256
GIB = 2**30

Spec = dict[str, Any]

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


# ----------------------------------------------------------------------------- models and data


def mlp(widths: tuple[int, ...] | list[int]) -> nn.Sequential:
    """ReLU MLP with the given layer widths (input first, classes last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    """The convolution stack of PyTorch's MNIST example with a single linear head (111k params)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, 10),
    )


def mlp_for_params(target: int) -> tuple[int, ...]:
    """Widths 784-h-h-10 whose parameter count is closest to ``target``."""
    def count(h: int) -> int:
        return 785 * h + (h + 1) * h + (h + 1) * 10

    h = max(1, round((-795 + math.sqrt(795**2 + 4 * (target - 10))) / 2))
    h = min((h - 1, h, h + 1), key=lambda w: abs(count(max(w, 1)) - target))
    return (784, max(h, 1), max(h, 1), 10)


def build_model(spec: Spec) -> nn.Module:
    """The model of a case spec, seeded."""
    torch.manual_seed(spec.get("seed", 0))
    return cnn() if spec["model"] == "cnn" else mlp(spec["widths"])


def build_batch(spec: Spec) -> tuple[Tensor, Tensor]:
    """A seeded random batch (inputs, labels) for the case's model."""
    g = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    n = spec["n"]
    shape = (n, 1, 28, 28) if spec["model"] == "cnn" else (n, spec["widths"][0])
    return torch.randn(shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def num_params(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- cases


def hessrank_available() -> bool:
    """Whether the core library's ``effective_rank`` can be imported."""
    try:
        import hessrank
    except ImportError:
        return False
    return hasattr(hessrank, "effective_rank")


def make_case(spec: Spec) -> Callable[[], dict[str, Any]]:
    """Set up a case outside the timed region; return the callable that is timed.

    The callable returns a dict of what the case computed (eigenvalues and extras).
    """
    model, (x, y) = build_model(spec), build_batch(spec)
    tool, opts = spec["tool"], spec.get("opts", {})
    loss = nn.CrossEntropyLoss()

    if tool == "fwd_bwd":
        return lambda: (peers.fwd_bwd(model, x, y), {})[1]
    if tool == "hessrank":
        import hessrank

        def run_hessrank() -> dict[str, Any]:
            res = hessrank.effective_rank(model, loss, (x, y), method=opts["method"],
                                          **opts.get("kwargs", {}))
            return {"eigenvalues": np.asarray(res.eigenvalues), "rank": res.rank,
                    "backend": res.backend, "num_hvps": res.num_hvps,
                    "peak_memory": res.peak_memory, "max_rank": res.max_rank,
                    "numerical_rank": res.ranks.get("numerical")}
        return run_hessrank
    if tool in ("backpack_batchgrad", "backpack_sqrtggn", "vivit"):
        emodel, eloss = peers.extended(model)
        if tool == "backpack_batchgrad":
            return lambda: {"eigenvalues": peers.backpack_batchgrad_gram(emodel, eloss, x, y)}
        if tool == "backpack_sqrtggn":
            return lambda: {"eigenvalues": peers.backpack_sqrtggn_gram(emodel, eloss, x, y)}
        mc = opts["mc_samples"]
        return lambda: {"eigenvalues": peers.vivit_ggn_eigvals(emodel, eloss, x, y, mc)}
    if tool == "vmap_grad":
        return lambda: {"eigenvalues": peers.vmap_grad_gram(model, x, y)}
    if tool == "curvlinops_dense":
        return lambda: {"eigenvalues": peers.curvlinops_dense_eigvalsh(model, x, y)}
    if tool == "curvlinops_eigsh":
        def run_eigsh() -> dict[str, Any]:
            evals, nmv = peers.curvlinops_eigsh(model, x, y, k=opts["k"])
            return {"eigenvalues": evals, "num_hvps": nmv}
        return run_eigsh
    if tool.startswith("pyhessian"):
        ph = peers.PyHessianHVP(model, x, y)
        if tool == "pyhessian_setup":
            return lambda: (ph.setup(), {})[1]
        ph.setup()
        if tool == "pyhessian_hvp":
            v = ph.random_vector()
            return lambda: (ph.hvp(v), {})[1]
        return lambda: {"eigenvalues": np.array([ph.top_eigenvalue()])}
    raise ValueError(f"unknown tool {tool!r}")


def predict(spec: Spec, gflops: float) -> tuple[float, float]:
    """Predicted (peak bytes, seconds) of a peer case, from the sizes it must materialise."""
    model = build_model(spec)
    p, n, c = num_params(model), spec["n"], 10
    big = max(q.numel() for q in model.parameters())
    flop_s = gflops * 1e9
    eig64 = 7e-11  # seconds per n^3 of float64 eigvalsh on this machine (2 threads)
    tool = spec["tool"]
    if tool == "backpack_batchgrad":
        return 1.2 * n * p * 4, 2 * n * n * p / flop_s + 4 * n * p * 4 / 5e9 + eig64 * n**3
    if tool == "vmap_grad":
        return 2.0 * n * p * 4, 2 * n * n * p / flop_s + 8 * n * p * 4 / 5e9 + eig64 * n**3
    if tool == "backpack_sqrtggn":
        m = n * c
        return 1.2 * m * big * 4 + 2 * m * m * 8, 2 * m * m * p / flop_s + eig64 * m**3
    return 0.0, 0.0


# ----------------------------------------------------------------------------- measurement


def fwd_bwd_time(spec: Spec, cache: dict[str, Callable[[], dict[str, Any]]]) -> float:
    """Median of three plain forward+backward passes of the case's model and batch."""
    key = json.dumps({k: spec[k] for k in ("model", "widths", "n", "seed") if k in spec})
    if key not in cache:
        cache[key] = make_case({**spec, "tool": "fwd_bwd", "opts": {}})
        cache[key]()
    run = cache[key]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_case(spec: Spec, repeats: int, budget_s: float,
              base_cache: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    """Median time of a case and median ratio to forward+backward, in this process.

    The first call is a warm-up; it counts as a repeat when it took over 2 s. Repeats stop
    early once ``budget_s`` is spent.
    """
    run = make_case(spec)
    base0 = fwd_bwd_time(spec, base_cache)
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    times, bases = ([first], [base0]) if first > 2.0 else ([], [])
    spent = first
    while len(times) < repeats and (not times or spent + statistics.median(times) < budget_s):
        bases.append(fwd_bwd_time(spec, base_cache))
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    ratios = [t / b for t, b in zip(times, bases, strict=True)]
    return {"seconds": statistics.median(times), "min_seconds": min(times),
            "fwd_bwd_seconds": statistics.median(bases), "ratio": statistics.median(ratios),
            "times": times, "fwd_bwd_times": bases, "repeats": len(times), "result": out}


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def memory_child(spec: Spec) -> None:
    """Subprocess entry: run the case once, print its peak RSS above the pre-call RSS as JSON."""
    torch.set_num_threads(2)
    run = make_case(spec)
    fwd = make_case({**spec, "tool": "fwd_bwd", "opts": {}})
    fwd()  # one-time library initialisation outside the measurement
    import gc

    gc.collect()
    before = vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    peak = vm_kib("VmHWM")
    print(json.dumps({"peak_bytes": max(peak - before, 0) * 1024, "seconds": seconds,
                      "hessrank_peak_memory": out.get("peak_memory")}))


def memory_case(spec: Spec, timeout_s: float) -> dict[str, Any]:
    """Peak resident memory of one run of a case, measured in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--_memory-child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Bench:
    """Runs cases, keeps every number for the JSON, and skips what would not fit."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.repeats = 2 if args.quick else args.repeats
        self.base_cache: dict[str, Callable[[], dict[str, Any]]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.gflops = self.calibrate()

    @staticmethod
    def calibrate() -> float:
        """Measured float32 GEMM rate (GFLOP/s) used to predict peer run times."""
        a, b = torch.randn(1024, 4096), torch.randn(4096, 1024)
        a @ b
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        return 3 * 2 * 1024 * 4096 * 1024 / (time.perf_counter() - t0) / 1e9

    def run(self, name: str, spec: Spec, memory: bool = True) -> dict[str, Any]:
        """Time a case (and measure its memory) unless predicted over the caps."""
        model = build_model(spec)
        entry: dict[str, Any] = {"spec": spec, "num_params": num_params(model)}
        mem, sec = predict(spec, self.gflops)
        if mem or sec:
            entry.update(predicted_bytes=mem, predicted_seconds=sec)
        cap = min(self.args.mem_cap_gb * GIB, 0.7 * available_bytes())
        if mem > cap or sec > self.args.time_cap_s:
            why = (f"would need {mem / GIB:.1f} GB" if mem > cap
                   else f"would take {sec:.0f} s per run")
            entry["skipped"] = f"skipped, {why}"
            print(f"  {name:<34} {entry['skipped']}", flush=True)
            self.results[name] = entry
            return entry
        try:
            entry.update(time_case(spec, self.repeats, self.args.case_budget_s, self.base_cache))
        except Exception as exc:  # a peer that breaks is a result, not a crash of the suite
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  {name:<34} ERROR {entry['error']}", flush=True)
            self.results[name] = entry
            return entry
        if memory and not self.args.no_memory:
            m = memory_case(spec, timeout_s=max(600.0, 20 * entry["seconds"]))
            entry["memory"] = m
        self.results[name] = entry
        peak = entry.get("memory", {}).get("peak_bytes")
        peak_s = f"{peak / 2**20:9.1f} MB" if peak is not None else "       -   "
        print(f"  {name:<34} {entry['seconds']:9.4f} s  x{entry['ratio']:8.2f} fwd+bwd  {peak_s}",
              flush=True)
        return entry


def available_bytes() -> float:
    """Memory the system can still give (psutil), or +inf without psutil."""
    try:
        import psutil
    except ImportError:
        return math.inf
    return float(psutil.virtual_memory().available)


# ----------------------------------------------------------------------------- the suite


def mlp_spec(tool: str, n: int = N, widths: tuple[int, ...] = MLP, **opts: Any) -> Spec:
    """Case spec on an MLP."""
    return {"model": "mlp", "widths": list(widths), "n": n, "seed": 0, "tool": tool,
            "opts": opts}


def hr(method: str, **kwargs: Any) -> dict[str, Any]:
    """Options of a hessrank case."""
    return {"method": method, "kwargs": kwargs}


def suite(b: Bench, groups: set[str], have_hessrank: bool) -> None:
    """Run the selected groups of cases."""
    b.run("fwd_bwd", mlp_spec("fwd_bwd"))

    def hess(name: str, spec: Spec) -> None:
        if have_hessrank:
            b.run(name, spec)

    if "fisher" in groups:
        print("[fisher] MLP 784-512-512-10, n = 512", flush=True)
        hess("hessrank_fisher", mlp_spec("hessrank", **hr("fisher")))
        b.run("vivit_mc1", mlp_spec("vivit", mc_samples=1))
        b.run("backpack_batchgrad", mlp_spec("backpack_batchgrad"))
        b.run("vmap_grad", mlp_spec("vmap_grad"))
    if "ggn" in groups:
        print("[ggn] MLP 784-512-512-10, n = 512, C = 10", flush=True)
        hess("hessrank_ggn", mlp_spec("hessrank", **hr("ggn")))
        b.run("vivit_exact", mlp_spec("vivit", mc_samples=0))
        b.run("backpack_sqrtggn", mlp_spec("backpack_sqrtggn"))
        n_small = 64
        b.run(f"fwd_bwd_n{n_small}", mlp_spec("fwd_bwd", n=n_small))
        hess(f"hessrank_ggn_n{n_small}", mlp_spec("hessrank", n=n_small, **hr("ggn")))
        b.run(f"backpack_sqrtggn_n{n_small}", mlp_spec("backpack_sqrtggn", n=n_small))
    if "cnn" in groups:
        print("[cnn] Conv(1,32,3)-Conv(32,64,3)-MaxPool-Linear(9216,10), n = 512", flush=True)
        cnn_spec = {"model": "cnn", "n": N, "seed": 0, "opts": {}}
        b.run("cnn_fwd_bwd", {**cnn_spec, "tool": "fwd_bwd"})
        hess("cnn_hessrank_fisher", {**cnn_spec, "tool": "hessrank", "opts": hr("fisher")})
        b.run("cnn_backpack_batchgrad", {**cnn_spec, "tool": "backpack_batchgrad"})
        b.run("cnn_vmap_grad", {**cnn_spec, "tool": "vmap_grad"})
    if "exact" in groups:
        print(f"[exact] MLP {'-'.join(map(str, SMALL_MLP))}, n = 512", flush=True)
        b.run("small_fwd_bwd", mlp_spec("fwd_bwd", widths=SMALL_MLP))
        hess("small_hessrank_exact", mlp_spec("hessrank", widths=SMALL_MLP, **hr("exact")))
        b.run("small_curvlinops_dense", mlp_spec("curvlinops_dense", widths=SMALL_MLP))
    if "lanczos" in groups:
        print("[lanczos] MLP 784-512-512-10, n = 512", flush=True)
        hess("hessrank_lanczos", mlp_spec("hessrank", **hr("lanczos")))
        b.run("curvlinops_eigsh_k20", mlp_spec("curvlinops_eigsh", k=20))
    if "hvp" in groups:
        print("[hvp] MLP 784-512-512-10, n = 512", flush=True)
        b.run("pyhessian_setup", mlp_spec("pyhessian_setup"))
        b.run("pyhessian_hvp", mlp_spec("pyhessian_hvp"))
        b.run("pyhessian_top_eigenvalue", mlp_spec("pyhessian_top"))
    if "scale" in groups and have_hessrank:
        print("[scale] fisher at n = 4096 (670k MLP) and n = 256 (10^7-parameter MLP)", flush=True)
        b.run("scale_fwd_bwd_n4096", mlp_spec("fwd_bwd", n=4096))
        b.run("scale_hessrank_fisher_n4096", mlp_spec("hessrank", n=4096, **hr("fisher")))
        big = mlp_for_params(10**7)
        b.run("scale_fwd_bwd_p1e7", mlp_spec("fwd_bwd", n=256, widths=big))
        b.run("scale_hessrank_fisher_p1e7", mlp_spec("hessrank", n=256, widths=big,
                                                     **hr("fisher")))
    if "sweep_n" in groups:
        ns = SWEEP_NS[:5] if b.args.quick else SWEEP_NS
        print(f"[sweep_n] MLP 784-512-512-10, n in {ns}", flush=True)
        for n in ns:
            b.run(f"sweep_n{n}_fwd_bwd", mlp_spec("fwd_bwd", n=n))
            hess(f"sweep_n{n}_hessrank_fisher", mlp_spec("hessrank", n=n, **hr("fisher")))
            b.run(f"sweep_n{n}_backpack_batchgrad", mlp_spec("backpack_batchgrad", n=n))
            b.run(f"sweep_n{n}_vmap_grad", mlp_spec("vmap_grad", n=n))
    if "sweep_p" in groups:
        ps = SWEEP_PS[:5] if b.args.quick else SWEEP_PS
        print(f"[sweep_p] MLP 784-h-h-10, n = {SWEEP_P_N}, P in {ps}", flush=True)
        for p in ps:
            w = mlp_for_params(p)
            tag = f"sweep_p{p:.0e}".replace("+0", "")
            b.run(f"{tag}_fwd_bwd", mlp_spec("fwd_bwd", n=SWEEP_P_N, widths=w))
            hess(f"{tag}_hessrank_fisher", mlp_spec("hessrank", n=SWEEP_P_N, widths=w,
                                                     **hr("fisher")))
            b.run(f"{tag}_backpack_batchgrad", mlp_spec("backpack_batchgrad", n=SWEEP_P_N,
                                                         widths=w))
            b.run(f"{tag}_vmap_grad", mlp_spec("vmap_grad", n=SWEEP_P_N, widths=w))


# ----------------------------------------------------------------------------- targets


def spectrum_gap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Largest difference of the top-``k`` eigenvalues, relative to the top one."""
    k = min(k, len(a), len(b))
    return float(np.max(np.abs(a[:k] - b[:k])) / abs(a[0]))


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each issue-3 target with the measured figure, the threshold and PASS/FAIL."""
    def get(name: str, key: str = "seconds") -> Any:
        e = results.get(name, {})
        return e.get(key)

    def peak(name: str) -> float | None:
        return results.get(name, {}).get("memory", {}).get("peak_bytes")

    def evals(name: str) -> np.ndarray | None:
        r = get(name, "result")
        return None if r is None else r.get("eigenvalues")

    rows: list[dict[str, Any]] = []

    def add(target: str, value: float | None, limit: str, ok: bool | None, note: str = "") -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        rows.append({"target": target, "measured": value, "limit": limit, "status": status,
                     "note": note})

    def ratio(a: str, b: str) -> float | None:
        ta, tb = get(a), get(b)
        return None if ta is None or tb is None else ta / tb

    fr = get("hessrank_fisher", "ratio")
    add("fisher time / fwd+bwd", fr, "<= 4", None if fr is None else fr <= 4)
    r = ratio("hessrank_fisher", "vivit_mc1")
    add("fisher time / ViViT 1-MC GGN eigvals time", r, "<= 1", None if r is None else r <= 1)
    r = ratio("backpack_batchgrad", "hessrank_fisher")
    add("BackPACK BatchGrad+Gram time / fisher time", r, ">= 50", None if r is None else r >= 50)
    r = ratio("vmap_grad", "hessrank_fisher")
    add("vmap(grad)+Gram time / fisher time", r, "(info)", None)
    pk = peak("hessrank_fisher")
    nxp = N * results.get("fwd_bwd", {}).get("num_params", 0) * 4
    add("fisher peak memory / (n x P float32)", None if pk is None else pk / nxp, "< 1",
        None if pk is None else pk < nxp, f"n x P float32 = {nxp / 2**20:.0f} MB")
    a, b = evals("hessrank_fisher"), evals("backpack_batchgrad")
    g = None if a is None or b is None else spectrum_gap(a, b, N)
    add("fisher eigenvalues vs BatchGrad Gram (max rel. gap)", g, "<= 1e-4",
        None if g is None else g <= 1e-4)
    r = ratio("hessrank_ggn", "vivit_exact")
    add("ggn time / ViViT exact GGN eigvals time", r, "<= 1", None if r is None else r <= 1)
    a, b = evals("hessrank_ggn"), evals("vivit_exact")
    g = None if a is None or b is None else spectrum_gap(a, b, N * 9)
    add("ggn eigenvalues vs ViViT exact (max rel. gap, top n(C-1))", g, "<= 1e-4",
        None if g is None else g <= 1e-4, "ViViT solves in float32")
    r = ratio("cnn_backpack_batchgrad", "cnn_hessrank_fisher")
    add("CNN: BackPACK BatchGrad+Gram time / fisher time", r, ">= 5",
        None if r is None else r >= 5)
    r = ratio("small_hessrank_exact", "small_curvlinops_dense")
    add("exact time / curvlinops H@I+eigvalsh time (P~5k)", r, "<= 1",
        None if r is None else r <= 1)
    pa, pb = peak("small_hessrank_exact"), peak("small_curvlinops_dense")
    add("exact peak memory / curvlinops H@I peak memory", None if pa is None or not pb
        else pa / pb, "(info)", None)
    lt, nh = get("hessrank_lanczos"), (get("hessrank_lanczos", "result") or {}).get("num_hvps")
    gt = get("fwd_bwd")
    h = None if lt is None or not nh or gt is None else lt / nh / gt
    add("lanczos time per HVP / gradient time", h, "<= 2.5", None if h is None else h <= 2.5,
        "hessrank exposes no public HVP: effective_rank(method='lanczos') seconds / num_hvps")
    ct = get("curvlinops_eigsh_k20")
    cn = (get("curvlinops_eigsh_k20", "result") or {}).get("num_hvps")
    add("curvlinops eigsh time per HVP / gradient time",
        None if ct is None or not cn or gt is None else ct / cn / gt, "(info)", None)
    r = ratio("pyhessian_hvp", "fwd_bwd")
    add("pyhessian HVP (double backward) / gradient time", r, "(info)", None)
    for name, label in (("scale_hessrank_fisher_n4096", "fisher n = 4096, P = 670k completes"),
                        ("scale_hessrank_fisher_p1e7", "fisher n = 256, P = 10^7 completes")):
        e = results.get(name)
        ok = None if e is None else ("seconds" in e and "error" not in e.get("memory", {}))
        add(label, get(name), "completes", ok,
            "" if e is None or peak(name) is None else f"peak {peak(name) / GIB:.2f} GB")
    return rows


# ----------------------------------------------------------------------------- output


def jsonable(obj: Any) -> Any:
    """Numpy arrays and scalars to lists and floats, recursively."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, versions."""
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s+(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        pass
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "numpy", "scipy", "backpack-for-pytorch", "vivit-for-pytorch",
                "curvlinops-for-pytorch", "pyhessian", "hessrank"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    mem = None
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "memory_bytes": mem, "python": platform.python_version(), "versions": versions}


def fmt(v: float | None) -> str:
    """Compact number for the table."""
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"


def print_tables(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """The measured figures and the targets."""
    print("\ncase                                  seconds   x fwd+bwd   peak MB  note")
    for name, e in results.items():
        pk = e.get("memory", {}).get("peak_bytes")
        note = e.get("skipped") or e.get("error") or e.get("memory", {}).get("error", "")
        print(f"{name:<36} {fmt(e.get('seconds')):>9} {fmt(e.get('ratio')):>10} "
              f"{fmt(None if pk is None else pk / 2**20):>9}  {note}")
    print(f"\n{'target':<57} {'measured':>9}   {'limit':<10} status")
    for r in rows:
        print(f"{r['target']:<57} {fmt(r['measured']):>9}   {r['limit']:<10} {r['status']}")


def plot(results: dict[str, dict[str, Any]], figdir: Path) -> list[str]:
    """Time and peak memory against n and against P, one PNG per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    tools = (("fwd_bwd", "forward+backward"), ("hessrank_fisher", "hessrank fisher"),
             ("backpack_batchgrad", "BackPACK BatchGrad + Gram"),
             ("vmap_grad", "torch.func vmap(grad) + Gram"))
    written = []
    for sweep, xlabel in (("sweep_n", "batch size n (MLP 784-512-512-10, P = 670k)"),
                          ("sweep_p", f"parameters P (MLP 784-h-h-10, n = {SWEEP_P_N})")):
        names = [k for k in results if k.startswith(sweep)]
        if not names:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for tool, label in tools:
            pts = []
            for k in names:
                if not k.endswith("_" + tool):
                    continue
                e = results[k]
                xv = e["spec"]["n"] if sweep == "sweep_n" else e["num_params"]
                pk = e.get("memory", {}).get("peak_bytes")
                pts.append((xv, e.get("seconds"), None if pk is None else pk / GIB,
                            e.get("skipped")))
            pts.sort()
            done = [p for p in pts if p[1] is not None]
            if done:
                ax_t.plot([p[0] for p in done], [p[1] for p in done], "o-", label=label)
                mem = [p for p in done if p[2] is not None]
                ax_m.plot([p[0] for p in mem], [p[2] for p in mem], "o-", label=label)
            for p in pts:
                if p[3]:
                    ax_t.annotate("skipped", (p[0], ax_t.get_ylim()[1]), fontsize=7,
                                  rotation=90, va="top")
        for ax, ylabel in ((ax_t, "seconds (median)"), (ax_m, "peak RSS above start (GB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"Empirical-Fisher spectrum, 2 CPU threads ({sweep.replace('_', ' vs ')})")
        fig.tight_layout()
        path = figdir / f"{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats, sweeps up to n=1024/P=1e6")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated groups among {','.join(GROUPS)}")
    ap.add_argument("--out", default=str(HERE),
                    help="directory for results.json and figures/ (default: benchmarks/)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case")
    ap.add_argument("--case-budget-s", type=float, default=30.0,
                    help="stop repeating a case after this many seconds")
    ap.add_argument("--mem-cap-gb", type=float, default=12.0,
                    help="skip peer cases predicted to need more memory (also <= 70%% of free)")
    ap.add_argument("--time-cap-s", type=float, default=90.0,
                    help="skip peer cases predicted to take longer per run")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = groups - set(GROUPS)
    if unknown:
        ap.error(f"unknown groups {sorted(unknown)}; choose among {', '.join(GROUPS)}")
    have = hessrank_available()
    if not have:
        print("hessrank.effective_rank is not importable: measuring the peers only", flush=True)
    bench = Bench(args)
    print(f"float32 GEMM: {bench.gflops:.0f} GFLOP/s on {torch.get_num_threads()} threads",
          flush=True)
    t0 = time.perf_counter()
    suite(bench, groups, have)
    rows = targets(bench.results)
    print_tables(bench.results, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figs = plot(bench.results, out / "figures")
    payload = {"machine": machine(), "gemm_gflops": bench.gflops, "groups": sorted(groups),
               "quick": args.quick, "wall_seconds": time.perf_counter() - t0,
               "targets": rows, "cases": bench.results, "figures": figs}
    (out / "results.json").write_text(json.dumps(jsonable(payload), indent=1))
    print(f"\nwrote {out / 'results.json'}" + "".join(f", {f}" for f in figs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
