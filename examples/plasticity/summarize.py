"""Numbers behind the reproduction table: early-vs-late changes of every metric, per run.

    python examples/plasticity/summarize.py RESULTS_DIR [--window 3]

For each run and metric it prints the mean over seeds of the first and of the last ``window``
tasks, and the late-minus-early change with the 95% confidence interval of its mean over seeds
(Student t). A change whose interval excludes zero is marked with ``*``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

if __package__ in (None, ""):  # run as a file: make examples/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plasticity.plot import load_runs

METRICS = [
    "acc_end", "acc_online", "hess_rank_fisher_start", "hess_rank_fisher_end",
    "hess_rank_exact_start", "hess_rank_ggn_start", "hess_rank_lanczos_start", "overlap_start",
    "dead_frac", "dormant_frac", "active_frac", "feature_rank", "weight_norm", "grad_norm_start",
    "update_norm_online", "dist_init",
]


def early_late(values: np.ndarray, window: int) -> tuple[float, float, float, float]:
    """Early mean, late mean, mean change and the CI half-width of the change (tasks x seeds)."""
    early, late = values[:window].mean(0), values[-window:].mean(0)
    change = late - early
    n = len(change)
    half = stats.t.ppf(0.975, n - 1) * change.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return float(early.mean()), float(late.mean()), float(change.mean()), float(half)


def summary_lines(results: Path, window: int) -> list[str]:
    """A markdown table: one row per (run, metric)."""
    runs = load_runs(results)
    lines = [
        f"| run | metric | first {window} tasks | last {window} tasks | change (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for name, metrics in runs.items():
        seeds = next(iter(metrics.values())).shape[1]
        tasks = next(iter(metrics.values())).shape[0]
        for metric in METRICS:
            if metric not in metrics:
                continue
            early, late, change, half = early_late(metrics[metric], min(window, tasks))
            mark = "*" if abs(change) > half else ""
            lines.append(
                f"| {name} ({seeds} seeds, {tasks} tasks) | {metric} | {early:.3g} | {late:.3g} "
                f"| {change:+.3g} ± {half:.2g}{mark} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", type=Path, help="directory written by run.py")
    p.add_argument("--window", type=int, default=3, help="tasks averaged at each end (default 3)")
    args = p.parse_args(argv)
    print("\n".join(summary_lines(args.results, args.window)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
