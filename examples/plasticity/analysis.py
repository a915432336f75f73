"""Reading a results directory and the statistics every figure and table shares.

Windows: "early" is tasks 2-4 and "late" the last 3 tasks. Task 1 is left out of the windows,
and of every comparison over tasks 2-T, because its task-start measurements are of the untrained
network, which no later task resembles; only the estimator comparison (target 3, Figure 3),
which compares estimators on one network, counts it, as paper.md's "in the first few tasks"
does. Confidence intervals are 95% intervals of a mean over seeds (Student t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from plasticity.experiment import (
    configuration,
    differing_fields,
    finished_tasks,
    load_task_results,
    saved_config,
)
from plasticity.model import ACTIVATIONS
from plasticity.problems import SetupError
from plasticity.regularizers import REGULARIZERS

FIRST_TASK = 1  # index of task 2: the first task measured on a trained network
WINDOW = 3
#: Tasks a run needs for its early and late windows not to overlap.
MIN_TASKS = FIRST_TASK + 2 * WINDOW


@dataclass
class RunData:
    """One run's results: ``metrics[name]`` is an array (tasks, seeds); ``config`` its
    ``config.json`` as today's fields (:func:`~plasticity.experiment.configuration`)."""

    name: str
    seeds: list[int]
    metrics: dict[str, np.ndarray]
    config: dict = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return next(iter(self.metrics.values())).shape[0]

    @property
    def unfinished(self) -> bool:
        """Whether the run has fewer tasks than its configuration asks for."""
        return self.num_tasks < int(self.config.get("tasks", self.num_tasks))

    def __getitem__(self, metric: str) -> np.ndarray:
        return self.metrics[metric]

    def __contains__(self, metric: str) -> bool:
        return metric in self.metrics

    def restricted(self, tasks: int, seeds: list[int]) -> RunData:
        """The first ``tasks`` tasks of the given ``seeds`` (for paired comparisons)."""
        columns = [self.seeds.index(s) for s in seeds]
        return RunData(self.name, list(seeds),
                       {k: v[:tasks, columns] for k, v in self.metrics.items()}, self.config)


def load_runs(results: Path) -> dict[str, RunData]:
    """Every run under ``results`` with at least one finished task, by name.

    Only the tasks a run's checkpoint covers are read, where it has one (a file beyond it is
    not the run's: :func:`~plasticity.experiment.load_task_results`).

    Raises:
        SetupError: ``results`` is no folder, a task file is missing (a gap in the sequence,
            or one the run's checkpoint covers) or damaged, or a run's ``config.json`` is
            missing or damaged.
    """
    if not results.is_dir():
        raise SetupError(f"{results} is not a folder of runs: give the --out folder of run.py")
    runs = {}
    for run_dir in sorted(p for p in results.iterdir() if (p / "tasks").is_dir()):
        done = finished_tasks(run_dir)
        records = load_task_results(run_dir, expected=done if done else None)
        if not records:
            continue
        config = saved_config(run_dir)
        assert config is not None, "saved_config refuses a folder of results without one"
        keys = set.intersection(*(set(r["metrics"]) for r in records))
        if not keys:
            raise SetupError(f"{run_dir}: its task files share no metric (one of them is not "
                             "this run's); delete the run's folder to redo it from task 1")
        runs[run_dir.name] = RunData(
            run_dir.name, list(records[0]["seeds"]),
            {k: np.array([r["metrics"][k] for r in records], dtype=float) for k in sorted(keys)},
            configuration(config),
        )
    return runs


def ci_half_width(samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Half-width of the 95% confidence interval of the mean of ``samples`` along ``axis``."""
    n = samples.shape[axis]
    if n < 2:
        return np.full(np.delete(samples.shape, axis), np.nan)
    return stats.t.ppf(0.975, n - 1) * samples.std(axis=axis, ddof=1) / np.sqrt(n)


def mean_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds (axis 1) of (tasks, seeds) values and its CI half-width per task."""
    return values.mean(1), ci_half_width(values, axis=1)


@dataclass
class Change:
    """Early-window mean, late-window mean, and the late-minus-early change with its CI."""

    early: float
    late: float
    change: float
    half_width: float

    @property
    def significant(self) -> bool:
        return bool(abs(self.change) > self.half_width)

    def __str__(self) -> str:
        mark = "" if self.significant else ", n.s."
        return (f"{self.early:.3g} -> {self.late:.3g} ({self.change:+.3g} ± "
                f"{self.half_width:.2g}{mark})")


def paired(run: RunData, base: RunData) -> tuple[RunData, RunData]:
    """``run`` and ``base`` on the tasks both have and on ``run``'s seeds (which ``base`` must
    hold, in any order: :func:`check_comparable` refuses runs where it does not), so that their
    windows cover the same tasks of the same seeds, column by column (one still running would
    otherwise put its last tasks beside the other's later ones)."""
    tasks = min(run.num_tasks, base.num_tasks)
    return run.restricted(tasks, run.seeds), base.restricted(tasks, run.seeds)


#: Run-name prefixes of the settings whose runs, one per activation, are compared with each other.
SETTINGS = ("act_", "exact_", "permuted_")
#: Configuration fields that change no number two runs are compared on: the name, which
#: curvature is measured and on which parameter blocks (a comparison reads only what both runs
#: measured), the exact Hessian's memory budget, and whether the gradient overlap is measured.
NOT_COMPARED = ("name", "hess_methods", "hess_blocks", "hess_max_memory", "overlap")
#: The fields each comparison varies; every other field must agree.
ACROSS_ACTIVATIONS = ("activation",)
ACROSS_SWEEP = ("activation", "reg", "reg_strength", "sp_noise")
#: A regularized run against the unregularized one, on the tasks both have of its seeds.
AGAINST_BASELINE = ("reg", "reg_strength", "sp_noise", "tasks", "seeds")


def sweep_parts(name: str) -> tuple[str, float, str] | None:
    """(regularizer, strength, activation) of a sweep run named
    ``reg_<regularizer>_<strength>_<activation>`` (``reg_l2_init_0.001_leaky_relu``); None for
    a name of another form."""
    act = next((a for a in sorted(ACTIVATIONS, key=len, reverse=True)
                if name.startswith("reg_") and name.endswith(f"_{a}")), None)
    if act is None:
        return None
    reg, _, strength = name[len("reg_"): -len(act) - 1].rpartition("_")
    try:
        value = float(strength)
    except ValueError:
        return None
    known = reg in REGULARIZERS and reg != "none"
    return (reg, value, act) if known and math.isfinite(value) and value > 0 else None


def named_fields(name: str) -> dict[str, object]:
    """The configuration fields a preset-style run name says the run has, by which the table
    and the figures label it: ``act_tanh`` (and ``exact_``, ``permuted_``) activation tanh and
    no regularizer, ``featrank_leaky_relu`` leaky-ReLU with the feature-rank regularizer,
    ``reg_l2_0.001_relu`` ReLU with L2 at strength 0.001; nothing for any other name.

    Raises:
        SetupError: a name starting ``reg_`` (which puts the run in the regularizer sweep) that
            is not ``reg_<regularizer>_<strength>_<activation>``.
    """
    for prefix in SETTINGS:
        if name.startswith(prefix) and name[len(prefix):] in ACTIVATIONS:
            return {"activation": name[len(prefix):], "reg": "none"}
    if name.startswith("featrank_") and baseline(name):
        return {"activation": (baseline(name) or "")[len("act_"):], "reg": "feature_rank"}
    if not name.startswith("reg_"):
        return {}
    parts = sweep_parts(name)
    if parts is None:
        raise SetupError(
            f"{name}: a run named reg_... is read as one of the regularizer sweep, "
            "reg_<regularizer>_<strength>_<activation> (e.g. reg_l2_0.001_relu; regularizer "
            f"one of {', '.join(r for r in REGULARIZERS if r != 'none')}, strength a number "
            f"above 0, activation one of {', '.join(ACTIVATIONS)}), which {name} is not: rename "
            "its folder, or keep it in another results folder (summarize.py --metrics reports "
            "any run)")
    reg, strength, act = parts
    return {"activation": act, "reg": reg, "reg_strength": strength}


def check_names(runs: dict[str, RunData]) -> None:
    """Refuse a run whose configuration is not what its name says (:func:`named_fields`): the
    table and the figures would label it by its name (``--name act_tanh`` without
    ``--activation tanh`` made a "tanh" row of a ReLU run).

    Raises:
        SetupError: naming the run and each field its config.json holds against its name.
    """
    for name, run in runs.items():
        wrong = [(key, run.config[key], value) for key, value in named_fields(name).items()
                 if (f"{run.config[key]:g}" != f"{value:g}" if key == "reg_strength"
                     else run.config[key] != value)]
        if wrong:
            raise SetupError(
                f"{name}: its config.json holds " + "; ".join(
                    f"{key} {held!r} where its name says {said!r}" for key, held, said in wrong)
                + ", and the table and the figures label runs by name: rename its folder after "
                "its configuration, or rerun it with the settings its name says")


def baseline(name: str) -> str | None:
    """The unregularized run a regularized run ``name`` is compared with (``act_relu`` for
    ``reg_l2_0.001_relu`` and ``act_leaky_relu`` for ``featrank_leaky_relu``); None for a run
    that is no regularized run."""
    if not name.startswith(("reg_", "featrank_")):
        return None
    act = next((a for a in sorted(ACTIVATIONS, key=len, reverse=True)
                if name.endswith(f"_{a}")), None)
    return None if act is None else f"act_{act}"


def _refuse_differences(runs: list[RunData], varies: tuple[str, ...], why: str) -> None:
    """Raise a :class:`SetupError` naming the first two of ``runs`` whose configurations differ
    in a field other than ``varies`` and :data:`NOT_COMPARED`, and each such field."""
    for other in runs[1:]:
        differences = differing_fields(runs[0].config, other.config,
                                       ignore=NOT_COMPARED + varies)
        if differences:
            raise SetupError(
                f"{runs[0].name} and {other.name} differ in " + "; ".join(
                    f"{key} ({a!r} vs {b!r})" for key, a, b in differences)
                + f", but {why}: keep runs of another configuration in another results folder "
                "(run.py --out)")


def check_comparable(runs: dict[str, RunData]) -> None:
    """Refuse runs that the table and the figures would compare although their configurations
    differ in more than the comparison varies, before anything is computed or drawn.

    The runs of one setting (``act_``, ``exact_``, ``permuted_``) may differ only in their
    activation, the regularizer sweep's runs only in activation and regularizer, and a
    regularized run and its :func:`baseline` only in regularizer, tasks and seeds, the baseline
    holding every seed of the regularized run (they are paired by seed). Which curvature is
    measured may differ everywhere (:data:`NOT_COMPARED`).

    Before that, each run must be what its name says (:func:`check_names`).

    Raises:
        SetupError: naming the two runs and each differing field, or the missing seeds; or
            the run whose name and configuration disagree.
    """
    check_names(runs)
    for prefix in SETTINGS:
        group = [runs[f"{prefix}{a}"] for a in ACTIVATIONS if f"{prefix}{a}" in runs]
        _refuse_differences(group, ACROSS_ACTIVATIONS, f"the {prefix}<activation> runs are "
                            "compared with each other as one setting")
    sweep = [run for name, run in runs.items() if name.startswith("reg_")]
    _refuse_differences(sweep, ACROSS_SWEEP, "the reg_<regularizer>_<strength>_<activation> "
                        "runs are compared with each other as one sweep")
    for name, run in runs.items():
        base = runs.get(baseline(name) or "")
        if base is None:
            continue
        why = f"{name} is compared with {base.name} as the same run without its regularizer"
        _refuse_differences([base, run], AGAINST_BASELINE, why)
        missing = sorted(set(run.seeds) - set(base.seeds))
        if missing:
            raise SetupError(
                f"{name} has seeds {run.seeds} but {base.name} lacks seed(s) {missing}, and "
                f"{why}, seed by seed: rerun {base.name} with those seeds (run.py --seeds, "
                "--first-seed) into another results folder, or keep runs of other seeds apart")


def comparable(runs: dict[str, RunData]) -> tuple[dict[str, RunData], list[str]]:
    """The runs with at least :data:`MIN_TASKS` tasks, and a line for each run left out."""
    kept = {name: run for name, run in runs.items() if run.num_tasks >= MIN_TASKS}
    left = [f"{name} ({run.num_tasks} tasks: fewer than {MIN_TASKS}, so its early and late "
            "windows would overlap)" for name, run in runs.items() if name not in kept]
    return kept, left


def early_late(values: np.ndarray, window: int = WINDOW) -> Change:
    """The change of (tasks, seeds) ``values`` from tasks 2..window+1 to the last ``window``.

    Raises:
        ValueError: fewer than ``FIRST_TASK + 2 window`` tasks (the windows would overlap).
    """
    if values.shape[0] < FIRST_TASK + 2 * window:
        raise ValueError(f"{values.shape[0]} tasks: the early and late windows need "
                         f"{FIRST_TASK + 2 * window}")
    early = values[FIRST_TASK : FIRST_TASK + window].mean(0)
    late = values[-window:].mean(0)
    diff = late - early
    return Change(float(early.mean()), float(late.mean()), float(diff.mean()),
                  float(ci_half_width(diff)))


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and CI half-width over seeds of ``a - b`` (both (seeds,), same seeds in order)."""
    diff = a - b
    return float(diff.mean()), float(ci_half_width(diff))


def half_fall_task(series: np.ndarray, window: int = WINDOW) -> float:
    """The task number (1-based) at which a falling ``series`` (tasks,) first completes half of
    its fall, counted from task 2 to the mean of the last ``window`` tasks; NaN if it does not
    fall. Comparing it between two quantities says which one falls first."""
    start, end = series[FIRST_TASK], series[-window:].mean()
    fall = start - end
    if fall <= 0:
        return float("nan")
    below = np.nonzero(series[FIRST_TASK:] <= start - fall / 2)[0]
    return float(below[0] + FIRST_TASK + 1)


def lead(rank: np.ndarray, accuracy: np.ndarray) -> tuple[float, float, int]:
    """How many tasks earlier the rank completes half its fall than the accuracy does.

    Args:
        rank, accuracy: (tasks, seeds).

    Returns:
        Mean over seeds of (accuracy's half-fall task - rank's half-fall task), its CI
        half-width, and the number of seeds where both fall. Positive: the rank falls first.
    """
    diffs = np.array([
        half_fall_task(accuracy[:, s]) - half_fall_task(rank[:, s]) for s in range(rank.shape[1])
    ])
    diffs = diffs[~np.isnan(diffs)]
    if len(diffs) == 0:
        return float("nan"), float("nan"), 0
    return float(diffs.mean()), float(ci_half_width(diffs)), len(diffs)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two curves (tasks,), e.g. mean rank and mean accuracy."""
    return float(stats.spearmanr(a, b).statistic)


def problem_of(config: dict) -> str:
    """The problem and model a config.json records: ``random_label_mnist, 300 images, MLP
    width 128 x depth 2``."""
    return (f"{config['problem']}, {config['num_samples']:,} images"
            + (f" pooled {config['downsample']}x" if config["downsample"] > 1 else "")
            + f", MLP width {config['width']} x depth {config['depth']}")


def setting(run: RunData) -> str:
    """The run's setting as its config.json records it (not the main setting's description,
    which a smoke or a custom run does not have), with its seeds and tasks."""
    tasks = (f"{run.num_tasks} of {run.config['tasks']} tasks (unfinished)" if run.unfinished
             else f"{run.num_tasks} tasks")
    return (f"{problem_of(run.config)}, {run.config['epochs']} epoch(s)/task, "
            f"{len(run.seeds)} seeds, {tasks}")
