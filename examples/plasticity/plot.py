"""Draw Figures 1-5 and the regularizer comparison from a results directory.

    python examples/plasticity/plot.py RESULTS_DIR [--out FIG_DIR]

Each curve is the mean over seeds with the 95% confidence interval of the mean (Student t) as a
band. A figure whose runs are missing from RESULTS_DIR is skipped; ``all_runs.png`` (accuracy and
Hessian rank of every run) is always drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

ACTS = ["act_relu", "act_leaky_relu", "act_tanh", "act_identity"]
REGS = [
    "act_relu", "reg_l2_relu", "reg_l2_init_relu", "reg_shrink_perturb_relu",
    "reg_wasserstein_relu",
]
LABELS = {
    "acc_end": "end-of-task train accuracy",
    "acc_online": "online train accuracy",
    "loss_end": "end-of-task train loss",
    "dead_frac": "dead units (fraction)",
    "dormant_frac": "dormant units (fraction)",
    "active_frac": "active fraction",
    "feature_rank": "feature rank (srank)",
    "weight_norm": "weight norm",
    "grad_norm_start": "gradient norm at task start",
    "grad_norm_online": "avg. gradient norm",
    "update_norm_online": "avg. update norm",
    "dist_init": "distance from init",
    "hess_rank_fisher_start": "Hessian rank (EF) at task start",
    "hess_rank_fisher_end": "Hessian rank (EF) at task end",
    "overlap_start": "grad. overlap with top Hessian at task start",
}

Runs = dict[str, dict[str, np.ndarray]]


def load_runs(results: Path) -> Runs:
    """run name -> metric -> array (tasks, seeds)."""
    runs: Runs = {}
    for run_dir in sorted(p for p in results.iterdir() if (p / "tasks").is_dir()):
        records = [json.loads(f.read_text()) for f in sorted((run_dir / "tasks").glob("*.json"))]
        if not records:
            continue
        keys = set.intersection(*(set(r["metrics"]) for r in records))
        runs[run_dir.name] = {
            k: np.array([r["metrics"][k] for r in records], dtype=float) for k in sorted(keys)
        }
    return runs


def mean_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds (axis 1) and the half-width of its 95% confidence interval."""
    n = values.shape[1]
    mean = values.mean(1)
    if n < 2:
        return mean, np.zeros_like(mean)
    half = stats.t.ppf(0.975, n - 1) * values.std(1, ddof=1) / np.sqrt(n)
    return mean, half


def band(ax: plt.Axes, values: np.ndarray, label: str, color: str | None = None) -> None:
    """One mean curve with its confidence band, tasks numbered from 1."""
    mean, half = mean_ci(values)
    x = np.arange(1, len(mean) + 1)
    (line,) = ax.plot(x, mean, label=label, color=color)
    ax.fill_between(x, mean - half, mean + half, alpha=0.25, color=line.get_color())


def panel_figure(
    runs: Runs, names: list[str], metrics: list[str], path: Path, title: str, ncols: int = 4
) -> bool:
    """One panel per metric, one curve per run; False (nothing drawn) when no run is present."""
    present = [n for n in names if n in runs]
    if not present:
        return False
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, min(ncols, len(metrics)), figsize=(4 * ncols, 3 * nrows),
                             squeeze=False)
    colors = {name: f"C{i % 10}" for i, name in enumerate(present)}  # one colour per run
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for name in present:
            if metric in runs[name]:
                band(ax, runs[name][metric], name, colors[name])
        ax.set_title(LABELS.get(metric, metric), fontsize=9)
        ax.set_xlabel("task")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def estimator_figure(runs: Runs, path: Path) -> bool:
    """Figure 3: exact, GGN, EF and Lanczos srank at task start, one panel per activation."""
    names = [n for n in runs if n.startswith("exact_")]
    if not names:
        return False
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6), squeeze=False)
    for col, name in enumerate(names):
        for row, when in enumerate(("start", "end")):
            ax = axes[row, col]
            for method in ("exact", "ggn", "fisher", "lanczos"):
                key = f"hess_rank_{method}_{when}"
                if key in runs[name]:
                    band(ax, runs[name][key], method)
            ax.set_title(f"{name}: Hessian srank at task {when}", fontsize=9)
            ax.set_xlabel("task")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Figure 3: estimators of the Hessian rank (exact-size model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def draw_all(results: Path, out: Path) -> list[Path]:
    """Every figure the runs in ``results`` allow; returns the PNG paths written."""
    runs = load_runs(results)
    if not runs:
        raise SystemExit(f"no runs with task results under {results}")
    out.mkdir(parents=True, exist_ok=True)
    fig1 = [
        "acc_end", "acc_online", "dead_frac", "dormant_frac", "active_frac", "feature_rank",
        "weight_norm", "grad_norm_start", "update_norm_online", "dist_init",
    ]
    figures = {
        "fig1_explanations.png": (ACTS, fig1, "Figure 1: earlier explanations"),
        "fig2_feature_rank_reg.png": (
            ["act_leaky_relu", "featrank_leaky_relu", "act_relu"],
            ["acc_end", "acc_online", "feature_rank", "hess_rank_fisher_start"],
            "Figure 2: feature-rank regularization",
        ),
        "fig4_curvature.png": (
            ACTS,
            ["acc_end", "acc_online", "hess_rank_fisher_start", "hess_rank_fisher_end"],
            "Figure 4: Hessian rank (empirical Fisher) and plasticity",
        ),
        "fig5_update_norm.png": (
            ["act_relu", "act_leaky_relu", "exact_relu", "exact_leaky_relu"],
            ["update_norm_online", "grad_norm_start", "acc_end", "overlap_start"],
            "Figure 5: update norm, gradient norm and gradient-Hessian overlap",
        ),
        "regularizers.png": (
            REGS,
            ["acc_end", "acc_online", "hess_rank_fisher_start", "weight_norm"],
            "Regularizers (ReLU)",
        ),
        "all_runs.png": (
            sorted(runs),
            ["acc_end", "acc_online", "hess_rank_fisher_start", "hess_rank_fisher_end"],
            "All runs",
        ),
    }
    written = []
    for filename, (names, metrics, title) in figures.items():
        if panel_figure(runs, names, metrics, out / filename, title):
            written.append(out / filename)
    if estimator_figure(runs, out / "fig3_estimators.png"):
        written.append(out / "fig3_estimators.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("results", type=Path, help="directory written by run.py")
    p.add_argument("--out", type=Path, default=None, help="default RESULTS/figures")
    args = p.parse_args(argv)
    for path in draw_all(args.results, args.out or args.results / "figures"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
