"""One run: a configuration trained for all its seeds at once over a sequence of tasks.

Layout of a run directory::

    config.json          the configuration (a rerun with a different one is refused)
    tasks/0000.json      per-task metrics, one list entry per seed; written atomically
    checkpoint.pt        model, optimizer and initial weights after the last finished task

A run killed at any point resumes from ``checkpoint.pt``: finished tasks are not redone and a task
file is only ever replaced whole (temporary file + ``os.replace``). A missing or damaged file
(deleted, truncated) is detected on resume and reported in one line naming it; no task is ever
silently skipped. The data folder is not part of the configuration: results do not depend on
where the images are stored, and no path of the machine is written into a run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pickle
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import hessrank
from plasticity import metrics
from plasticity.model import ACTIVATIONS, BatchedMLP, per_seed_cross_entropy, per_seed_norm
from plasticity.problems import (
    PROBLEMS,
    SEED_LIMIT,
    Problem,
    SetupError,
    Task,
    image_side,
    make_problem,
    task_generator,
)
from plasticity.regularizers import (
    REGULARIZERS,
    feature_rank_penalty,
    l2_init_penalty,
    l2_penalty,
    shrink_perturb_,
    wasserstein_penalty,
)

BATCH_ORDER_STREAM, NOISE_STREAM = 1, 2
# Keys an older config.json may hold that no longer describe the run (where the data was).
NOT_CONFIGURATION = ("data_dir", "download")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class Config:
    """Everything a run's results depend on. Defaults are ours where paper.md says (ours).

    The default is the main setting: Random-Label MNIST on 300 images, an MLP 784-128-128-10,
    Adam 1e-3, 30 epochs of batch 32 per task. 300 images have a pixel matrix of full rank 300
    (smallest singular value 0.79), so a linear network can memorise any labelling; 600 images
    have rank 562 and cannot be memorised by a linear map (v1 had 600 here and its linear network
    stayed at 0.70-0.82 accuracy).
    """

    name: str = "run"
    problem: str = "random_label_mnist"
    num_samples: int = 300  # images in the fixed subset (Random-Label MNIST: below 784)
    downsample: int = 1  # average-pool images by this factor (4: 7x7 MNIST)
    subset_seed: int = 0  # picks the fixed image subset, shared by all seeds
    activation: str = "relu"
    width: int = 128
    depth: int = 2
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 30  # passes over the task's data per task
    tasks: int = 30
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    reg: str = "none"
    reg_strength: float = 0.0  # lambda of the penalty; per-step shrink for shrink_perturb
    sp_noise: float = 1e-3  # Shrink & Perturb noise standard deviation
    hess_methods: list[str] = field(default_factory=lambda: ["fisher"])
    hess_blocks: list[str] = field(default_factory=lambda: ["all"])  # see metrics.BLOCKS
    hess_samples: int = 300  # samples of the task the Hessian is measured on (<= num_samples)
    #: srank threshold of every rank: the Hessian ranks, the feature rank and the overlap's k
    hess_threshold: float = 0.99
    hess_max_memory: float = 4 * 2**30  # budget of method exact (bytes), checked before a run
    #: Lanczos products; None: the library's default, min(640, ceil(P/3))
    lanczos_steps: int | None = None
    overlap: bool = False  # task-start gradient overlap with the top exact-Hessian subspace
    overlap_k: int | None = None  # dimension of that subspace (None: the Hessian's srank)
    #: at most this many of the task's images (its first min(eval_samples, images), all 300 of
    #: the main setting's) for end-of-task accuracy and unit / feature statistics
    eval_samples: int = 1000
    dormant_tau: float = 0.01


@dataclass(frozen=True)
class Allowed:
    """The values a numeric setting may take: ``low`` to ``high``, each end included or not;
    ``integer`` for counts, ``optional`` where None means the default; ``note`` says why."""

    low: float
    high: float = math.inf
    low_in: bool = True
    high_in: bool = False
    integer: bool = False
    optional: bool = False
    note: str = ""

    def __contains__(self, value: object) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(
                value, numbers.Integral if self.integer else numbers.Real):
            return False
        number = float(value)
        above = number >= self.low if self.low_in else number > self.low
        below = number <= self.high if self.high_in else number < self.high
        return above and below  # NaN is neither; infinity is never below an open end

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high == math.inf:
            return f"{kind} {'>=' if self.low_in else '>'} {self.low:,.15g}"
        return (f"{kind} in {'[' if self.low_in else '('}{self.low:,.15g}, {self.high:,.15g}"
                f"{']' if self.high_in else ')'}")

    def check(self, option: str, value: object, where: str = "") -> None:
        """Raise a :class:`SetupError` naming ``option`` and ``value`` unless it is allowed."""
        if value not in self:
            raise SetupError(f"{where}{option} {value!r}: must be {self}"
                             + (f" ({self.note})" if self.note else ""))


COUNT = Allowed(1, integer=True)
SEED = Allowed(0, SEED_LIMIT, integer=True)
RUN_SEED = Allowed(0, SEED_LIMIT, integer=True, note="the seeds are --first-seed onwards")
#: The range of every numeric setting, from how it is used (see :func:`check_config` for the
#: two whose range depends on another setting).
ALLOWED: dict[str, Allowed] = {
    "num_samples": COUNT,
    "downsample": COUNT,
    "subset_seed": SEED,
    "width": COUNT,
    "depth": Allowed(1, integer=True, note="the unit and feature statistics need a hidden layer"),
    "lr": Allowed(0, low_in=False),
    "batch_size": COUNT,
    "epochs": COUNT,
    "tasks": COUNT,
    "reg_strength": Allowed(0),
    "sp_noise": Allowed(0),
    "hess_samples": COUNT,
    "hess_threshold": Allowed(0, 1, low_in=False, high_in=True),
    "hess_max_memory": Allowed(0, low_in=False, note="bytes"),
    "lanczos_steps": Allowed(2, integer=True, optional=True,
                             note="hessrank: one step's quadrature shows no sampling error"),
    "overlap_k": Allowed(1, integer=True, optional=True),
    "eval_samples": COUNT,
    "dormant_tau": Allowed(0, 1, note="a unit's mean |output| over its layer's average of it"),
}
SHRINK = Allowed(0, 1, high_in=True, note="shrink_perturb's share of every weight shrunk per step")
#: The names each named setting may take.
CHOICES: dict[str, tuple[str, ...]] = {
    "problem": PROBLEMS,
    "activation": ACTIVATIONS,
    "optimizer": OPTIMIZERS,
    "reg": REGULARIZERS,
    "hess_methods": hessrank.METHODS,
    "hess_blocks": metrics.BLOCKS,
}


def _option(key: str) -> str:
    """The command-line option of the Config field ``key``: ``--hess-samples``."""
    return "--" + key.replace("_", "-")


def _default(key: str) -> object:
    """:class:`Config`'s default for ``key``."""
    return next(f.default for f in dataclasses.fields(Config) if f.name == key)


def check_config(cfg: Config) -> None:
    """Refuse a configuration no run can hold, before anything is read, written or trained.

    Every number must lie in the range its use allows (:data:`ALLOWED`), every name among its
    choices (:data:`CHOICES`), and ``name`` must be a folder name.

    Raises:
        SetupError: the first value refused, in one line naming its command-line option, the
            value and what is allowed.
    """
    where = f"run {cfg.name}: "
    if cfg.name in ("", ".", "..") or set(cfg.name) & {"/", os.sep, os.altsep}:
        raise SetupError(f"{where}--name {cfg.name!r}: must be a folder name (not empty, '.' or "
                         "'..', no '/')")
    for key, known in CHOICES.items():
        value = getattr(cfg, key)
        names = value if isinstance(value, list) else [value]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SetupError(f"{where}{_option(key)} names {', '.join(map(str, unknown))}: "
                             f"choose from {', '.join(known)}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SetupError(f"{where}{_option(key)} names {', '.join(twice)} more than once")
    if cfg.hess_methods and not cfg.hess_blocks:
        raise SetupError(f"{where}--hess-blocks names no block: choose from "
                         f"{', '.join(metrics.BLOCKS)} (an empty --hess-methods measures no "
                         "Hessian)")
    side = image_side(cfg.problem)
    depends = {
        "downsample": ALLOWED["downsample"] if side is None else Allowed(
            1, side, high_in=True, integer=True, note=f"{cfg.problem} has {side}x{side} images"),
        "reg_strength": SHRINK if cfg.reg == "shrink_perturb" else ALLOWED["reg_strength"],
    }
    for key, allowed in {**ALLOWED, **depends}.items():
        allowed.check(_option(key), getattr(cfg, key), where)
    COUNT.check("--seeds", len(cfg.seeds), where)
    for seed in cfg.seeds:
        RUN_SEED.check("seed", seed, where)
    # a regularizer without a strength, or a strength without one, changes nothing: every number
    # would equal --reg none's while config.json says otherwise
    if cfg.reg == "none" and cfg.reg_strength:
        raise SetupError(f"{where}--reg-strength {cfg.reg_strength:g} with --reg none: no "
                         "regularizer uses it; name one with --reg (" + ", ".join(
                             r for r in REGULARIZERS if r != "none") + ") or drop --reg-strength")
    if cfg.reg != "none" and not cfg.reg_strength:
        what = ("shrinks nothing (only its noise would act): pass the per-step shrink with "
                "--reg-strength, in (0, 1]" if cfg.reg == "shrink_perturb" else
                "adds no penalty (every number would equal --reg none's): pass its lambda with "
                "--reg-strength, above 0")
        raise SetupError(f"{where}--reg {cfg.reg} with --reg-strength 0 (the default) {what}")
    # the feature-rank penalty of one singular value is 0 whatever the weights (probe 227)
    if cfg.reg == "feature_rank" and min(cfg.batch_size, cfg.width) < 2:
        raise SetupError(f"{where}--reg feature_rank with --batch-size {cfg.batch_size} and "
                         f"--width {cfg.width}: features of one row or one column have one "
                         "singular value, whose entropy is 0 whatever the weights, so it adds "
                         "nothing; pass --batch-size and --width of 2 or more")
    # settings that only shrink_perturb or images read, recorded but never applied elsewhere
    # (every number equal to the default's while config.json said otherwise; probe 168)
    if cfg.reg != "shrink_perturb" and cfg.sp_noise != _default("sp_noise"):
        raise SetupError(f"{where}--sp-noise {cfg.sp_noise:g} with --reg {cfg.reg}: only "
                         "shrink_perturb perturbs the weights; pass --reg shrink_perturb or drop "
                         "--sp-noise")
    if side is None and cfg.downsample != _default("downsample"):
        raise SetupError(f"{where}--downsample {cfg.downsample} with --problem {cfg.problem}, "
                         "which has no images to pool: drop --downsample")
    # Task.first takes at most the task's images: a larger count would be recorded but not used
    if cfg.hess_samples > cfg.num_samples:
        raise SetupError(f"{where}--hess-samples {cfg.hess_samples} exceeds --num-samples "
                         f"{cfg.num_samples} (the Hessian is measured on the task's first "
                         f"--hess-samples images): pass --hess-samples {cfg.num_samples} or fewer")
    # a minibatch holds at most the task's images: a larger one trains as --batch-size N would,
    # number for number, while config.json (and every comparison of configurations) says otherwise
    if cfg.batch_size > cfg.num_samples:
        raise SetupError(f"{where}--batch-size {cfg.batch_size} exceeds --num-samples "
                         f"{cfg.num_samples} (a minibatch holds at most the task's images, so "
                         f"every step would train on all {cfg.num_samples}, as --batch-size "
                         f"{cfg.num_samples} does): pass --batch-size {cfg.num_samples} or fewer")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; a damaged file (not JSON, or JSON but not an object: ``[]``)
    is a :class:`SetupError` naming it."""
    try:
        held = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SetupError(f"{path} is damaged (not valid JSON: {err}); {_REDO_HINT}") from None
    if not isinstance(held, dict):
        raise SetupError(f"{path} is damaged (it holds a JSON {type(held).__name__}, not an "
                         f"object); {_REDO_HINT}")
    return held


_REDO_HINT = ("delete the run's folder to redo it from task 1 (the seed fixes every number on "
              "this machine)")


def load_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint of ``run_dir`` (None when there is none).

    Raises:
        SetupError: the checkpoint is truncated or otherwise unreadable.
    """
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise SetupError(f"{path} is damaged ({type(err).__name__}); {_REDO_HINT}") from None


def finished_tasks(run_dir: Path) -> int:
    """How many tasks the checkpoint in ``run_dir`` covers (0 when none)."""
    state = load_checkpoint(run_dir)
    return 0 if state is None else int(state["tasks_done"])


def _task_files(run_dir: Path) -> list[Path]:
    """The task files of ``run_dir`` (``tasks/NNNN.json``), in task order."""
    return sorted((run_dir / "tasks").glob("[0-9][0-9][0-9][0-9].json"))


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_record(path: Path, record: dict, t: int, seeds: list | None) -> None:
    """Raise unless ``record`` (read from ``path``) is task ``t`` as :func:`run_experiment`
    writes it: ``task`` ``t``, ``seeds`` a list of seed numbers (``seeds``, those of the run's
    first task, where given) and ``metrics`` a map from metric names to one number per seed.

    Raises:
        SetupError: naming the file and what it lacks.
    """
    held = record.get("task")
    if held != t:  # every message counts tasks from 1, as the README does
        what = (f"task {held + 1}" if isinstance(held, int) and not isinstance(held, bool)
                else f"no task number ({held!r})")
        raise SetupError(f"{path} holds {what}, not task {t + 1} (task files count from "
                         f"0000.json, task 1); {_REDO_HINT}")
    held_seeds, held_metrics = record.get("seeds"), record.get("metrics")
    if not (isinstance(held_seeds, list) and held_seeds and all(
            isinstance(s, int) and not isinstance(s, bool) for s in held_seeds)):
        fault = f"no list of seeds (seeds: {held_seeds!r})"
    elif seeds is not None and held_seeds != seeds:
        fault = f"seeds {held_seeds} where task 1 holds {seeds}"
    elif not (isinstance(held_metrics, dict) and held_metrics):
        fault = f"no metrics (metrics: {held_metrics!r})"
    else:
        fault = next((f"metric {key!r} without one number per seed ({value!r})"
                      for key, value in held_metrics.items()
                      if not (isinstance(value, list) and len(value) == len(held_seeds)
                              and all(map(_is_number, value)))), "")
    if fault:
        raise SetupError(f"{path} is damaged: it holds {fault}, not one task's results as "
                         f"run.py writes them; {_REDO_HINT}")


def load_task_results(run_dir: Path, expected: int | None = None) -> list[dict]:
    """The per-task records of a run, in task order, each checked to be task 0, 1, 2, ... as
    :func:`run_experiment` writes it (:func:`_check_record`).

    Args:
        run_dir: a run directory.
        expected: the number of tasks the run's checkpoint covers: exactly these are read, and
            must be present. A file beyond them is not this run's (one the checkpoint did not
            reach before an interruption, or one of an earlier run redone from task 1) and is
            not read. Default (no checkpoint): every file, up to the highest-numbered one.

    Raises:
        SetupError: a task file is missing (a gap, or fewer than ``expected``) or damaged.
    """
    files = _task_files(run_dir)
    count = (int(files[-1].stem) + 1 if files else 0) if expected is None else expected
    records: list[dict] = []
    for t in range(count):
        path = run_dir / "tasks" / f"{t:04d}.json"
        if not path.exists():
            raise SetupError(f"{path} is missing although the run has finished task {count}; "
                             f"{_REDO_HINT}")
        record = _read_json(path)
        _check_record(path, record, t, records[0]["seeds"] if records else None)
        records.append(record)
    return records


def discard_later_tasks(run_dir: Path, done: int) -> list[int]:
    """Remove the task files of ``run_dir`` from task ``done + 1`` on, before the run trains from
    there, so that no file of an earlier run (one redone from task 1 after its checkpoint was
    lost, as the committed results, which have none, are) is ever read beside the new ones.

    Returns:
        The indices of the tasks whose files were removed.
    """
    removed = []
    for path in _task_files(run_dir):
        if int(path.stem) >= done:
            path.unlink()
            removed.append(int(path.stem))
    return removed


def configuration(saved: dict) -> dict:
    """A ``config.json`` (or ``dataclasses.asdict`` of a :class:`Config`) as today's fields.

    Fields added to Config after the run was saved count as having their default value, and
    fields removed since (lanczos_probes) or that never described the run
    (:data:`NOT_CONFIGURATION`) are dropped.
    """
    defaults = dataclasses.asdict(Config())
    kept = {k: v for k, v in saved.items() if k in defaults and k not in NOT_CONFIGURATION}
    return json.loads(json.dumps({**defaults, **kept}))


def differing_fields(
    a: dict, b: dict, ignore: tuple[str, ...] = ()
) -> list[tuple[str, object, object]]:
    """``(field, a's value, b's value)`` for each field where configurations ``a`` and ``b``
    (config.json dicts) differ, leaving out ``ignore`` and the fields that configure a
    measurement neither run makes (``lanczos_steps`` without Lanczos, ``overlap_k`` without
    ``overlap``)."""
    before, now = configuration(a), configuration(b)
    unused = set(ignore)
    if "lanczos" not in before["hess_methods"] + now["hess_methods"]:
        unused.add("lanczos_steps")
    if not (before["overlap"] or now["overlap"]):
        unused.add("overlap_k")
    return [(key, before[key], now[key]) for key in before
            if key not in unused and before[key] != now[key]]


def config_differences(saved: dict, cfg: Config) -> list[str]:
    """``field (saved X, now Y)`` for each field where ``saved`` (a config.json) differs."""
    return [f"{key} (saved {old!r}, now {new!r})"
            for key, old, new in differing_fields(saved, dataclasses.asdict(cfg))]


def saved_config(run_dir: Path) -> dict | None:
    """The configuration ``run_dir/config.json`` holds; None for a folder without results.

    Raises:
        SetupError: ``config.json`` is damaged, or missing next to results (a checkpoint or task
            files), naming it.
    """
    path = run_dir / "config.json"
    if path.exists():
        return _read_json(path)
    if (run_dir / "checkpoint.pt").exists() or any((run_dir / "tasks").glob("*.json")):
        raise SetupError(f"{path} is missing but the folder holds results; {_REDO_HINT}")
    return None


def resume_state(cfg: Config, run_dir: Path) -> dict | None:
    """Check that ``run_dir`` can hold ``cfg``'s run and return its checkpoint (None: fresh run).

    Reads only: the saved configuration must equal ``cfg``, and every task the checkpoint covers
    must have its intact task file (files beyond it are removed when the run starts:
    :func:`discard_later_tasks`).

    Raises:
        SetupError: another configuration (naming each differing field), or a missing or
            damaged config, checkpoint or task file (naming it).
    """
    saved = saved_config(run_dir)
    if saved is not None:
        differences = config_differences(saved, cfg)
        if differences:
            raise SetupError(
                f"{run_dir} holds results of another configuration: {'; '.join(differences)}; "
                "pass another --out directory or delete that folder"
            )
    state = load_checkpoint(run_dir)
    load_task_results(run_dir, expected=0 if state is None else int(state["tasks_done"]))
    return state


def _megabytes(num_bytes: float) -> str:
    return (f"{num_bytes / 2**30:.3g} GiB" if num_bytes >= 2**30
            else f"{num_bytes / 2**20:.3g} MiB")


def check_exact_hessian(cfg: Config, problem: Problem) -> None:
    """Refuse, before anything is written, a run whose exact Hessian exceeds its memory budget
    or whose gradient overlap asks for more eigen-directions than the network has parameters.

    Raises:
        SetupError: ``method="exact"`` (or the gradient overlap, which needs it) on some block
            would need more than ``cfg.hess_max_memory`` bytes, or ``--overlap-k`` exceeds the
            number of parameters of the network ``cfg`` builds on ``problem``.
    """
    if "exact" not in cfg.hess_methods and not cfg.overlap:
        return
    model = BatchedMLP(cfg.seeds[:1], problem.input_dim, cfg.width, cfg.depth,
                       problem.num_classes, cfg.activation)
    net = model.to_module(0)
    num_params = sum(p.numel() for p in net.parameters())
    if cfg.overlap and cfg.overlap_k is not None and cfg.overlap_k > num_params:
        raise SetupError(
            f"run {cfg.name}: --overlap-k {cfg.overlap_k} exceeds the network's {num_params:,} "
            f"parameters (the dimension of the Hessian): pass --overlap-k {num_params} or fewer, "
            "or omit it to use the Hessian's srank")
    x, y = problem.task(cfg.seeds[:1], 0).first(cfg.hess_samples)
    exact_blocks = cfg.hess_blocks if "exact" in cfg.hess_methods else []
    # the overlap takes the whole network's exact Hessian, whichever blocks the ranks are on
    for block in [b for b in metrics.BLOCKS
                  if b in exact_blocks or (b == "all" and cfg.overlap)]:
        memory, _ = hessrank.predict_exact_cost(
            net, nn.CrossEntropyLoss(), (x[0], y[0]), params=metrics.block_params(net, block)
        )
        if memory > cfg.hess_max_memory:
            ways = []  # one for each user of this Hessian: together they suffice
            if block in exact_blocks:
                ways.append("drop exact from --hess-methods (fisher, ggn and lanczos have no "
                            "such cost)" + (" or measure it on --hess-blocks last2 only"
                                            if block == "all" else ""))
            if cfg.overlap and block == "all":
                ways.append("pass --no-overlap (the overlap needs the whole network's exact "
                            "Hessian, whatever --hess-blocks says)")
            raise SetupError(
                f"run {cfg.name}: the exact Hessian of block {block!r} needs about "
                f"{_megabytes(memory)}, over hess_max_memory = "
                f"{_megabytes(cfg.hess_max_memory)}; " + ", and ".join(ways)
                + "; or raise --hess-max-memory")


class Trainer:
    """Trains ``cfg.seeds`` batched, measuring at the start and end of every task."""

    def __init__(self, cfg: Config, problem: Problem) -> None:
        self.cfg, self.problem = cfg, problem
        self.model = BatchedMLP(
            cfg.seeds, problem.input_dim, cfg.width, cfg.depth, problem.num_classes, cfg.activation
        )
        params = list(self.model.parameters())
        if cfg.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, foreach=True)
        elif cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, foreach=True)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adam or sgd")
        self.init = [p.detach().clone() for p in params]
        self.init_sorted = [p.flatten(1).sort(dim=1).values for p in self.init]

    def state_dict(self, tasks_done: int) -> dict:
        return {
            "tasks_done": tasks_done,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "init": self.init,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.init = state["init"]
        self.init_sorted = [p.flatten(1).sort(dim=1).values for p in self.init]

    def penalty(self, features: torch.Tensor) -> torch.Tensor:
        """(S,) regularizer penalty; zero for none and for shrink_perturb."""
        cfg, params = self.cfg, list(self.model.parameters())
        if cfg.reg == "l2":
            return cfg.reg_strength * l2_penalty(params)
        if cfg.reg == "l2_init":
            return cfg.reg_strength * l2_init_penalty(params, self.init)
        if cfg.reg == "wasserstein":
            return cfg.reg_strength * wasserstein_penalty(params, self.init_sorted)
        if cfg.reg == "feature_rank":
            return cfg.reg_strength * feature_rank_penalty(features)
        if cfg.reg in ("none", "shrink_perturb"):
            return torch.zeros(self.model.num_seeds)
        raise ValueError(f"unknown regularizer {cfg.reg!r}")

    def measure(self, task: Task, when: str) -> dict[str, list]:
        """Accuracy, loss and curvature on ``task``; unit statistics too at the end of a task."""
        cfg, model = self.cfg, self.model
        x, y = task.first(cfg.eval_samples)
        with torch.no_grad():
            logits = model(x)
        out: dict[str, list] = {
            f"loss_{when}": per_seed_cross_entropy(logits, y).tolist(),
            f"acc_{when}": (logits.argmax(-1) == y).float().mean(1).tolist(),
            f"grad_norm_{when}": metrics.full_batch_gradient_norm(model, x, y),
        }
        xh, yh = task.first(cfg.hess_samples)
        out.update({
            f"{k}_{when}": v
            for k, v in metrics.hessian_ranks(
                model, xh, yh, cfg.hess_methods, cfg.hess_blocks, cfg.hess_threshold,
                cfg.lanczos_steps, cfg.hess_max_memory,
            ).items()
        })
        if cfg.overlap and when == "start":
            out[f"overlap_{when}"], out[f"overlap_k_{when}"] = metrics.gradient_overlap(
                model, xh, yh, cfg.overlap_k, cfg.hess_threshold, cfg.hess_max_memory
            )
        if when == "end":
            out.update(metrics.unit_stats(model, x, cfg.dormant_tau))
            out["feature_rank"] = metrics.feature_rank(model, x, cfg.hess_threshold)
            out["weight_norm"] = model.per_seed_sq_norm().sqrt().tolist()
            out["dist_init"] = model.per_seed_sq_norm(self.init).sqrt().tolist()
        return out

    def train_task(self, task: Task, t: int) -> dict[str, list]:
        """Train every seed on ``task`` for ``cfg.epochs`` passes; online (task-averaged) stats."""
        cfg, model = self.cfg, self.model
        params = list(model.parameters())
        order_gens = [task_generator(s, t, BATCH_ORDER_STREAM) for s in cfg.seeds]
        noise_gens = [task_generator(s, t, NOISE_STREAM) for s in cfg.seeds]
        n = task.num_samples
        keys = ("loss", "acc", "grad_norm", "update_norm")
        sums = {k: torch.zeros(model.num_seeds) for k in keys}
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.stack([torch.randperm(n, generator=g) for g in order_gens])
            for start in range(0, n, cfg.batch_size):
                xb, yb = task.batch(order[:, start : start + cfg.batch_size])
                logits, pre = model.forward_with_hidden(xb)
                loss = per_seed_cross_entropy(logits, yb)
                features = model.act(pre[-1]) if pre else xb
                total = (loss + self.penalty(features)).sum()
                self.opt.zero_grad(set_to_none=True)
                total.backward()
                before = torch._foreach_mul(params, 1.0)
                self.opt.step()
                if cfg.reg == "shrink_perturb":
                    shrink_perturb_(params, cfg.reg_strength, cfg.sp_noise, noise_gens)
                with torch.no_grad():
                    sums["loss"] += loss.detach()
                    sums["acc"] += (logits.argmax(-1) == yb).float().mean(1)
                    sums["grad_norm"] += per_seed_norm([p.grad for p in params])
                    sums["update_norm"] += per_seed_norm(torch._foreach_sub(params, before))
                steps += 1
        return {f"{k}_online": (v / max(steps, 1)).tolist() for k, v in sums.items()}


def prepare_run(
    cfg: Config, run_dir: Path, data_dir: str, download: bool = False
) -> tuple[dict | None, Problem]:
    """Every check that can refuse ``cfg`` in ``run_dir``, writing nothing.

    Returns:
        The checkpoint to resume from (None for a fresh run) and the loaded problem.

    Raises:
        SetupError: see :func:`check_config`, :func:`resume_state`,
            :func:`check_exact_hessian` and the data loaders.
    """
    check_config(cfg)
    state = resume_state(cfg, run_dir)
    problem = make_problem(
        cfg.problem, data_dir, cfg.num_samples, cfg.subset_seed, cfg.downsample, download
    )
    problem.check_tasks(cfg.tasks, f"run {cfg.name}: ")
    check_exact_hessian(cfg, problem)
    return state, problem


def run_experiment(
    cfg: Config,
    run_dir: Path,
    data_dir: str,
    download: bool = False,
    on_task_done: Callable[[int], None] | None = None,
    stop_after: int | None = None,
) -> list[dict]:
    """Run (or resume) ``cfg`` in ``run_dir``; return all task records.

    Everything that can refuse the run (another configuration in ``run_dir``, damaged files,
    missing data, the exact Hessian over budget) is checked before anything is written; the
    one refusal that can only come later is an explicit ``overlap_k`` that splits a cluster of
    equal eigenvalues (:func:`metrics.gradient_overlap`), at the task where it does. Task files
    beyond the checkpoint are removed before training (:func:`discard_later_tasks`), saying so
    on stderr.

    Args:
        cfg: the configuration.
        run_dir: the run's directory (created).
        data_dir: the folder holding the data sets (not recorded: results do not depend on it).
        download: let torchvision download MNIST / CIFAR-10 into ``data_dir`` when missing.
        on_task_done: called with the task index after each task is saved.
        stop_after: end the call after that many newly finished tasks (as an interruption
            would), leaving a resumable run.

    Raises:
        SetupError: one of the checks above failed; the message names the file or setting.
    """
    torch.manual_seed(0)  # nothing should draw from the global RNG; this makes sure of it anyway
    state, problem = prepare_run(cfg, run_dir, data_dir, download)
    done = 0 if state is None else int(state["tasks_done"])
    removed = discard_later_tasks(run_dir, done)
    if removed:
        why = ("it has no checkpoint.pt, so it is redone from task 1" if state is None else
               f"its checkpoint covers tasks 1-{done}")
        print(f"note: run {cfg.name}: {why}; the files of tasks "
              f"{removed[0] + 1}-{removed[-1] + 1} there ({len(removed)}) were from an earlier "
              "or interrupted run and are removed, so that old and new tasks never mix",
              file=sys.stderr)
    (run_dir / "tasks").mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt_path = run_dir / "config.json", run_dir / "checkpoint.pt"
    if not cfg_path.exists():
        _atomic_write_text(cfg_path, json.dumps(dataclasses.asdict(cfg), indent=1))
    trainer = Trainer(cfg, problem)
    if state is not None:
        trainer.load_state_dict(state)
    last = cfg.tasks if stop_after is None else min(cfg.tasks, done + stop_after)
    for t in range(done, last):
        began = time.perf_counter()
        task = problem.task(cfg.seeds, t)
        where = f"run {cfg.name}, task {t + 1}"
        try:
            record = trainer.measure(task, "start")
        except SetupError as err:  # an --overlap-k inside a tie: the run stops at this task
            raise SetupError(f"{where}: {err}") from None
        record.update(trainer.train_task(task, t))
        if not all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()):
            # (the library's refusal of the NaN weights had ended the run in a traceback
            # naming no run or task; probe 177)
            raise SetupError(f"{where}: the weights diverged to NaN or Inf in training, so no "
                             f"curvature is defined: lower --lr ({cfg.lr:g})")
        try:
            record.update(trainer.measure(task, "end"))
        except ValueError as err:  # the library's refusal (weights Adam sent to 1e30, finite:
            # their curvature below float32's range; a traceback before; probe 181)
            raise SetupError(f"{where}: the curvature after training cannot be measured (where "
                             f"the training diverged, lower --lr, {cfg.lr:g}): {err}") from None
        result = {"task": t, "seeds": cfg.seeds, "seconds": time.perf_counter() - began}
        result["metrics"] = record
        _atomic_write_text(run_dir / "tasks" / f"{t:04d}.json", json.dumps(result))
        _atomic_torch_save(trainer.state_dict(t + 1), ckpt_path)
        if on_task_done is not None:
            on_task_done(t)
    return load_task_results(run_dir)
