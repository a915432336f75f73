"""Measure every estimator against the exact Hessian, at one point or along a trajectory."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress, TaskID
from torch import nn

import hessrank
from hessrank.cli import presets
from hessrank.cli.errors import CliError, in_flags
from hessrank.cli.pyhessian_check import pyhessian_check
from hessrank.cli.report import human_bytes, human_seconds
from hessrank.estimators.base import DEFAULT_MAX_MEMORY

SCHEMA_VERSION = 1


#: :class:`Config` fields of ``compare``'s training along checkpoints and its PyHessian check,
#: which ``rank`` leaves out of its report
TRAINING_ONLY = ("checkpoints", "epochs", "lr", "pyhessian")


@dataclass
class Config:
    """Everything a ``compare`` or ``rank`` run depends on (stored in the JSON report)."""

    model: str = "mlp"
    activation: str = "relu"
    width: int | None = None
    depth: int | None = None
    weights: str | None = None
    data: str = "auto"
    data_dir: str | None = None
    image_size: int | None = None
    samples: int = 128
    methods: tuple[str, ...] = tuple(hessrank.METHODS)
    threshold: float = 0.99
    rtol: float | None = None
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    dtype: str = "float32"
    #: the estimators' own options that were set (``hessrank.estimator_options()``)
    estimator_options: dict[str, Any] = field(default_factory=dict)
    max_memory_gib: float | None = None
    max_seconds: float | None = None
    threads: int | None = None
    checkpoints: int = 0
    epochs: int = 20
    #: compare's training minibatch (``rank`` reports its own ``--batch-size`` instead)
    batch_size: int = 32
    lr: float = 1e-3
    pyhessian: bool = True

    def torch_device(self) -> torch.device:
        """``auto`` picks CUDA when available."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise CliError(f"unknown --device '{self.device}': {err}") from err
        if device.type not in ("cpu", "cuda"):
            raise CliError(f"--device {self.device}: hessrank measures on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CliError("--device cuda: no CUDA device here; use --device cpu")
        return device

    def data_path(self) -> Path | None:
        """``--data-dir``, else ``$HESSRANK_DATA_DIR``, a leading ``~`` expanded."""
        return Path(self.data_dir).expanduser() if self.data_dir else presets.default_data_dir()


@dataclass
class Problem:
    """A model, its data and loss, as the library takes them."""

    model: nn.Module
    data: presets.Dataset
    loss_fn: nn.Module
    num_params: int


def weights_path(cfg: Config) -> Path | None:
    """``--weights``, a leading ``~`` expanded."""
    return Path(cfg.weights).expanduser() if cfg.weights else None


def check_problem(cfg: Config) -> None:
    """What can be checked of the problem before any work, and before an output is said to be
    replaced (a refusal had followed "exists; it will be replaced"; probe 204): the device, the
    data's folder, the model's file, the weights' file.

    Raises:
        CliError: naming the problem and the fix.
    """
    cfg.torch_device()
    presets.check_data(cfg.data, cfg.data_path())
    presets.check_model_name(cfg.model)
    presets.check_weights(weights_path(cfg))


def build_problem(cfg: Config, seed: int) -> Problem:
    """The model and data set ``cfg`` names, both seeded by ``seed``."""
    device, dtype = cfg.torch_device(), presets.DTYPES[cfg.dtype]
    data = presets.load_data(
        cfg.data,
        samples=cfg.samples,
        seed=seed,
        data_dir=cfg.data_path(),
        image_size=cfg.image_size,
        dtype=dtype,
        device=device,
    )
    model = presets.build_model(
        cfg.model,
        input_shape=tuple(data.inputs.shape[1:]),
        num_classes=data.num_classes,
        activation=cfg.activation,
        width=cfg.width,
        depth=cfg.depth,
        seed=seed,
        dtype=dtype,
        device=device,
        weights=weights_path(cfg),
    )
    presets.check_model(model, data, cfg.model)
    return Problem(model, data, nn.CrossEntropyLoss(), presets.num_params(model))


def method_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``hessrank.effective_rank`` (each method takes its own options and
    ignores the others'); unset options are left to the library's defaults."""
    kwargs: dict[str, Any] = {"threshold": cfg.threshold, "rtol": cfg.rtol,
                              "measure_memory": True, **cfg.estimator_options}
    if cfg.max_memory_gib is not None:
        kwargs["max_memory"] = int(cfg.max_memory_gib * 2**30)
    if cfg.max_seconds is not None:
        kwargs["max_seconds"] = cfg.max_seconds
    return kwargs


def budget_message(method: str, err: hessrank.BudgetError, problem: Problem, cfg: Config,
                   command: str = "compare") -> str:
    """One line: what ``method`` would cost, and how to go on (``compare`` can skip ``exact``)."""
    seconds = err.seconds
    if seconds is None and method == "exact":  # what it would take, too: a few products
        batch = (problem.data.inputs, problem.data.targets)
        seconds = hessrank.predict_exact_cost(problem.model, problem.loss_fn, batch)[1]
    time_text = "" if seconds is None else f" and ~{human_seconds(seconds)}"
    advice = ("pass --skip-exact to run the approximations alone, or raise the budget"
              if method == "exact" and command == "compare"
              else "raise the budget, or choose another --method" if command == "rank"
              else "raise the budget, or leave the method out of --methods")
    # A cost predicted before the work, which the work can only raise, is a least (it had read
    # "needs ~3.0 MiB", as if the whole cost).
    least = "at least " if err.at_least else ""
    memory_limit = memory_budget_gib(cfg)
    over = []  # which of the budgets (the refusal had said "--max-memory / --max-seconds")
    if err.memory_bytes > memory_limit * 2**30:
        over.append(f"--max-memory {memory_limit:g} GiB")
    if cfg.max_seconds is not None and err.seconds is not None and err.seconds > cfg.max_seconds:
        over.append(f"--max-seconds {cfg.max_seconds:g}")
    return (
        f"{method} on {cfg.model} ({problem.num_params:,} parameters, "
        f"n = {problem.data.inputs.shape[0]}) needs {least}~{human_bytes(err.memory_bytes)}"
        f"{time_text}, over {' and '.join(over) or '--max-memory / --max-seconds'}; {advice}"
    )


def tracker(
    problem: Problem, cfg: Config, seed: int, progress: Progress | bool, on_error: str
) -> hessrank.Tracker:
    """The :class:`hessrank.Tracker` that measures ``cfg.methods`` on the problem (no log file):
    the one way the CLI, like any training loop, records curvature.

    Raises:
        CliError: an option value that a method refuses (the tracker checks the values when it
            is made, before any measurement; a model a method refuses fails that method alone).
    """
    try:
        return hessrank.Tracker(
            problem.model,
            problem.loss_fn,
            cfg.methods,
            log=None,
            on_error=on_error,
            **method_kwargs(cfg),
            seed=seed,
            progress=progress,
        )
    except (TypeError, ValueError) as err:  # a value a method refuses: before any work
        # (method_options is the Python API's; a flag goes to every method that reads it)
        raise CliError(in_flags(str(err).removesuffix(hessrank.tracker.METHOD_OPTIONS_HINT))
                       ) from err


def memory_budget_gib(cfg: Config) -> float:
    """The memory budget the methods run under (GiB): ``--max-memory``, else the library's."""
    return cfg.max_memory_gib if cfg.max_memory_gib is not None else DEFAULT_MAX_MEMORY / 2**30


def check_budget(measurement: hessrank.tracker.Measurement, problem: Problem, cfg: Config,
                 command: str = "compare") -> None:
    """A method's BudgetError stops the run with what it would cost and how to go on."""
    if isinstance(measurement.error, hessrank.BudgetError):
        raise CliError(budget_message(measurement.method, measurement.error, problem, cfg,
                                      command)) from measurement.error


def rel_error(value: float | None, reference: float | None) -> float | None:
    """``(value - reference) / |reference|``; None without a nonzero reference."""
    if value is None or reference is None or reference == 0 or not math.isfinite(reference):
        return None
    return (value - reference) / abs(reference)


def caveats(res: Any) -> list[str]:
    """What to keep in mind reading this result: Lanczos interval, structural caps, notes."""
    out = []
    if res.rank_interval is not None:
        lo, hi = res.rank_interval
        out.append(f"srank in [{lo:.0f}, {hi:.0f}]")
    numerical = res.ranks["numerical"]
    if res.max_rank < res.num_params and numerical >= res.max_rank:
        text = f"capped by the structural maximum rank {res.max_rank}"
        if not any(str(res.max_rank) in note for note in res.notes):
            out.append(text)
    out.extend(res.notes)
    return out


def record(res: Any, exact: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON record of one estimate, with its errors against the exact record; the numerical
    rank's against exact's at this estimate's ``rtol`` (the default tolerance is the matrix's
    size times epsilon: a Gram matrix's is smaller than the Hessian's ``P``)."""
    srank, numerical = float(res.rank), float(res.ranks["numerical"])
    rtol = float(res.rtol)
    other_rtol = exact is not None and exact["rtol"] != rtol  # exact counted at another rtol
    exact_numerical = None if exact is None else (
        hessrank.spectral_ranks(np.asarray(exact["eigenvalues"]), rtol=rtol)["numerical"]
        if other_rtol else exact["numerical_rank"])
    return {
        "method": res.method,
        "backend": res.backend,
        "srank": srank,
        "numerical_rank": numerical,
        "rtol": rtol,
        "srank_rel_error": rel_error(srank, exact["srank"]) if exact else None,
        # the reference of the error: exact's at this rtol (probe 133: only a note said it)
        "exact_numerical_rank": exact_numerical,
        "numerical_rank_rel_error": rel_error(numerical, exact_numerical),
        "top_eigenvalue": float(res.top_eigenvalue),
        "trace": float(res.trace),
        "seconds": float(res.seconds),
        "peak_memory": res.peak_memory,
        "max_rank": int(res.max_rank),
        "rank_interval": list(res.rank_interval) if res.rank_interval is not None else None,
        "trace_interval": (list(res.trace_interval) if res.trace_interval is not None
                           else None),
        "numerical_interval": (list(res.numerical_interval)
                               if res.numerical_interval is not None else None),
        "num_params": int(res.num_params),
        "num_samples": int(res.num_samples),
        "num_hvps": res.num_hvps,
        "ranks": {k: float(v) for k, v in res.ranks.items()},
        "caveats": caveats(res) + ([] if exact is None or not other_rtol else [
            f"numerical rank at rtol = {rtol:.3g} (its own default, for its matrix's size), "
            f"compared with exact's at that rtol ({exact_numerical:g}; "
            f"{exact['numerical_rank']:g} at exact's own {exact['rtol']:.3g})"]),
        "eigenvalues": np.asarray(res.eigenvalues, dtype=np.float64).tolist(),
        "error": None,
    }


def reference(point: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's exact record, if exact was measured and succeeded."""
    exact = point["methods"].get("exact")
    return exact if exact is not None and exact.get("error") is None else None


def failed_record(measurement: hessrank.tracker.Measurement) -> dict[str, Any]:
    """The record of an estimator that raised: the message in the command line's words
    (:func:`in_flags`), no numbers."""
    return {"method": measurement.method, "error": in_flags(measurement.record["error"])}


def spearman(exact: list[float], other: list[float]) -> float | None:
    """Spearman correlation over checkpoints; None with fewer than 3 or a constant series."""
    if len(exact) < 3 or len(set(exact)) < 2 or len(set(other)) < 2:
        return None
    from scipy.stats import spearmanr  # imported here: scipy.stats takes a second to load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(exact, other).statistic
    return float(rho) if math.isfinite(rho) else None


def summarize(report: dict[str, Any]) -> None:
    """Fill each run's ``spearman`` (rank of each estimator vs exact over its checkpoints)."""
    for run in report["runs"]:
        points = [c for c in run["checkpoints"] if "exact" in c["methods"]]
        exact = [c["methods"]["exact"].get("srank") for c in points]
        out: dict[str, float | None] = {}
        for method in report["config"]["methods"]:
            if method == "exact":
                continue
            pairs = [
                (e, c["methods"][method].get("srank"))
                for e, c in zip(exact, points, strict=True)
                if method in c["methods"]
            ]
            pairs = [(e, o) for e, o in pairs if e is not None and o is not None]
            out[method] = spearman([e for e, _ in pairs], [o for _, o in pairs])
        run["spearman"] = out


def new_report(cfg: Config, command: str = "compare") -> dict[str, Any]:
    """An empty report; runs are appended as they are measured."""
    config = asdict(cfg)
    config["methods"] = list(cfg.methods)
    config["seeds"] = list(cfg.seeds)
    config["max_memory_gib"] = memory_budget_gib(cfg)  # the default's figure, not null
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "hessrank_version": getattr(hessrank, "__version__", None),
        "config": config,
        "model": None,
        "data": None,
        "runs": [],
        "interrupted": False,
        "stopped_by": None,
        "in_progress": False,
    }


def random_labels(targets: torch.Tensor, num_classes: int, seed: int, task: int) -> torch.Tensor:
    """Task ``task``'s labels: uniform over classes, fixed by (seed, task)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + task + 1)
    labels = torch.randint(num_classes, targets.shape, generator=generator)
    return labels.to(targets.device)


def train_task(
    problem: Problem,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    seed: int,
    task: int,
    advance: Callable[[], None],
) -> float:
    """``cfg.epochs`` epochs of minibatch training on one task (train mode, then the model's mode
    again); returns the training error after it, evaluated in eval mode. The minibatch order
    and the model's own draws (dropout, from the global generator: seeded here, put back after)
    follow from ``seed`` and ``task`` (a --model with dropout trained differently on every run
    of one command; probe 103)."""
    model, x = problem.model, problem.data.inputs
    generator = torch.Generator().manual_seed(seed * 100_003 + task + 50_000)
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed * 100_003 + task + 70_000)
            for _ in range(cfg.epochs):
                order = torch.randperm(len(x), generator=generator).to(x.device)
                for start in range(0, len(x), cfg.batch_size):
                    index = order[start : start + cfg.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    problem.loss_fn(model(x[index]), targets[index]).backward()
                    optimizer.step()
                    advance()
        model.eval()
        with torch.no_grad():
            return float((model(x).argmax(dim=1) != targets).float().mean())
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)


class Phases:
    """Progress bars: one overall task with ETA, plus one per phase, on a shared Progress."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.overall: TaskID | None = None
        if progress is not None:
            self.overall = progress.add_task("compare", total=total)

    def step(self) -> None:
        """One unit of the overall task done."""
        if self.progress is not None and self.overall is not None:
            self.progress.advance(self.overall)

    def describe(self, text: str) -> None:
        """Name what the overall task is doing now."""
        if self.progress is not None and self.overall is not None:
            self.progress.update(self.overall, description=text)

    def add(self, text: str, total: float | None) -> TaskID | None:
        """A phase task (``total`` None: a spinner without ETA)."""
        return None if self.progress is None else self.progress.add_task(text, total=total)

    def advance(self, task: TaskID | None) -> None:
        """One step of a phase task."""
        if self.progress is not None and task is not None:
            self.progress.advance(task)

    def done(self, task: TaskID | None) -> None:
        """Remove a finished phase task."""
        if self.progress is not None and task is not None:
            self.progress.remove_task(task)


def run_compare(
    cfg: Config,
    report: dict[str, Any],
    progress: Progress | None,
    on_update: Callable[[dict[str, Any]], None],
) -> None:
    """Fill ``report`` seed by seed and checkpoint by checkpoint, calling ``on_update`` after
    every measurement; a KeyboardInterrupt leaves everything measured so far in ``report``."""
    points = max(cfg.checkpoints, 1)
    per_point = len(cfg.methods) + int(cfg.pyhessian)
    phases = Phases(progress, len(cfg.seeds) * points * per_point)
    for seed in cfg.seeds:
        phases.describe(f"loading data and model (seed {seed})")
        problem = build_problem(cfg, seed)
        if report["model"] is None:
            report["model"] = {"name": cfg.model, "num_params": problem.num_params}
            data = problem.data
            report["data"] = {
                "name": data.name,
                "source": data.source,
                "num_samples": int(data.inputs.shape[0]),
                "num_classes": data.num_classes,
                "input_shape": list(data.inputs.shape[1:]),
                "device": data.inputs.device.type,
            }
        run: dict[str, Any] = {"seed": seed, "checkpoints": [], "spearman": {}}
        report["runs"].append(run)
        optimizer = torch.optim.Adam(problem.model.parameters(), lr=cfg.lr)
        steps_per_task = cfg.epochs * math.ceil(len(problem.data.inputs) / cfg.batch_size)
        curvature = tracker(problem, cfg, seed, progress or False, on_error="record")
        train_error = None
        for index in range(points):
            targets = None
            if cfg.checkpoints > 0:
                targets = random_labels(problem.data.targets, problem.data.num_classes, seed, index)
            point: dict[str, Any] = {
                "index": index,
                "step": index * steps_per_task,
                "task": index + 1 if cfg.checkpoints > 0 else None,
                "labels": "random" if cfg.checkpoints > 0 else "true",
                "previous_task_train_error": train_error,
                "methods": {},
                "pyhessian": None,
            }
            run["checkpoints"].append(point)
            where = f"seed {seed}" + (f", task {index + 1}/{points}" if cfg.checkpoints else "")
            batch = (problem.data.inputs, problem.data.targets if targets is None else targets)
            for method in cfg.methods:
                phases.describe(f"{method} ({where})")
                (measurement,) = curvature.measure(batch, step=point["step"], methods=(method,))
                check_budget(measurement, problem, cfg)
                point["methods"][method] = (
                    failed_record(measurement)
                    if measurement.result is None
                    else record(measurement.result, reference(point))
                )
                phases.step()
                on_update(report)
            if cfg.pyhessian:
                phases.describe(f"pyhessian ({where})")
                spinner = phases.add("pyhessian power iteration + Hutchinson", None)
                point["pyhessian"] = pyhessian_check(
                    problem.model, problem.loss_fn, batch, seed=seed, exact=reference(point)
                )
                phases.done(spinner)
                phases.step()
                on_update(report)
            if index + 1 < points:
                task = phases.add(f"training task {index + 1} ({where})", steps_per_task)
                assert targets is not None
                try:
                    train_error = train_task(problem, targets, optimizer, cfg, seed, index,
                                             functools.partial(phases.advance, task))
                except (CliError, KeyboardInterrupt, MemoryError, torch.OutOfMemoryError):
                    raise
                except Exception as error:  # noqa: BLE001 - the model's own, named
                    # (a BatchNorm on a last minibatch of one sample had ended the command in
                    # a traceback, its measured checkpoints unwritten; probe 211)
                    raise CliError(f"training task {index + 1} ({where}) failed: "
                                   f"{type(error).__name__}: {error}") from error
                phases.done(task)
        summarize(report)
        on_update(report)
