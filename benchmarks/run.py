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
A case the timing warmed up (under 5 s) is warmed up there too, and the C allocator's free memory
returned to the system (``malloc_trim``) before the reset, so the figure is a call's own working
memory: not the first call's one-time costs (lazy imports, kernels built for new shapes), and
memory the warm-up freed counts again when the call reuses it.
A peer case whose predicted memory or time exceeds the caps is skipped and marked with the
prediction. Results go to ``OUT/results.json`` and plots to ``OUT/figures/``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # the working tree's hessrank


def _load_peers() -> Any:
    """Import ``peers.py`` next to this file under a name no other module can shadow."""
    name = "hessrank_bench_peers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "peers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


peers = _load_peers()

GROUPS = ("fisher", "ggn", "cnn", "exact", "lanczos", "hvp", "scale", "sweep_n", "sweep_p",
          "arch", "sweep_arch")
#: Issue 9's architectures (see ``build_model``) and their batch sizes.
ARCHS = ("resnet18", "gpt", "encoder", "lstm", "gru", "lstm2", "lstm_packed")
ARCH_N = 128
ARCH_SWEEP_NS = (64, 128, 256, 512)
MLP = (784, 512, 512, 10)
SMALL_MLP = (32, 64, 40, 10)
N = 512
GGN_SMALL_N = 64
EXACT_N = 256
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


def cnn(variant: str = "mnist") -> nn.Sequential:
    """Two conv layers and a linear head on 28x28 inputs.

    ``mnist``: the convolution stack of PyTorch's MNIST example (111k parameters, convolution
    compute dominates); ``lenet``: LeNet-style 5x5 convolutions with pooling (18k parameters).
    """
    if variant == "lenet":
        return nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, 10),
    )


class GPTBlock(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention (one ``nn.Linear`` for the
    query/key/value projections, ``scaled_dot_product_attention``) and a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h: Tensor) -> Tensor:
        n, t, d = h.shape
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.norm1(h)).split(d, dim=-1))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(n, t, d))
        return h + self.out(nn.functional.gelu(self.fc(self.norm2(h))))


class GPT(nn.Module):
    """GPT-style language model (nanoGPT layout): token and position embeddings, pre-norm causal
    blocks, final LayerNorm, per-token logits as ``[n, vocab, T]`` (the class dimension second,
    so ``nn.CrossEntropyLoss`` is the per-token loss for every tool).

    ``positions="per-sample"`` looks the positions up as an ``[n, T]`` index (as for the
    tokens); ``"shared"`` as one ``[T]`` index broadcast over the batch (nanoGPT's own code).
    """

    def __init__(self, vocab: int = 512, context: int = 64, width: int = 128, heads: int = 4,
                 layers: int = 2, positions: str = "per-sample") -> None:
        super().__init__()
        self.positions = positions
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[GPTBlock(width, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        index = torch.arange(tokens.shape[1], device=tokens.device)
        if self.positions == "per-sample":
            index = index.expand_as(tokens)
        h = self.tok(tokens) + self.pos(index)
        return self.head(self.norm(self.blocks(h))).transpose(1, 2)


class EncoderClassifier(nn.Module):
    """Stock ``nn.TransformerEncoder`` (2 pre-norm layers, d = 128, 4 heads, GELU feed-forward
    256, no dropout) over 64 tokens of a 512-word vocabulary, mean-pooled, a linear head: its
    attention is ``nn.MultiheadAttention``."""

    def __init__(self, vocabulary: int = 512, width: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class RecurrentClassifier(nn.Module):
    """A recurrent module over ``[n, T, 32]`` sequences, a linear head on the last step's output:
    ``lstm`` one LSTM layer, ``gru`` one GRU layer, ``lstm2`` two bidirectional LSTM layers;
    ``lstm_packed`` one LSTM layer over variable-length sequences (zero steps at the end are
    padding), packed, the head on the final hidden state."""

    def __init__(self, kind: str = "lstm", features: int = 32, hidden: int = 128,
                 classes: int = 10) -> None:
        super().__init__()
        cell, options = {"lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}), "lstm_packed": (nn.LSTM, {}),
                         "lstm2": (nn.LSTM, {"num_layers": 2, "bidirectional": True})}[kind]
        self.packed = kind == "lstm_packed"
        self.rnn = cell(features, hidden, batch_first=True, **options)
        self.head = nn.Linear(hidden * (2 if options.get("bidirectional") else 1), classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed:
            lengths = (x != 0).any(dim=-1).sum(dim=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                       enforce_sorted=False)
            return self.head(self.rnn(packed)[1][0][-1])
        return self.head(self.rnn(x)[0][:, -1])


def mlp_for_params(target: int) -> tuple[int, ...]:
    """Widths 784-h-h-10 whose parameter count is closest to ``target``."""
    def count(h: int) -> int:
        return 785 * h + (h + 1) * h + (h + 1) * 10

    h = max(1, round((-795 + math.sqrt(795**2 + 4 * (target - 10))) / 2))
    h = min((h - 1, h, h + 1), key=lambda w: abs(count(max(w, 1)) - target))
    return (784, max(h, 1), max(h, 1), 10)


def build_model(spec: Spec) -> nn.Module:
    """The model of a case spec, seeded, on the spec's device (default cpu)."""
    torch.manual_seed(spec.get("seed", 0))
    if spec["model"] == "cnn":
        model = cnn(spec.get("variant", "mnist"))
    elif spec["model"] == "resnet18":  # CIFAR-sized inputs; BatchNorm on running statistics
        import torchvision

        model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    elif spec["model"] == "gpt":
        model = GPT(positions=spec.get("variant", "per-sample"))
    elif spec["model"] == "encoder":
        model = EncoderClassifier()
    elif spec["model"] in ("lstm", "gru", "lstm2", "lstm_packed"):
        model = RecurrentClassifier(spec["model"])
    else:
        model = mlp(spec["widths"])
    return model.to(spec.get("device", "cpu"))


def build_batch(spec: Spec) -> tuple[Tensor, Tensor]:
    """A seeded random batch (inputs, labels) for the case's model, on the spec's device (the
    same numbers on every device: drawn on the CPU)."""
    g = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    n, device = spec["n"], spec.get("device", "cpu")
    if spec["model"] == "gpt":
        inputs = torch.randint(0, 512, (n, 64), generator=g)
        labels = torch.randint(0, 512, (n, 64), generator=g)
    elif spec["model"] == "encoder":
        inputs = torch.randint(0, 512, (n, 64), generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
    else:
        sequences = ("lstm", "gru", "lstm2", "lstm_packed")
        shape = ((n, 32, 32) if spec["model"] in sequences else
                 {"cnn": (n, 1, 28, 28), "resnet18": (n, 3, 32, 32)}.get(spec["model"])
                 or (n, spec["widths"][0]))
        inputs, labels = torch.randn(shape, generator=g), torch.randint(0, 10, (n,), generator=g)
        if spec["model"] == "lstm_packed":  # lengths 8 to 32: zero steps past each
            lengths = torch.randint(8, 33, (n, 1), generator=g)
            inputs *= (torch.arange(32) < lengths)[..., None]
    return inputs.to(device), labels.to(device)


def num_params(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- cases


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
                                          **{"progress": False, **opts.get("kwargs", {})})
            return {"eigenvalues": np.asarray(res.eigenvalues), "rank": res.rank,
                    "backend": res.backend, "num_hvps": res.num_hvps,
                    "max_rank": res.max_rank,
                    "numerical_rank": res.ranks.get("numerical")}
        return run_hessrank
    if tool == "eigvalsh":  # the eigen-solve alone, on a Gram-like matrix of the given size
        size, dtype = opts["size"], getattr(torch, opts["dtype"])
        f = torch.randn(size, size + 8, generator=torch.Generator().manual_seed(0))
        gram = (f @ f.T).to(dtype)
        return lambda: {"eigenvalues": peers.sort_desc(torch.linalg.eigvalsh(gram))}
    if tool == "hessrank_hvp":  # private API, for the HVP-vs-gradient figure only
        from hessrank.curvature.hessian import HessianOperator
        from hessrank.problem import build_problem

        op = HessianOperator(build_problem(model, loss, (x, y), None, "eval"))
        v = torch.randn(op.dim, device=x.device)
        return lambda: (op.matvec(v), {})[1]
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
    if tool in ("curvlinops_ef", "curvlinops_ggn"):  # one matrix-vector product
        operator = peers.curvlinops_operator(tool.split("_")[1], model, x, y)
        vector = torch.randn(num_params(model), device=x.device)
        return lambda: (operator @ vector, {})[1]
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
    p, n = num_params(model), spec["n"]
    c = 512 * 64 if spec["model"] == "gpt" else 10  # outputs per sample
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


def synchronize() -> None:
    """Wait for queued GPU work (a no-op without CUDA), so a wall-clock interval covers it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(run: Callable[[], dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    """Seconds of one call, and what it returned (queued GPU work included)."""
    synchronize()
    t0 = time.perf_counter()
    out = run()
    synchronize()
    return time.perf_counter() - t0, out


def time_group(runs: dict[str, Callable[[], dict[str, Any]]], base: str, rounds: int,
               budget_s: float) -> dict[str, dict[str, Any]]:
    """Time the cases of a group round-robin, so every round sees the same machine load.

    The cases are already warmed up (called once). Rounds continue while the group's
    ``budget_s`` lasts, up to ``rounds``; each round's times of two cases give a paired ratio.
    ``base`` (the group's plain forward+backward) runs three times per round, median kept.
    """
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    outs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    start = time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in failed:
                continue
            times = []
            try:
                for _ in range(3 if name == base else 1):
                    t, outs[name] = timed(runs[name])
                    times.append(t)
            except Exception as exc:  # a peer that breaks on its first call is a result
                if name == base:
                    raise
                failed[name] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            samples[name].append(statistics.median(times))
        if (time.perf_counter() - start) * (r + 2) / (r + 1) > budget_s:
            break
    out: dict[str, dict[str, Any]] = {name: {"error": why} for name, why in failed.items()}
    for name in names:
        if name in failed:
            continue
        times = samples[name]
        ratios = [t / b for t, b in zip(times, samples[base], strict=False)]
        out[name] = {"seconds": statistics.median(times), "min_seconds": min(times),
                     "ratio": statistics.median(ratios), "times": times,
                     "fwd_bwd_times": samples[base], "repeats": len(times),
                     "result": outs[name]}
    return out


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def memory_child(spec: Spec) -> None:
    """Subprocess entry: run the case once (after a warm-up call where ``spec["warm"]``), print
    its peak memory above the pre-call level as JSON: resident memory on the CPU, allocated device
    memory on a GPU."""
    import ctypes
    import gc

    run = make_case(spec)
    make_case({**spec, "tool": "fwd_bwd", "opts": {}})()  # one-time library initialisation
    if spec.get("warm"):
        run()  # the case's own one-time costs (lazy imports, kernels for new shapes)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory counts again when reused
    cuda = spec.get("device", "cpu").startswith("cuda")
    if cuda:
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = vm_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM
    seconds, _ = timed(run)
    peak = torch.cuda.max_memory_allocated() if cuda else vm_kib("VmHWM") * 1024
    print(json.dumps({"peak_bytes": max(peak - before, 0), "seconds": seconds}))


def memory_case(spec: Spec, timeout_s: float) -> dict[str, Any]:
    """Peak resident memory of one run of a case, measured in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--_memory-child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Bench:
    """Runs groups of cases, keeps every number for the JSON, skips what would not fit."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rounds = 2 if args.quick else args.repeats
        self.results: dict[str, dict[str, Any]] = {}
        self.gflops = self.calibrate()

    def calibrate(self) -> float:
        """Measured float32 GEMM rate (GFLOP/s) on the benchmark's device, used to predict
        peer run times."""
        a = torch.randn(1024, 4096, device=self.args.device)
        b = torch.randn(4096, 1024, device=self.args.device)
        a @ b
        synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        synchronize()
        return 3 * 2 * 1024 * 4096 * 1024 / (time.perf_counter() - t0) / 1e9

    def skip_reason(self, spec: Spec, time_cap_s: float) -> tuple[str | None, dict[str, float]]:
        """Why a peer case is not run (predicted over the caps), with the prediction."""
        mem, sec = predict(spec, self.gflops)
        if not (mem or sec):
            return None, {}
        pred = {"predicted_bytes": mem, "predicted_seconds": sec}
        cap = min(self.args.mem_cap_gb * GIB, 0.7 * available_bytes(self.args.device))
        if mem > cap:
            return f"skipped, would need {mem / GIB:.1f} GB", pred
        if sec > time_cap_s:
            return f"skipped, would take {sec:.0f} s per run", pred
        return None, pred

    def group(self, title: str, cases: dict[str, Spec], time_cap_s: float | None = None) -> None:
        """Time ``cases`` (the first is the group's forward+backward) interleaved, then measure
        each one's peak memory in a subprocess. Cases predicted to take over 5 s, or marked
        ``warmup: False`` (slow ones), are not warmed up: their first call is a sample."""
        print(f"[{title}]", flush=True)
        cap = self.args.time_cap_s if time_cap_s is None else time_cap_s
        runs: dict[str, Callable[[], dict[str, Any]]] = {}
        for name, spec in cases.items():
            spec = {**spec, "device": self.args.device}
            entry: dict[str, Any] = {"spec": spec, "group": title,
                                     "num_params": num_params(build_model(spec))}
            why, pred = self.skip_reason(spec, cap)
            entry.update(pred)
            self.results[name] = entry
            if why:
                entry["skipped"] = why
                print(f"  {name:<36} {why}", flush=True)
                continue
            try:
                runs[name] = make_case(spec)
                if spec.get("warmup", True) and pred.get("predicted_seconds", 0.0) < 5.0:
                    runs[name]()  # warm-up; a peer that breaks fails here, not mid-round
            except Exception as exc:  # a peer that breaks is a result, not a crash of the suite
                runs.pop(name, None)
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"  {name:<36} ERROR {entry['error']}", flush=True)
        base = next(iter(cases))
        if base not in runs:
            return
        try:
            timing = time_group(runs, base, self.rounds, self.args.group_budget_s)
        except Exception as exc:
            for name in runs:
                self.results[name]["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  ERROR {type(exc).__name__}: {exc}", flush=True)
            return
        del runs
        for name, t in timing.items():
            entry = self.results[name]
            entry.update(t)
            if "error" in t:
                print(f"  {name:<36} ERROR {t['error']}", flush=True)
                continue
            if not self.args.no_memory:
                warm = entry["spec"].get("warmup", True) and t["seconds"] < 5.0
                entry["memory"] = memory_case({**entry["spec"], "warm": warm},
                                              max(600.0, 40 * t["seconds"]))
            peak = entry.get("memory", {}).get("peak_bytes")
            peak_s = f"{peak / 2**20:9.1f} MB" if peak is not None else "        -   "
            print(f"  {name:<36} {t['seconds']:9.4f} s  x{t['ratio']:9.2f} fwd+bwd  {peak_s}"
                  f"  ({t['repeats']} rounds)", flush=True)


def available_bytes(device: str = "cpu") -> float:
    """Memory the device can still give: free GPU memory, or the system's (psutil; +inf
    without psutil)."""
    if device.startswith("cuda"):
        return float(torch.cuda.mem_get_info(torch.device(device))[0])
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


def slow(spec: Spec) -> Spec:
    """Mark a case as too slow for a warm-up call (its first timed call is a sample)."""
    return {**spec, "warmup": False}


def hr(method: str, **kwargs: Any) -> dict[str, Any]:
    """Options of a hessrank case."""
    return {"method": method, "kwargs": kwargs}


def arch_cases(arch: str, n: int, full: bool) -> dict[str, Spec]:
    """Cases of one issue-9 architecture at batch size ``n``, the forward+backward first.
    ``full``: also curvlinops' operators and the extra hessrank variants."""
    spec: Spec = {"model": arch, "n": n, "seed": 0, "opts": {}}
    tag = f"{arch}_n{n}"
    cases = {
        f"{tag}_fwd_bwd": {**spec, "tool": "fwd_bwd"},
        f"{tag}_hessrank_fisher": {**spec, "tool": "hessrank", "opts": hr("fisher")},
        f"{tag}_vmap_grad": {**spec, "tool": "vmap_grad"},
        f"{tag}_backpack_batchgrad": {**spec, "tool": "backpack_batchgrad"},
    }
    if full:
        cases.update({
            f"{tag}_curvlinops_ef": {**spec, "tool": "curvlinops_ef"},
            f"{tag}_curvlinops_ggn": {**spec, "tool": "curvlinops_ggn"},
            f"{tag}_hessrank_ggn_mc1": {**spec, "tool": "hessrank",
                                        "opts": hr("ggn", mc_samples=1)},
        })
        if arch in ("gru", "lstm2", "lstm_packed"):  # the general path these took before
            cases[f"{tag}_hessrank_fisher_func"] = {**spec, "tool": "hessrank",
                                                    "opts": hr("fisher", backend="func")}
        if arch == "gpt":
            cases[f"{tag}_hessrank_fisher_shared_positions"] = {
                **spec, "variant": "shared", "tool": "hessrank", "opts": hr("fisher")}
    return cases


def suite(b: Bench, groups: set[str]) -> None:
    """Run the selected groups of cases."""
    archs = [a for a in ARCHS if a in b.args.archs.split(",")]
    if "arch" in groups:
        for arch in archs:
            b.group(f"arch: {arch}, n = {ARCH_N}", arch_cases(arch, ARCH_N, full=True))
    if "sweep_arch" in groups:
        for arch in archs:
            for n in ARCH_SWEEP_NS:
                if n != ARCH_N or "arch" not in groups:
                    cases = {name: spec for name, spec in arch_cases(arch, n, full=False).items()
                             if spec["tool"] in ("fwd_bwd", *b.args.sweep_tools.split(","))}
                    b.group(f"sweep_arch: {arch}, n = {n}", cases,
                            time_cap_s=b.args.sweep_time_cap_s)
    if "fisher" in groups:
        b.group("fisher: MLP 784-512-512-10, n = 512", {
            "fwd_bwd": mlp_spec("fwd_bwd"),
            "hessrank_fisher": mlp_spec("hessrank", **hr("fisher")),
            "vivit_mc1": mlp_spec("vivit", mc_samples=1),
            "backpack_batchgrad": mlp_spec("backpack_batchgrad"),
            "vmap_grad": mlp_spec("vmap_grad"),
            "eigvalsh_f64_512": mlp_spec("eigvalsh", size=N, dtype="float64"),
        })
    if "ggn" in groups:
        b.group("ggn: MLP 784-512-512-10, n = 512, C = 10", {
            "ggn_fwd_bwd": mlp_spec("fwd_bwd"),
            "hessrank_ggn": mlp_spec("hessrank", **hr("ggn")),
            "vivit_exact": mlp_spec("vivit", mc_samples=0),
            "backpack_sqrtggn": mlp_spec("backpack_sqrtggn"),
            "eigvalsh_f64_5120": mlp_spec("eigvalsh", size=10 * N, dtype="float64"),
            "eigvalsh_f32_5120": mlp_spec("eigvalsh", size=10 * N, dtype="float32"),
            "eigvalsh_f64_4608": mlp_spec("eigvalsh", size=9 * N, dtype="float64"),
        })
        b.group(f"ggn: MLP 784-512-512-10, n = {GGN_SMALL_N}", {
            f"ggn_fwd_bwd_n{GGN_SMALL_N}": mlp_spec("fwd_bwd", n=GGN_SMALL_N),
            f"hessrank_ggn_n{GGN_SMALL_N}": mlp_spec("hessrank", n=GGN_SMALL_N, **hr("ggn")),
            f"vivit_exact_n{GGN_SMALL_N}": mlp_spec("vivit", n=GGN_SMALL_N, mc_samples=0),
            f"backpack_sqrtggn_n{GGN_SMALL_N}": mlp_spec("backpack_sqrtggn", n=GGN_SMALL_N),
        })
    if "cnn" in groups:
        for variant, tag, title in (
                ("mnist", "cnn", "Conv(1,32,3)-Conv(32,64,3)-MaxPool-Linear(9216,10)"),
                ("lenet", "lenet", "Conv(1,16,5)-Pool-Conv(16,32,5)-Pool-Linear(512,10)")):
            spec = {"model": "cnn", "variant": variant, "n": N, "seed": 0, "opts": {}}
            b.group(f"cnn: {title}, n = 512", {
                f"{tag}_fwd_bwd": {**spec, "tool": "fwd_bwd"},
                f"{tag}_hessrank_fisher": {**spec, "tool": "hessrank", "opts": hr("fisher")},
                f"{tag}_hessrank_fisher_func": {**spec, "tool": "hessrank",
                                                 "opts": hr("fisher", backend="func")},
                f"{tag}_backpack_batchgrad": {**spec, "tool": "backpack_batchgrad"},
                f"{tag}_vmap_grad": {**spec, "tool": "vmap_grad"},
            })
    if "exact" in groups:
        b.group(f"exact: MLP {'-'.join(map(str, SMALL_MLP))}, n = {EXACT_N}", {
            "small_fwd_bwd": mlp_spec("fwd_bwd", n=EXACT_N, widths=SMALL_MLP),
            "small_hessrank_exact": slow(mlp_spec("hessrank", n=EXACT_N, widths=SMALL_MLP,
                                                  **hr("exact"))),
            "small_curvlinops_dense": slow(mlp_spec("curvlinops_dense", n=EXACT_N,
                                                    widths=SMALL_MLP)),
        })
    if "lanczos" in groups or "hvp" in groups:
        cases = {"hvp_fwd_bwd": mlp_spec("fwd_bwd")}
        if "lanczos" in groups:
            cases.update({"hessrank_lanczos": slow(mlp_spec("hessrank", **hr("lanczos"))),
                          "hessrank_hvp_private": mlp_spec("hessrank_hvp"),
                          "curvlinops_eigsh_k20": slow(mlp_spec("curvlinops_eigsh", k=20))})
        if "hvp" in groups:
            cases.update({"pyhessian_setup": mlp_spec("pyhessian_setup"),
                          "pyhessian_hvp": mlp_spec("pyhessian_hvp"),
                          "pyhessian_top_eigenvalue": slow(mlp_spec("pyhessian_top"))})
        b.group("lanczos / hvp: MLP 784-512-512-10, n = 512", cases)
    if "scale" in groups:
        b.group("scale: fisher, n = 4096, MLP 784-512-512-10", {
            "scale_fwd_bwd_n4096": mlp_spec("fwd_bwd", n=4096),
            "scale_hessrank_fisher_n4096": slow(mlp_spec("hessrank", n=4096, **hr("fisher"))),
        })
        big = mlp_for_params(10**7)
        b.group(f"scale: fisher, n = 256, MLP {'-'.join(map(str, big))}", {
            "scale_fwd_bwd_p1e7": mlp_spec("fwd_bwd", n=256, widths=big),
            "scale_hessrank_fisher_p1e7": slow(mlp_spec("hessrank", n=256, widths=big,
                                                        **hr("fisher"))),
        })
    if "sweep_n" in groups:
        for n in SWEEP_NS[:5] if b.args.quick else SWEEP_NS:
            b.group(f"sweep_n: MLP 784-512-512-10, n = {n}", {
                f"sweep_n{n}_fwd_bwd": mlp_spec("fwd_bwd", n=n),
                f"sweep_n{n}_hessrank_fisher": mlp_spec("hessrank", n=n, **hr("fisher")),
                f"sweep_n{n}_backpack_batchgrad": mlp_spec("backpack_batchgrad", n=n),
                f"sweep_n{n}_vmap_grad": mlp_spec("vmap_grad", n=n),
            }, time_cap_s=b.args.sweep_time_cap_s)
    if "sweep_p" in groups:
        for p in SWEEP_PS[:5] if b.args.quick else SWEEP_PS:
            w = mlp_for_params(p)
            tag = f"sweep_p{p:.0e}".replace("+0", "")
            b.group(f"sweep_p: MLP {'-'.join(map(str, w))}, n = {SWEEP_P_N}", {
                f"{tag}_fwd_bwd": mlp_spec("fwd_bwd", n=SWEEP_P_N, widths=w),
                f"{tag}_hessrank_fisher": mlp_spec("hessrank", n=SWEEP_P_N, widths=w,
                                                    **hr("fisher")),
                f"{tag}_backpack_batchgrad": mlp_spec("backpack_batchgrad", n=SWEEP_P_N,
                                                       widths=w),
                f"{tag}_vmap_grad": mlp_spec("vmap_grad", n=SWEEP_P_N, widths=w),
            }, time_cap_s=b.args.sweep_time_cap_s)


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
        """Median over the rounds of a group of time(a) / time(b) (paired under equal load)."""
        ta, tb = get(a, "times"), get(b, "times")
        if not ta or not tb:
            return None
        if len(ta) == len(tb) and get(a, "group") == get(b, "group"):
            return statistics.median(x / y for x, y in zip(ta, tb, strict=True))
        return statistics.median(ta) / statistics.median(tb)

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
    r = ratio(f"backpack_sqrtggn_n{GGN_SMALL_N}", f"hessrank_ggn_n{GGN_SMALL_N}")
    add(f"n = {GGN_SMALL_N}: BackPACK SqrtGGNExact+Gram time / ggn time", r, "(info)", None)
    r = ratio("eigvalsh_f64_5120", "vivit_exact")
    add("float64 eigvalsh 5120 alone / ViViT exact time", r, "(info)", None,
        "the issue asks for float64 eigen-solves; ViViT solves its Gram in float32")
    r = ratio("eigvalsh_f64_4608", "vivit_exact")
    add("float64 eigvalsh of n(C-1) = 4608 alone / ViViT exact time", r, "(info)", None,
        "a (C-1)-column square root of the softmax Hessian would shrink the Gram to this")
    r = ratio("eigvalsh_f64_512", "hessrank_fisher")
    add("float64 eigvalsh 512 alone / fisher time", r, "(info)", None)
    r = ratio("hessrank_ggn", "vivit_exact")
    add("ggn time / ViViT exact GGN eigvals time", r, "<= 1", None if r is None else r <= 1)
    a, b = evals("hessrank_ggn"), evals("vivit_exact")
    g = None if a is None or b is None else spectrum_gap(a, b, N * 9)
    add("ggn eigenvalues vs ViViT exact (max rel. gap, top n(C-1))", g, "<= 1e-4",
        None if g is None else g <= 1e-4, "ViViT solves in float32")
    for arch in ARCHS:
        tag = f"{arch}_n{ARCH_N}"
        r = get(f"{tag}_hessrank_fisher", "ratio")
        add(f"{arch}: fisher time / fwd+bwd", r, "<= 3.5", None if r is None else r <= 3.5)
        r = ratio(f"{tag}_vmap_grad", f"{tag}_hessrank_fisher")
        add(f"{arch}: vmap(grad)+Gram time / fisher time", r, ">= 1.5",
            None if r is None else r >= 1.5)
        r = ratio(f"{tag}_backpack_batchgrad", f"{tag}_hessrank_fisher")
        add(f"{arch}: BackPACK BatchGrad+Gram time / fisher time", r, "(info)", None)
        pk = peak(f"{tag}_hessrank_fisher")
        nxp = ARCH_N * results.get(f"{tag}_fwd_bwd", {}).get("num_params", 0) * 4
        add(f"{arch}: fisher peak memory / (n x P float32)", None if pk is None else pk / nxp,
            "< 1", None if pk is None else pk < nxp, f"n x P float32 = {nxp / 2**20:.0f} MB")
        a, b = evals(f"{tag}_hessrank_fisher"), evals(f"{tag}_vmap_grad")
        g = None if a is None or b is None else spectrum_gap(a, b, ARCH_N)
        add(f"{arch}: fisher eigenvalues vs vmap(grad) Gram (max rel. gap)", g, "<= 1e-4",
            None if g is None else g <= 1e-4)
        for peer in ("curvlinops_ef", "curvlinops_ggn", "hessrank_ggn_mc1",
                     "hessrank_fisher_shared_positions"):
            r = get(f"{tag}_{peer}", "ratio")
            if r is not None:
                add(f"{arch}: {peer} / fwd+bwd", r, "(info)", None,
                    "one matrix-vector product" if peer.startswith("curvlinops") else "")
    for tag in ("cnn", "lenet"):
        r = ratio(f"{tag}_backpack_batchgrad", f"{tag}_hessrank_fisher")
        add(f"CNN ({tag}): BackPACK BatchGrad+Gram time / fisher time", r, ">= 5",
            None if r is None else r >= 5)
        r = ratio(f"{tag}_backpack_batchgrad", f"{tag}_hessrank_fisher_func")
        add(f"CNN ({tag}): BatchGrad+Gram time / fisher backend='func' time", r, "(info)", None)
        r = get(f"{tag}_backpack_batchgrad", "ratio")
        add(f"CNN ({tag}): BackPACK BatchGrad+Gram time / fwd+bwd", r, "(info)", None,
            "fisher needs at least one forward+backward, so >= 5x needs this >= 5")
    r = ratio("small_hessrank_exact", "small_curvlinops_dense")
    add("exact time / curvlinops H@I+eigvalsh time (P~5k)", r, "<= 1",
        None if r is None else r <= 1)
    pa, pb = peak("small_hessrank_exact"), peak("small_curvlinops_dense")
    add("exact peak memory / curvlinops H@I peak memory", None if pa is None or not pb
        else pa / pb, "(info)", None)
    nh = (get("hessrank_lanczos", "result") or {}).get("num_hvps")
    r = ratio("hessrank_lanczos", "hvp_fwd_bwd")
    h = None if r is None or not nh else r / nh
    add("lanczos time per HVP / gradient time", h, "<= 2.5", None if h is None else h <= 2.5,
        f"hessrank exposes no public HVP: effective_rank(method='lanczos') / num_hvps = {nh}")
    nc = (get("curvlinops_eigsh_k20", "result") or {}).get("num_hvps")
    r = ratio("curvlinops_eigsh_k20", "hvp_fwd_bwd")
    add("curvlinops eigsh time per HVP / gradient time", None if r is None or not nc
        else r / nc, "(info)", None, f"{nc} matrix-vector products")
    r = ratio("hessrank_hvp_private", "hvp_fwd_bwd")
    add("hessrank HessianOperator.matvec / gradient time", r, "(info)", None,
        "private API hessrank.curvature.hessian, one product after the graph is built")
    r = ratio("pyhessian_hvp", "hvp_fwd_bwd")
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


def summarised(results: dict[str, dict[str, Any]], top: int = 20) -> dict[str, dict[str, Any]]:
    """The results with each spectrum cut to its ``top`` leading eigenvalues and its length."""
    out = {}
    for name, entry in results.items():
        res = entry.get("result")
        if res and res.get("eigenvalues") is not None:
            evals = np.asarray(res["eigenvalues"])
            res = {**res, "eigenvalues": evals[:top], "num_eigenvalues": len(evals)}
            entry = {**entry, "result": res}
        out[name] = entry
    return out


def machine() -> dict[str, Any]:
    """CPU model, GPU (where one was used), cores, memory, versions."""
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
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_initialized() else None
    return {"cpu": model, "gpu": gpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "git_commit": commit,
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


def markdown(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
             info: dict[str, Any]) -> str:
    """The machine, the case table and the targets as Markdown (pasted into the README)."""
    v = info["versions"]
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    lines = [f"Machine: {info['cpu']}{gpu}, {info['cores']} cores, "
             f"{(info['memory_bytes'] or 0) / GIB:.0f} GB; torch {v['torch']}, "
             f"{info['threads']} threads; BackPACK {v['backpack-for-pytorch']}, "
             f"ViViT {v['vivit-for-pytorch']}, curvlinops {v['curvlinops-for-pytorch']}, "
             f"pyhessian {v['pyhessian']}.", "",
             "| case | P | n | median s | min s | x fwd+bwd (median) | rounds | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in results.items():
        pk = e.get("memory", {}).get("peak_bytes")
        note = e.get("skipped") or e.get("error") or e.get("memory", {}).get("error")
        if note:
            lines.append(f"| {name} | {e['num_params']} | {e['spec']['n']} | {note} ||||| ")
            continue
        lines.append(f"| {name} | {e['num_params']} | {e['spec']['n']} | {fmt(e['seconds'])} | "
                     f"{fmt(e['min_seconds'])} | {fmt(e['ratio'])} | {e['repeats']} | "
                     f"{fmt(None if pk is None else pk / 2**20)} |")
    lines += ["", "| target | measured | limit | status | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {fmt(r['measured'])} | {r['limit']} | {r['status']} | "
                     f"{r['note']} |")
    return "\n".join(lines) + "\n"


def _plot_skips(ax_t: Any, ax_m: Any, skips: list[tuple], color: str) -> None:
    """Skipped cases as crosses at their predicted time and memory."""
    if skips:
        ax_t.plot([q[0] for q in skips], [q[1] for q in skips], "x", color=color, markersize=9)
        ax_m.plot([q[0] for q in skips], [q[2] for q in skips], "x", color=color, markersize=9)


def _finish_sweep_figure(plt: Any, fig: Any, ax_t: Any, ax_m: Any, xlabel: str,
                         time_label: str, title: str, path: Path, base: float = 10) -> str:
    """Log-log axes, labels, legend and title of a time/memory sweep figure; saved, closed."""
    for ax, ylabel in ((ax_t, time_label), (ax_m, "peak RSS above start (GB)")):
        ax.set_xscale("log", base=base)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8, title="x: skipped, predicted", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


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
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.4))
        for i, (tool, label) in enumerate(tools):
            color = f"C{i}"
            runs, skips = [], []
            for k in names:
                if not k.endswith("_" + tool):
                    continue
                e = results[k]
                xv = e["spec"]["n"] if sweep == "sweep_n" else e["num_params"]
                if e.get("skipped"):
                    skips.append((xv, e.get("predicted_seconds"),
                                  (e.get("predicted_bytes") or 0) / GIB))
                elif "seconds" in e:
                    pk = e.get("memory", {}).get("peak_bytes")
                    runs.append((xv, e["seconds"], e["min_seconds"],
                                 None if pk is None else pk / GIB))
            runs.sort()
            if runs:
                xs = [r[0] for r in runs]
                ax_t.plot(xs, [r[1] for r in runs], "o-", color=color, label=label)
                ax_t.plot(xs, [r[2] for r in runs], ":", color=color, alpha=0.7)
                mem = [r for r in runs if r[3]]
                ax_m.plot([r[0] for r in mem], [r[3] for r in mem], "o-", color=color,
                          label=label)
            _plot_skips(ax_t, ax_m, skips, color)
        written.append(_finish_sweep_figure(
            plt, fig, ax_t, ax_m, xlabel, "seconds (o-: median, dotted: min of rounds)",
            f"Empirical-Fisher spectrum, 2 CPU threads ({sweep.replace('_', ' vs ')})",
            figdir / f"{sweep}.png"))
    for arch in ARCHS:
        names = [k for k in results if k.startswith(f"{arch}_n")]
        if not names:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.4))
        for i, (tool, label) in enumerate(tools):
            runs = sorted((results[k]["spec"]["n"], results[k]["seconds"],
                           results[k].get("memory", {}).get("peak_bytes"))
                          for k in names if k == f"{arch}_n{results[k]['spec']['n']}_{tool}"
                          and "seconds" in results[k])
            skips = sorted((results[k]["spec"]["n"], results[k].get("predicted_seconds"),
                            (results[k].get("predicted_bytes") or 0) / GIB)
                           for k in names if k == f"{arch}_n{results[k]['spec']['n']}_{tool}"
                           and results[k].get("skipped"))
            if runs:
                ax_t.plot([r[0] for r in runs], [r[1] for r in runs], "o-", color=f"C{i}",
                          label=label)
                mem = [r for r in runs if r[2]]
                ax_m.plot([r[0] for r in mem], [r[2] / GIB for r in mem], "o-", color=f"C{i}",
                          label=label)
            _plot_skips(ax_t, ax_m, skips, f"C{i}")
        written.append(_finish_sweep_figure(
            plt, fig, ax_t, ax_m, f"batch size n ({arch})", "seconds (median of rounds)",
            f"Empirical-Fisher spectrum vs n, {arch}, 2 CPU threads",
            figdir / f"arch_{arch}.png", base=2))
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats, sweeps up to n=1024/P=1e6")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated groups among {','.join(GROUPS)}")
    ap.add_argument("--archs", default=",".join(ARCHS),
                    help=f"architectures of the arch groups, among {','.join(ARCHS)}")
    ap.add_argument("--sweep-tools", default="hessrank,vmap_grad,backpack_batchgrad",
                    help="tools of the sweep_arch groups (the forward+backward always runs)")
    ap.add_argument("--out", default=str(HERE),
                    help="directory for results.json and figures/ (default: benchmarks/)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per group")
    ap.add_argument("--group-budget-s", type=float, default=120.0,
                    help="stop adding rounds to a group after this many seconds")
    ap.add_argument("--mem-cap-gb", type=float, default=12.0,
                    help="skip peer cases predicted to need more memory (also <= 70%% of free)")
    ap.add_argument("--time-cap-s", type=float, default=90.0,
                    help="skip peer cases predicted to take longer per run")
    ap.add_argument("--sweep-time-cap-s", type=float, default=30.0,
                    help="the same for the sweeps' peer cases")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda: where models, batches and every tool run (default cpu)")
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
    bench = Bench(args)
    print(f"float32 GEMM: {bench.gflops:.0f} GFLOP/s on {torch.get_num_threads()} threads",
          flush=True)
    t0 = time.perf_counter()
    suite(bench, groups)
    rows = targets(bench.results)
    print_tables(bench.results, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figs = plot(bench.results, out / "figures")
    info = machine()
    (out / "results.md").write_text(markdown(bench.results, rows, info))
    payload = {"machine": info, "gemm_gflops": bench.gflops, "groups": sorted(groups),
               "quick": args.quick, "wall_seconds": time.perf_counter() - t0,
               "targets": rows, "cases": summarised(bench.results),
               # relative to the results folder: no path of the machine it ran on
               "figures": [str(Path(f).relative_to(out)) for f in figs]}
    (out / "results.json").write_text(json.dumps(jsonable(payload), indent=1))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {f}" for f in figs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
