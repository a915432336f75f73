"""Draw Figures 1-5, Permuted MNIST and the regularizer sweep from a results directory.

    python examples/plasticity/plot.py RESULTS_DIR [--out FIG_DIR]

Each curve is the mean over seeds with the 95% confidence interval of the mean (Student t) as a
band. Colours mean the same thing in every figure: one per activation, one per regularizer, one
per Hessian estimator; a regularizer's strengths are told apart by line style. A panel holds one
setting only (the main and the exact-size settings are never drawn on one axis). A figure whose
runs are missing from RESULTS_DIR is skipped. Titles name each setting as the runs' config.json
records it (problem, images, model), and a band of a fraction (accuracy, units, overlap) is
clipped to [0, 1].
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

if __package__ in (None, ""):  # run as a file: make examples/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plasticity.analysis import (  # noqa: E402
    MIN_TASKS,
    RunData,
    baseline,
    check_comparable,
    load_runs,
    mean_ci,
    paired,
    problem_of,
    setting,
    sweep_parts,
)
from plasticity.model import ACTIVATIONS  # noqa: E402
from plasticity.problems import SetupError  # noqa: E402
from plasticity.regularizers import REGULARIZERS  # noqa: E402

ACT_COLORS = {"relu": "#1f77b4", "leaky_relu": "#ff7f0e", "tanh": "#2ca02c",
              "identity": "#9467bd"}
REG_COLORS = {"none": "#555555", "l2": "#d62728", "l2_init": "#8c564b",
              "shrink_perturb": "#e377c2", "wasserstein": "#17becf", "feature_rank": "#bcbd22"}
METHOD_STYLES = {"exact": ("black", "-"), "lanczos": ("black", ":"), "ggn": ("#a6761d", "--"),
                 "fisher": ("#e6ab02", "-")}
METHOD_NAMES = {"exact": "exact", "lanczos": "Lanczos", "ggn": "GGN",
                "fisher": "empirical Fisher"}
STRENGTH_STYLES = (":", "--", "-")  # weakest to strongest
TASK_AXIS = "task (task 1 starts untrained)"
SRANK = "srank (eigen-directions)"


@dataclass(frozen=True)
class Metric:
    """How a metric is titled and what its y axis shows (with units)."""

    title: str
    ylabel: str


METRICS = {
    "acc_end": Metric("end-of-task train accuracy", "accuracy (fraction of the task's images)"),
    "acc_online": Metric("online train accuracy (task average)", "accuracy (fraction)"),
    "dead_frac": Metric("dead units", "fraction of hidden units"),
    "dormant_frac": Metric("dormant units", "fraction of hidden units"),
    "active_frac": Metric("active (unit, input) pairs", "fraction of pairs"),
    "feature_rank": Metric("feature rank (penultimate layer)", "srank (at most its width)"),
    "weight_norm": Metric("weight norm ||theta||", "L2 norm (parameter units)"),
    "dist_init": Metric("distance from init ||theta - theta_0||", "L2 norm (parameter units)"),
    "grad_norm_start": Metric("full-batch gradient norm at task start", "L2 norm of gradient"),
    "update_norm_online": Metric("average update norm ||theta_t+1 - theta_t||",
                                 "L2 norm per step"),
    "hess_rank_fisher_start": Metric("EF Hessian rank at task start, whole network", SRANK),
    "hess_rank_fisher_last2_start": Metric("EF Hessian rank at task start, last two layers",
                                           SRANK),
    "hess_rank_fisher_end": Metric("EF Hessian rank at task end, whole network", SRANK),
    "hess_rank_fisher_last2_end": Metric("EF Hessian rank at task end, last two layers", SRANK),
    "hess_rank_exact_start": Metric("exact Hessian rank at task start, whole network", SRANK),
    "hess_rank_exact_last2_start": Metric("exact Hessian rank at task start, last two layers",
                                          SRANK),
    "overlap_start": Metric("gradient share in top-srank Hessian eigenspace (start)",
                            "share of ||g||^2"),
}


#: Metrics that are fractions: their confidence bands are clipped to [0, 1] (a band of the mean
#: of a few seeds can pass either end; the fraction cannot).
FRACTIONS = ("acc_", "dead_frac", "dormant_frac", "active_frac", "overlap_start")


def limits(metric: str) -> tuple[float, float]:
    """The values ``metric`` can take: [0, 1] for a fraction (:data:`FRACTIONS`)."""
    return (0.0, 1.0) if metric.startswith(FRACTIONS) else (-np.inf, np.inf)


def band(ax: plt.Axes, values: np.ndarray, label: str, color: str, style: str = "-",
         metric: str = "") -> None:
    """One mean curve over seeds with its 95% confidence band, tasks numbered from 1; the band
    kept within the values ``metric`` can take (:func:`limits`)."""
    mean, half = mean_ci(values)
    x = np.arange(1, len(mean) + 1)
    ax.plot(x, mean, style, label=label, color=color, lw=1.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not np.isnan(half).all():
        ax.fill_between(x, *np.clip([mean - half, mean + half], *limits(metric)), alpha=0.18,
                        color=color, lw=0)


def legend(ax: plt.Axes, size: int) -> None:
    """A legend on ``ax`` when it has labelled curves; else a note that nothing was measured."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)
    elif not ax.lines:
        ax.text(0.5, 0.5, "not measured by these runs", transform=ax.transAxes, ha="center",
                va="center", fontsize=8, color="grey")


def label_axes(ax: plt.Axes, metric: str) -> None:
    spec = METRICS.get(metric, Metric(metric, metric))
    ax.set_title(spec.title, fontsize=9)
    ax.set_ylabel(spec.ylabel, fontsize=8)
    ax.set_xlabel(TASK_AXIS, fontsize=8)
    ax.tick_params(labelsize=7)


def about(runs: dict[str, RunData], prefix: str, full: bool = True) -> str:
    """The runs named ``prefix...`` and their setting as the first one's config.json records it
    (``check_comparable`` has made the others agree): ``act_*: random_label_mnist, 300 images,
    MLP width 128 x depth 2`` and, ``full``, its epochs, seeds and tasks."""
    run = next((run for name, run in runs.items() if name.startswith(prefix)), None)
    if run is None:
        return f"{prefix}*"
    return f"{prefix}*: " + (setting(run) if full else problem_of(run.config))


def _grid(panels: int, ncols: int) -> tuple[plt.Figure, np.ndarray]:
    nrows = -(-panels // ncols)
    cols = min(ncols, panels)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    return fig, axes


def _save(fig: plt.Figure, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def activation_figure(
    runs: dict[str, RunData], prefix: str, metrics: list[str], path: Path, title: str,
    extra: dict[str, tuple[str, str]] | None = None, ncols: int = 4,
) -> bool:
    """One panel per metric, one curve per activation (``prefix + activation`` runs), plus
    ``extra`` runs drawn as ``name -> (label, colour)``. False when no run is present."""
    curves = [(f"{prefix}{a}", a, ACT_COLORS[a]) for a in ACTIVATIONS if f"{prefix}{a}" in runs]
    curves += [(n, label, c) for n, (label, c) in (extra or {}).items() if n in runs]
    if not curves:
        return False
    fig, axes = _grid(len(metrics), ncols)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for name, label, color in curves:
            if metric in runs[name]:
                band(ax, runs[name][metric], label, color, metric=metric)
        label_axes(ax, metric)
        legend(ax, 7)
    _save(fig, path, title)
    return True


def estimator_figure(runs: dict[str, RunData], path: Path) -> bool:
    """Figure 3 on equal footing: each estimator's srank at task start as a share of its cap
    (rows 1 and 3) and relative to its own task-1 value (rows 2 and 4), per parameter block."""
    acts = [a for a in ACTIVATIONS if f"exact_{a}" in runs]
    if not acts:
        return False
    rows = [("", "cap"), ("", "task1"), ("_last2", "cap"), ("_last2", "task1")]
    fig, axes = plt.subplots(len(rows), len(acts), figsize=(4.2 * len(acts), 3.2 * len(rows)),
                             squeeze=False)
    for col, act in enumerate(acts):
        run = runs[f"exact_{act}"]
        for row, (suffix, scale) in enumerate(rows):
            ax = axes[row, col]
            block = "whole network" if not suffix else "last two layers"
            for method, (color, style) in METHOD_STYLES.items():
                key = f"hess_rank_{method}{suffix}_start"
                if key not in run:
                    continue
                values = run[key]
                if scale == "cap":
                    cap = int(run[f"hess_cap_{method}{suffix}_start"][0, 0])
                    values, label = values / cap, f"{METHOD_NAMES[method]} (cap {cap})"
                else:
                    values, label = values / values[0].mean(), METHOD_NAMES[method]
                band(ax, values, label, color, style)
            ax.set_title(f"{act}, {block}", fontsize=9)
            ax.set_ylabel("srank / cap (P, n or n(C-1))" if scale == "cap"
                          else "srank / its task-1 mean", fontsize=8)
            ax.set_xlabel(TASK_AXIS, fontsize=8)
            ax.tick_params(labelsize=7)
            legend(ax, 6)
    _save(fig, path, "Figure 3: Hessian rank estimators at task start\n"
                     f"({about(runs, 'exact_')}; rows: block x normalisation)")
    return True


def update_norm_figure(runs: dict[str, RunData], path: Path) -> bool:
    """Figure 5: update and gradient norms (the ``act_`` runs, the main setting of the presets,
    row 1) and the gradient-Hessian overlap (the ``exact_`` runs, row 2); ReLU and leaky-ReLU."""
    pair = ("relu", "leaky_relu")
    rows = [("act_", ["update_norm_online", "grad_norm_start", "acc_end"]),
            ("exact_", ["overlap_start", "acc_end"])]
    if not any(f"{p}{a}" in runs for p, _ in rows for a in pair):
        return False
    fig, axes = plt.subplots(2, 3, figsize=(12.6, 6.8), squeeze=False)
    for row, (prefix, metrics) in enumerate(rows):
        named = about(runs, prefix, full=False)
        for col in range(3):
            ax = axes[row, col]
            if col >= len(metrics):
                ax.axis("off")
                continue
            for a in pair:
                if f"{prefix}{a}" in runs and metrics[col] in runs[f"{prefix}{a}"]:
                    band(ax, runs[f"{prefix}{a}"][metrics[col]], a, ACT_COLORS[a],
                         metric=metrics[col])
            label_axes(ax, metrics[col])
            ax.set_title(f"{named}:\n{ax.get_title()}", fontsize=7)
            legend(ax, 7)
    _save(fig, path, "Figure 5: update norm, gradient norm and gradient-Hessian overlap")
    return True


def reg_runs(runs: dict[str, RunData], reg: str, act: str) -> list[tuple[float, RunData]]:
    """The sweep's runs of ``reg`` on ``act``, by increasing strength."""
    found = []
    for name, run in runs.items():
        parts = sweep_parts(name)
        if parts is not None and (parts[0], parts[2]) == (reg, act):
            found.append((parts[1], run))
    return sorted(found, key=lambda item: item[0])


def regularizer_figures(runs: dict[str, RunData], out: Path) -> list[Path]:
    """The sweep: curves per regularizer (rows) and a late-accuracy-vs-strength summary."""
    regs = [r for r in REGULARIZERS if r not in ("none", "feature_rank")]
    acts = [a for a in ("relu", "leaky_relu") if any(reg_runs(runs, r, a) for r in regs)]
    if not acts:
        return []
    panels = [(a, m) for a in acts for m in ("acc_end", "hess_rank_fisher_start")]
    fig, axes = plt.subplots(len(regs), len(panels), figsize=(4.2 * len(panels), 3 * len(regs)),
                             squeeze=False)
    for row, reg in enumerate(regs):
        for col, (act, metric) in enumerate(panels):
            ax = axes[row, col]
            sweep = [(s, run) for s, run in reg_runs(runs, reg, act) if metric in run]
            base_run = runs.get(baseline(sweep[0][1].name) or "") if sweep else None
            if base_run is not None and metric in base_run:
                base = paired(sweep[0][1], base_run)[1]
                band(ax, base[metric], "none", REG_COLORS["none"], metric=metric)
            for style, (strength, run) in zip(STRENGTH_STYLES, sweep, strict=False):
                band(ax, run[metric], f"{reg} {strength:g}", REG_COLORS[reg], style, metric)
            label_axes(ax, metric)
            ax.set_title(f"{act}, {reg}: {ax.get_title()}", fontsize=8)
            legend(ax, 6)
    curves = out / "regularizers.png"
    _save(fig, curves, "Regularizer sweep: strengths by line style, none in grey on the same "
                       f"seeds\n({about(runs, 'reg_')})")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (act, metric) in zip(axes.flat, panels, strict=True):
        for reg in regs:
            sweep = [(s, run) for s, run in reg_runs(runs, reg, act) if metric in run]
            if not sweep:
                continue
            base_run = runs.get(baseline(sweep[0][1].name) or "")
            if base_run is not None and metric not in base_run:
                base_run = None
            # the last 3 of the tasks every run here has (one may still be running)
            common = min(run.num_tasks for run in [r for _, r in sweep] + [base_run] if run)
            late = np.array([run.restricted(common, run.seeds)[metric][-3:].mean(0)
                             for _, run in sweep])  # (strengths, seeds)
            mean, half = mean_ci(late)
            low, high = np.clip([mean - half, mean + half], *limits(metric))
            ax.errorbar([s for s, _ in sweep], mean, yerr=[mean - low, high - mean],
                        color=REG_COLORS[reg], marker="o", capsize=3, label=reg)
            if base_run is not None:
                base = base_run.restricted(common, sweep[0][1].seeds)
                ax.axhline(base[metric][-3:].mean(), color=REG_COLORS["none"], ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("strength (lambda; shrink p per step for shrink_perturb)", fontsize=8)
        ax.set_ylabel(METRICS[metric].ylabel, fontsize=8)
        ax.set_title(f"{act}: {METRICS[metric].title}, last 3 tasks\n(dashed: none)", fontsize=8)
        ax.tick_params(labelsize=7)
        legend(ax, 6)
    summary = out / "regularizers_by_strength.png"
    _save(fig, summary, "Regularizer sweep: last-3-task mean ± 95% CI against strength")
    return [curves, summary]


def overview_figure(runs: dict[str, RunData], path: Path) -> bool:
    """Accuracy and Hessian rank of the four activations, one column per setting."""
    settings = [("act_", "hess_rank_fisher_start"), ("permuted_", "hess_rank_fisher_start"),
                ("exact_", "hess_rank_exact_start")]
    settings = [s for s in settings if any(f"{s[0]}{a}" in runs for a in ACTIVATIONS)]
    if not settings:
        return False
    fig, axes = plt.subplots(2, len(settings), figsize=(4.4 * len(settings), 6.6), squeeze=False)
    for col, (prefix, rank_key) in enumerate(settings):
        named = about(runs, prefix, full=False).replace(", MLP", ",\nMLP")
        for row, metric in enumerate(("acc_end", rank_key)):
            ax = axes[row, col]
            for a in ACTIVATIONS:
                if f"{prefix}{a}" in runs and metric in runs[f"{prefix}{a}"]:
                    band(ax, runs[f"{prefix}{a}"][metric], a, ACT_COLORS[a], metric=metric)
            label_axes(ax, metric)
            ax.set_title(f"{named}\n{ax.get_title()}", fontsize=7)
            legend(ax, 7)
    _save(fig, path, "Overview: plasticity and Hessian rank by activation, per setting")
    return True


def draw_all(results: Path, out: Path) -> list[Path]:
    """Every figure the runs in ``results`` allow; returns the PNG paths written.

    Raises:
        SetupError: no run has task results, or runs a figure compares differ in more than the
            comparison varies (:func:`~plasticity.analysis.check_comparable`); nothing is written.
    """
    runs = load_runs(results)
    if not runs:
        raise SetupError(f"no runs with task results under {results}")
    check_comparable(runs)
    out.mkdir(parents=True, exist_ok=True)
    hess = ["hess_rank_fisher_start", "hess_rank_fisher_last2_start", "hess_rank_fisher_end",
            "hess_rank_fisher_last2_end"]
    fig1 = ["acc_end", "acc_online", "dead_frac", "dormant_frac", "active_frac", "feature_rank",
            "weight_norm", "dist_init", "grad_norm_start", "update_norm_online"]

    by_activation = {
        "fig1_explanations.png": ("act_", fig1,
                                  f"Figure 1: earlier explanations ({about(runs, 'act_')})", None),
        "fig2_feature_rank_reg.png": (
            "act_", ["acc_end", "acc_online", "feature_rank", "hess_rank_fisher_start"],
            f"Figure 2: feature-rank regularization on leaky-ReLU ({about(runs, 'featrank_')})",
            {"featrank_leaky_relu": ("leaky_relu + feature-rank reg.",
                                     REG_COLORS["feature_rank"])},
        ),
        "fig4_curvature.png": ("act_", ["acc_end", "acc_online"] + hess,
                               "Figure 4: empirical-Fisher Hessian rank and plasticity, both "
                               f"parameter blocks\n({about(runs, 'act_')})", None),
        "fig4_exact_size.png": ("exact_", ["acc_end", "hess_rank_exact_start",
                                           "hess_rank_exact_last2_start"],
                                f"Figure 4, exact Hessian ({about(runs, 'exact_')})",
                                None),
        "permuted_mnist.png": ("permuted_", ["acc_end", "acc_online"] + hess[:2] +
                               ["dead_frac", "feature_rank"],
                               f"Permuted tasks ({about(runs, 'permuted_')})", None),
    }
    written = []
    for filename, (prefix, metrics, title, extra) in by_activation.items():
        if filename == "fig2_feature_rank_reg.png":  # the regularized run beside ReLU's
            if "featrank_leaky_relu" not in runs:  # and leaky-ReLU's, or no Figure 2
                continue
            sub = {k: v for k, v in runs.items()
                   if k in ("act_relu", "act_leaky_relu", "featrank_leaky_relu")}
        else:
            sub = runs
        if activation_figure(sub, prefix, metrics, out / filename, title, extra):
            written.append(out / filename)
    if overview_figure(runs, out / "overview.png"):
        written.append(out / "overview.png")
    if estimator_figure(runs, out / "fig3_estimators.png"):
        written.append(out / "fig3_estimators.png")
    if update_norm_figure(runs, out / "fig5_update_norm.png"):
        written.append(out / "fig5_update_norm.png")
    written += regularizer_figures(runs, out)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", type=Path, help="directory written by run.py")
    p.add_argument("--out", type=Path, default=None, help="default RESULTS/figures")
    args = p.parse_args(argv)
    try:
        written = draw_all(args.results, args.out or args.results / "figures")
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print(f"error: no figure fits the runs under {args.results}: the figures compare the "
              "preset runs by name (act_<activation>, exact_<activation>, permuted_<activation>, "
              "reg_<regularizer>_<strength>_<activation>); summarize.py --metrics reports any "
              f"run of {MIN_TASKS} tasks or more", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
