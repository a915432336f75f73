"""The numbers behind the reproduction table, and the table itself.

    python examples/plasticity/summarize.py RESULTS_DIR            # the reproduction table
    python examples/plasticity/summarize.py RESULTS_DIR --metrics  # every metric of every run

Windows (see ``analysis``): early = tasks 2-4 (task 1 starts from the untrained network and is
left out of the windows and of every comparison over tasks 2-T; target 3, comparing estimators
on one network, counts it), late = the last 3 tasks; "a -> b (change ± h)" is the mean over seeds of
each window and the 95% CI half-width of the mean change. "n.s.": the interval contains zero.
Each verdict is computed from these numbers by the rule printed with it; nothing is hand-written.
A target some of whose runs or measurements are missing says "not tested" and which. Runs that
differ in more than a comparison varies, or whose configuration is not what their name says,
are refused (``analysis.check_comparable``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make examples/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plasticity.analysis import (
    FIRST_TASK,
    MIN_TASKS,
    WINDOW,
    RunData,
    baseline,
    check_comparable,
    comparable,
    early_late,
    lead,
    load_runs,
    paired,
    paired_difference,
    setting,
    spearman,
    sweep_parts,
)
from plasticity.model import ACTIVATIONS
from plasticity.problems import SetupError

METRICS = [
    "acc_end", "acc_online", "hess_rank_fisher_start", "hess_rank_fisher_last2_start",
    "hess_rank_fisher_end", "hess_rank_exact_start", "hess_rank_exact_last2_start",
    "hess_rank_ggn_start", "hess_rank_lanczos_start", "overlap_start", "dead_frac",
    "dormant_frac", "active_frac", "feature_rank", "weight_norm", "grad_norm_start",
    "update_norm_online", "dist_init",
]
CLAIMED_LOSS = ("relu", "leaky_relu")  # the activations the paper says lose plasticity
BLOCK_NAMES = {"": "whole network", "_last2": "last two layers"}
# Each earlier explanation, and the direction in which it predicts loss of plasticity.
EXPLANATIONS = {
    "dead_frac": ("dead units", +1),
    "dormant_frac": ("dormant units", +1),
    "active_frac": ("active fraction", -1),
    "feature_rank": ("feature rank", -1),
    "weight_norm": ("weight norm", +1),
    "dist_init": ("distance from init", +1),
    "grad_norm_start": ("gradient norm at task start", -1),
    "update_norm_online": ("update norm", -1),
}


def metric_lines(runs: dict[str, RunData]) -> list[str]:
    """A markdown table: early -> late change of every metric of every run."""
    lines = ["| run | metric | tasks 2-4 -> last 3 (change ± 95% CI) |", "|---|---|---|"]
    for name, run in runs.items():
        for metric in METRICS:
            if metric in run:
                lines.append(f"| {name} ({len(run.seeds)} seeds, {run.num_tasks} tasks) | "
                             f"{metric} | {early_late(run[metric])} |")
    return lines


def loses(run: RunData) -> bool:
    """Loss of plasticity: end-of-task accuracy falls, with a CI that excludes zero."""
    change = early_late(run["acc_end"])
    return change.change < 0 and change.significant


def _present(runs: dict[str, RunData], prefix: str) -> list[tuple[str, RunData]]:
    return [(a, runs[f"{prefix}{a}"]) for a in ACTIVATIONS if f"{prefix}{a}" in runs]


def _absent(runs: dict[str, RunData], names: list[str]) -> list[str]:
    """The runs of ``names`` that ``runs`` lacks."""
    return [name for name in names if name not in runs]


def not_tested(missing: list[str], what: str = "run") -> str:
    """The verdict of a target (or part) whose ``missing`` runs are absent: never held or not
    held on the runs that happen to be there."""
    return f"not tested (no {', '.join(missing)} {what})"


def _every_activation(prefix: str) -> list[str]:
    return [f"{prefix}{a}" for a in ACTIVATIONS]


def target_1(runs: dict[str, RunData]) -> list[str]:
    acts = _present(runs, "act_")
    if not acts:
        return []
    verdicts = {a: loses(r) for a, r in acts}
    expected = {"relu": True, "leaky_relu": True, "tanh": False, "identity": False}
    held = all(verdicts[a] == expected[a] for a in verdicts)
    nums = "; ".join(f"{a} {early_late(r['acc_end'])}" for a, r in acts)
    fit = {a: float(r["acc_end"][:3].mean()) for a, r in acts}
    note = ("; end-of-task accuracy over tasks 1-3 (does each fit its tasks?): "
            + ", ".join(f"{a} {v:.3f}" for a, v in fit.items()))
    perm = _present(runs, "permuted_")
    if perm:
        note += "; Permuted MNIST (" + setting(perm[0][1]) + "): " + \
            "; ".join(f"{a} {early_late(r['acc_end'])}" for a, r in perm)
    wrong = [a for a in verdicts if verdicts[a] != expected[a]]
    missing = _absent(runs, _every_activation("act_"))
    verdict = not_tested(missing) if missing else "held" if held else "not as claimed for " + \
        ", ".join(f"{a} ({'loses' if verdicts[a] else 'does not lose'})" for a in wrong)
    rows = [f"| 1 (v4 reading) | ReLU and leaky-ReLU lose plasticity; tanh and identity do not "
            f"| {verdict} (rule: accuracy change < 0 with CI excluding 0; main setting: "
            f"{setting(acts[0][1])}) | end-of-task accuracy, "
            f"{nums}{note} |"]
    runs_by_act = dict(acts)
    if "tanh" in runs_by_act and "leaky_relu" in runs_by_act:
        tanh = runs_by_act["tanh"]
        acc, fr = early_late(tanh["acc_end"]), early_late(tanh["feature_rank"])
        leaky = early_late(runs_by_act["leaky_relu"]["acc_end"])
        small = loses(tanh) and abs(acc.change) < abs(leaky.change) / 2
        fr_falls = falls(tanh, "feature_rank")
        rows.append(
            f"| 1 (v1 reading) | ... but tanh shows a small rise in error and a small fall in "
            f"feature rank (v1's plots, per its reviews) | {'held' if small and fr_falls else 'no'}"
            f" (rule: tanh loses plasticity significantly but by less than half of leaky-ReLU's "
            f"loss, and its feature rank falls with a CI excluding 0; main setting) | tanh "
            f"accuracy {acc} vs leaky-ReLU {leaky}; tanh feature rank {fr} |"
        )
    return rows


def falls(run: RunData, key: str) -> bool:
    """``key`` falls from tasks 2-4 to the last 3 with a CI that excludes zero."""
    change = early_late(run[key])
    return change.change < 0 and change.significant


#: The task-start rank curves target 2 compares with accuracy: (run prefix, metric, name).
RANK_CURVES = [("act_", f"hess_rank_fisher{suffix}_start", f"{block}, EF")
               for suffix, block in BLOCK_NAMES.items()]
RANK_CURVES.append(("exact_", "hess_rank_exact_start", "exact-size model, exact"))


def target_2(runs: dict[str, RunData]) -> list[str]:
    if not _present(runs, "act_") + _present(runs, "exact_"):
        return []
    verdicts, coincide, precede, leads = [], [], [], []
    for prefix, key, named in RANK_CURVES:
        present = _present(runs, prefix)
        if not present:
            continue
        unmeasured = [f"{prefix}{a}" for a, r in present if key not in r]
        missing = _absent(runs, _every_activation(prefix))
        ok = True
        for a, r in present:
            if key not in r:
                continue
            label = f"{a}, {named}"
            rho = spearman(r[key][FIRST_TASK:].mean(1), r["acc_end"][FIRST_TASK:].mean(1))
            ok &= (falls(r, key) and rho >= 0.7) if loses(r) else not falls(r, key)
            coincide.append(f"{label}: rank {early_late(r[key])}, Spearman with accuracy "
                            f"{rho:+.2f}")
            if loses(r) and a in CLAIMED_LOSS:
                if falls(r, key):
                    mean, half, n = lead(r[key], r["acc_end"])
                    leads.append((mean, half))
                    precede.append(f"{label}: {mean:+.1f} ± {half:.1f} tasks ({n} seeds)")
                else:
                    precede.append(f"{label}: the rank does not fall")
        if unmeasured:
            verdicts.append(f"{named}: not tested ({', '.join(unmeasured)} did not measure "
                            f"{key}: see --hess-methods, --hess-blocks)")
        elif missing:
            verdicts.append(f"{named}: {not_tested(missing)}")
        else:
            verdicts.append(f"{named}: {'yes' if ok else 'no'}")
    sometimes = any(m > h for m, h in leads if not np.isnan(h))
    claimed = [a for prefix, key, _ in RANK_CURVES for a, r in _present(runs, prefix)
               if a in CLAIMED_LOSS and key in r]
    verdict_p = ("yes" if sometimes else "no") if claimed else not_tested(
        ["ReLU or leaky-ReLU"], "run with a task-start rank")
    return [
        f"| 2 (v3/v4 reading) | Hessian rank at task start falls with the rise in error "
        f"(\"coincides\"); not so for tanh/identity | {'; '.join(verdicts)} (rule: for each "
        "activation that loses plasticity the task-start rank falls with a CI excluding 0 and its "
        "Spearman correlation with end-of-task accuracy over tasks 2-T is >= 0.7; for the others "
        f"it does not fall significantly) | {'; '.join(coincide)} |",
        f"| 2 (v1 reading) | ... and sometimes *precedes* it | {verdict_p} (rule: lead = "
        "accuracy's half-fall task minus the rank's, each from task 2 to the mean of the last 3 "
        "tasks, per seed; 'yes' when some ReLU or leaky-ReLU run's lead is positive with a CI "
        "excluding 0) | lead in tasks: "
        + ("; ".join(precede) or ("no ReLU or leaky-ReLU run loses plasticity" if claimed
                                  else "none")) + " |",
    ]


def target_3(runs: dict[str, RunData]) -> list[str]:
    exact = _present(runs, "exact_")
    if not exact:
        return []
    parts, agree = [], []
    for suffix, block in BLOCK_NAMES.items():
        for a, r in exact:
            ex, ef = f"hess_rank_exact{suffix}_start", f"hess_rank_fisher{suffix}_start"
            if ex not in r or ef not in r:
                continue
            rel_ex = r[ex].mean(1) / r[ex][0].mean()
            rel_ef = r[ef].mean(1) / r[ef][0].mean()
            rho = spearman(r[ex].mean(1), r[ef].mean(1))
            gap4 = float(np.abs(rel_ex[:4] - rel_ef[:4]).max())
            gap = float(np.abs(rel_ex - rel_ef).max())
            caps = (int(r[f"hess_cap_exact{suffix}_start"][0, 0]),
                    int(r[f"hess_cap_fisher{suffix}_start"][0, 0]))
            share_ex = r[ex][0].mean() / caps[0]
            share_ef = r[ef][0].mean() / caps[1]
            agree.append(rho >= 0.8 and gap4 <= 0.1)
            parts.append(
                f"{a}, {block}: exact {r[ex][0].mean():.0f} -> {r[ex][-1].mean():.0f} of "
                f"{caps[0]}, EF {r[ef][0].mean():.0f} -> {r[ef][-1].mean():.0f} of {caps[1]} "
                f"(task 1 share of cap {share_ex:.2f} vs {share_ef:.2f}); relative to task 1, "
                f"max gap tasks 1-4 {gap4:.2f}, all tasks {gap:.2f}; Spearman {rho:+.2f}"
            )
    verdict = (f"{sum(agree)} of {len(agree)} (activation, block) pairs agree" if agree else
               "not tested (no exact_<activation> run measured both exact and fisher: see "
               "--hess-methods)")
    return [f"| 3 | EF rank tracks exact rank closely in the first tasks (Figure 3) | {verdict} "
            "(rule: relative to its task-1 value, the EF srank is within 0.10 of the exact srank "
            "over tasks 1-4 and their Spearman correlation over tasks is >= 0.8; in absolute "
            "value they cannot agree, EF being capped by n = "
            f"{exact[0][1].config['hess_samples']} samples; exact-size setting: "
            f"{setting(exact[0][1])}) | {'; '.join(parts)} |"]


def target_4(runs: dict[str, RunData]) -> list[str]:
    acts = _present(runs, "act_")
    if not acts:
        return []
    parts, failed = [], []
    for metric, (label, bad_sign) in EXPLANATIONS.items():
        counter = []
        for a, r in acts:
            change = early_late(r[metric])
            predicts_loss = change.significant and np.sign(change.change) == bad_sign
            if predicts_loss != loses(r):
                counter.append(a)
        nums = ", ".join(f"{a} {early_late(r[metric])}" for a, r in acts)
        parts.append(f"**{label}** (fails for: {', '.join(counter) or 'none'}): {nums}")
        if counter:
            failed.append(label)
    verdict = (f"{len(failed)} of {len(EXPLANATIONS)} explanations fail in at least one "
               "activation" + ("" if len(failed) == len(EXPLANATIONS) else " (not: " + ", ".join(
                   label for label, _ in EXPLANATIONS.values() if label not in failed) + ")"))
    missing = _absent(runs, _every_activation("act_"))
    if missing:
        verdict = not_tested(missing)
    return [f"| 4 | each earlier explanation fails in at least one activation | {verdict} "
            "(rule: an explanation fails for an activation when its predicted sign of change, "
            "significant, disagrees with whether that activation loses plasticity; main "
            "setting) | " + "; ".join(parts) + " |"]


def target_5(runs: dict[str, RunData]) -> list[str]:
    if "featrank_leaky_relu" not in runs or "act_leaky_relu" not in runs:
        return []
    reg, base = paired(runs["featrank_leaky_relu"], runs["act_leaky_relu"])
    acc_diff = paired_difference(reg["acc_end"][-WINDOW:].mean(0),
                                 base["acc_end"][-WINDOW:].mean(0))
    fr_diff = paired_difference(reg["feature_rank"][-WINDOW:].mean(0),
                                base["feature_rank"][-WINDOW:].mean(0))
    still_loses = loses(reg)
    fr = early_late(reg["feature_rank"])
    fr_high = not (fr.change < 0 and fr.significant)
    return [f"| 5 | feature-rank regularization does not save leaky-ReLU, although its feature "
            f"rank stays high | loss persists: {'yes' if still_loses else 'no'}; feature rank "
            f"stays high: {'yes' if fr_high else 'no'} (rule: accuracy / feature rank fall with "
            f"CI excluding 0; ours: minus the entropy of each minibatch's feature singular "
            f"values, lambda 0.1, leaky-ReLU, main setting) | with the regularizer: accuracy "
            f"{early_late(reg['acc_end'])}, feature rank {fr}; without: accuracy "
            f"{early_late(base['acc_end'])}, feature rank {early_late(base['feature_rank'])}; "
            f"last 3 tasks, with minus without (paired by seed): accuracy {acc_diff[0]:+.3f} ± "
            f"{acc_diff[1]:.3f}, feature rank {fr_diff[0]:+.1f} ± {fr_diff[1]:.1f} |"]


def target_6(runs: dict[str, RunData]) -> list[str]:
    if "act_leaky_relu" not in runs:
        return []
    leaky = runs["act_leaky_relu"]
    upd = leaky["update_norm_online"]
    curve = upd.mean(1)
    low = int(np.argmin(curve[FIRST_TASK:]) + FIRST_TASK)
    rise = paired_difference(upd[-WINDOW:].mean(0), upd[low])
    change = early_late(upd)
    grows = change.change > 0 and change.significant
    parts = [f"leaky-ReLU average update norm {change}; lowest at task {low + 1} "
             f"({curve[low]:.3g}), last 3 tasks minus that {rise[0]:+.3g} ± {rise[1]:.2g}"]
    for a in ("relu", "leaky_relu"):
        if f"act_{a}" in runs:
            grad = early_late(runs[f"act_{a}"]["grad_norm_start"])
            parts.append(f"{a} gradient norm at task start {grad}")
    overlap = ""
    pair = ["exact_relu", "exact_leaky_relu"]
    unmeasured = [name for name in pair if name in runs and "overlap_start" not in runs[name]]
    if _absent(runs, pair):
        overlap_less = not_tested(_absent(runs, pair))
    elif unmeasured:
        overlap_less = f"not tested ({', '.join(unmeasured)} did not measure it: --overlap)"
    else:  # column by column, the same seed
        relu, leaky = paired(runs["exact_relu"], runs["exact_leaky_relu"])
        r, lk = relu["overlap_start"], leaky["overlap_start"]
        diff = paired_difference(r[FIRST_TASK:].mean(0), lk[FIRST_TASK:].mean(0))
        overlap = (f"; overlap of the task-start gradient with the top-srank exact-Hessian "
                   f"eigenspace (exact-size model), tasks 2-T, ReLU {r[FIRST_TASK:].mean():.3f}, "
                   f"leaky {lk[FIRST_TASK:].mean():.3f}, ReLU minus leaky {diff[0]:+.4f} ± "
                   f"{diff[1]:.4f} (paired by seed){_overlap_ks(relu, leaky)}")
        overlap_less = "yes" if diff[0] > 0 and diff[0] > diff[1] else "no"
    # a drop, as every verdict here, needs its CI to exclude 0 (the sign alone said "yes" beside
    # two changes marked n.s.; probe 91)
    gradient_missing = _absent(runs, ["act_relu", "act_leaky_relu"])
    drops = not_tested(gradient_missing) if gradient_missing else "yes" if all(
        falls(runs[f"act_{a}"], "grad_norm_start") for a in ("relu", "leaky_relu")) else "no"
    return [f"| 6 | update norm grows for leaky-ReLU while plasticity is lost; gradient norm "
            f"drops at task start; leaky's gradients overlap less with the top Hessian subspace "
            f"| update norm grows (tasks 2-4 -> last 3): {'yes' if grows else 'no'}; gradient "
            f"norm drops: {drops}; overlap less: {overlap_less} (main setting; overlap: "
            "exact-size setting) | " + "; ".join(parts) + overlap + " |"]


def _overlap_ks(*runs: RunData) -> str:
    """The subspace dimensions k the overlap of ``runs`` took, tasks 2-T, where recorded
    (``overlap_k_start``: the srank, or the nearest gap where the srank split a cluster of equal
    eigenvalues; results of before it was recorded have none)."""
    ks = [run["overlap_k_start"][FIRST_TASK:] for run in runs if "overlap_k_start" in run]
    if len(ks) < len(runs):
        return ""
    return (f"; k (overlap_k_start) {int(min(k.min() for k in ks))}-"
            f"{int(max(k.max() for k in ks))} eigenvectors")


def _sweep_parts(run: RunData) -> tuple[str, float, str]:
    """(regularizer, strength, activation) of a sweep run, by its name
    (``reg_<regularizer>_<strength>_<activation>``, which ``check_comparable`` has checked
    against its configuration)."""
    parts = sweep_parts(run.name)
    assert parts is not None, "check_comparable refuses a reg_ name of another form"
    return parts


def _sweep_order(run: RunData) -> tuple[bool, str, float]:
    """Sort key of a sweep run: activation (ReLU first), regularizer, strength."""
    reg, strength, act = _sweep_parts(run)
    return act != "relu", reg, strength


def target_7(runs: dict[str, RunData]) -> list[str]:
    sweep = [r for name, r in runs.items() if name.startswith("reg_")]
    if not sweep:
        return []
    key = "hess_rank_fisher_start"
    helped: dict[str, list[bool]] = {}
    parts, unpaired = [], []
    late_acc, late_rank = [], []  # of the settings whose EF rank was measured
    for r in sorted(sweep, key=_sweep_order):
        reg, strength, act = _sweep_parts(r)
        base_run = runs.get(f"act_{act}")
        if base_run is None:
            unpaired.append(r.name)
            continue
        r, base = paired(r, base_run)
        acc = paired_difference(r["acc_end"][-WINDOW:].mean(0), base["acc_end"][-WINDOW:].mean(0))
        helped.setdefault(reg, []).append(acc[0] > acc[1])
        text = (f"{reg} {strength:g} {act}: accuracy {r['acc_end'][-WINDOW:].mean():.2f} "
                f"({acc[0]:+.2f} ± {acc[1]:.2f})")
        if key in r and key in base:
            rank = paired_difference(r[key][-WINDOW:].mean(0), base[key][-WINDOW:].mean(0))
            late_acc.append(r["acc_end"][-WINDOW:].mean())
            late_rank.append(r[key][-WINDOW:].mean())
            text += f", EF rank {r[key][-WINDOW:].mean():.0f} ({rank[0]:+.0f} ± {rank[1]:.0f})"
        else:
            text += ", EF rank not measured (--hess-methods without fisher)"
        parts.append(text)
    if unpaired:
        parts.append("not compared, no act_<activation> run without a regularizer: "
                     + ", ".join(unpaired))
    counts = ", ".join(f"{reg} {sum(v)}/{len(v)}" for reg, v in helped.items())
    share = {reg: sum(v) / len(v) for reg, v in helped.items()}
    best = ", ".join(reg for reg, v in share.items() if v == max(share.values()))
    if sum(v == max(share.values()) for v in share.values()) > 1:
        best += " (tied)"
    if max(share.values(), default=0.0) == 0.0:  # (one setting that does not help: "wasserstein")
        best = "none (no setting helps)"
    # a rank correlation over fewer than 3 settings says nothing (one setting printed +nan)
    rho_text = (f"{spearman(np.array(late_acc), np.array(late_rank)):+.2f}" if len(late_acc) >= 3
                else f"not computed ({len(late_acc)} setting(s) with an EF rank)")
    verdict = (f"settings (strength x activation) where the regularizer raises late accuracy over "
               f"none with a CI excluding 0: {counts}; most consistent: {best}; Spearman of late "
               f"accuracy vs late EF rank across the sweep {rho_text}" if helped else not_tested(
                   sorted({baseline(name) or "" for name in unpaired}), "run to compare with"))
    return [f"| 7 | L2, L2-Init and Wasserstein keep rank and plasticity; Wasserstein the most "
            f"consistently | {verdict} (paired with the unregularized run on the same seeds; "
            f"sweep: {setting(sweep[0])}) | last 3 tasks, value (regularized minus none ± 95% "
            "CI): " + "; ".join(parts) + " |"]


TARGETS: list[Callable[[dict[str, RunData]], list[str]]] = [
    target_1, target_2, target_3, target_4, target_5, target_6, target_7,
]


TABLE_HEADER = ["| # | target (paper.md) | held? (rule; setting it depends on) | numbers |",
                "|---|---|---|---|"]


def reproduction_table(runs: dict[str, RunData]) -> list[str]:
    """The reproduction table: one row per target (two for targets 1 and 2) that ``runs`` bear
    on; a target some of whose runs are missing says it is not tested and which.

    Raises:
        SetupError: runs the table compares differ in more than the comparison varies
            (:func:`~plasticity.analysis.check_comparable`).
    """
    check_comparable(runs)
    lines = list(TABLE_HEADER)
    for target in TARGETS:
        lines += target(runs)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", type=Path, help="directory written by run.py")
    p.add_argument("--metrics", action="store_true",
                   help="print every metric's early -> late change instead of the table")
    args = p.parse_args(argv)
    try:
        runs, left_out = comparable(load_runs(args.results))
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        # (the smoke preset's runs had been refused with no word of what to run; probe 187)
        print(f"error: no run under {args.results} has {MIN_TASKS} finished tasks"
              + (f" (left out: {'; '.join(left_out)})" if left_out else "")
              + f": each compares its early tasks with its late ones; run.py --tasks "
              f"{MIN_TASKS} or more", file=sys.stderr)
        return 2
    try:
        lines = metric_lines(runs) if args.metrics else reproduction_table(runs)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if lines == TABLE_HEADER:
        print(f"error: no row of the table fits the runs under {args.results}: the targets "
              "compare the preset runs by name and need an act_<activation> or "
              "exact_<activation> run (run.py --preset default); --metrics reports any run of "
              f"{MIN_TASKS} tasks or more",
              file=sys.stderr)
        return 2
    for line in left_out:
        print(f"left out: {line}", file=sys.stderr)
    for name, run in runs.items():
        if run.unfinished:
            print(f"{name}: {run.num_tasks} of {run.config['tasks']} tasks (unfinished); paired "
                  "comparisons use the tasks both runs have", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
