"""Render a compare report: rich tables, JSON, CSV and a PNG plot.

The JSON report (``schema_version`` 1) holds ``config`` (every option), ``model`` (name,
``num_params``), ``data`` (name, source, ``num_samples``, ``num_classes``, ``input_shape``,
``device``), ``interrupted`` and ``stopped_by`` (null, ``"Ctrl-C"`` or the refusal that stopped
the run after some checkpoints), ``in_progress`` (true in the copies written after each
measurement while the run goes on: a file still true when no run is going was left by a killed
one), and ``runs``: one per seed, each with ``spearman`` (estimator
-> rho of its srank with exact's over the checkpoints, or null) and ``checkpoints``. A
checkpoint has ``index``, ``step`` (optimizer steps taken before it), ``task`` (null without
``--checkpoints``), ``labels`` (``true``/``random``), ``previous_task_train_error``,
``pyhessian`` (top eigenvalue, Hutchinson trace, its standard error and probe count, relative
differences to exact, ``error``) and ``methods``: estimator -> ``srank``, ``numerical_rank``,
their ``*_rel_error`` against exact, ``top_eigenvalue``, ``trace``, ``seconds``,
``peak_memory``, ``backend``, ``max_rank``, ``rank_interval``, ``trace_interval`` and
``numerical_interval`` (Lanczos' 95 % intervals), ``ranks`` (every definition), ``caveats``,
``eigenvalues`` and ``error`` (a message when the estimator failed). ``summary`` repeats every
number of the tables as mean/std/n over seeds per checkpoint (``std`` the sample standard
deviation, null for one value), over the seeds whose checkpoint every method finished where
there are any (``seeds``: how many).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from hessrank.cli.errors import CliError
from hessrank.cli.presets import PRESETS

METHOD_FIELDS = (
    "srank",
    "srank_rel_error",
    "numerical_rank",
    "numerical_rank_rel_error",
    "top_eigenvalue",
    "trace",
    "seconds",
    "peak_memory",
)
PYHESSIAN_FIELDS = (
    "exact_top_eigenvalue",
    "top_eigenvalue",
    "top_rel_diff",
    "exact_trace",
    "trace",
    "trace_rel_diff",
    "trace_stderr",
    "trace_samples",
    "seconds",
)
MAX_TASK_COLUMNS = 6
CPU_MEMORY_NOTE = (
    "peak memory (CPU): growth of the process's resident set during each call, after the "
    "allocator's free memory is returned to the system; the heap earlier methods left can still "
    "move a figure by tens of MiB, so run one --methods at a time for the most exact figure"
)
CSV_COLUMNS = (
    "seed",
    "checkpoint",
    "task",
    "method",
    "backend",
    *METHOD_FIELDS,
    "max_rank",
    "rank_lo",
    "rank_hi",
    "spearman_vs_exact",
    "exact_top_eigenvalue",
    "exact_trace",
    "top_rel_diff",
    "trace_rel_diff",
    "trace_stderr",
    "trace_samples",
    "trace_stopped_by_sign",
    "previous_task_train_error",
    "caveats",
    "error",
    "n",  # a mean/std row's: the seeds it averages (last: the columns before kept their places)
)


def stats(values: list[float | None]) -> dict[str, float | int | None] | None:
    """Mean, sample standard deviation (ddof 1; None for one value) and count of the non-None
    values; None if none."""
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return None
    std = float(np.std(clean, ddof=1)) if len(clean) > 1 else None
    return {"mean": float(np.mean(clean)), "std": std, "n": len(clean)}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Every number of the tables, as mean/std/n over seeds, per checkpoint."""
    runs = report["runs"]
    methods = report["config"]["methods"]
    points = max((len(r["checkpoints"]) for r in runs), default=0)
    checkpoints = []
    for index in range(points):
        here = [r["checkpoints"][index] for r in runs if len(r["checkpoints"]) > index]
        # the seeds every method finished, where there are any: a run stopped in its last
        # seed had averaged exact over 3 seeds and the others over 2 (probe 110)
        here = [c for c in here if set(methods) <= set(c["methods"])] or here
        per_method = {}
        for method in methods:
            records = [c["methods"][method] for c in here if method in c["methods"]]
            if records:
                per_method[method] = {f: stats([r.get(f) for r in records]) for f in METHOD_FIELDS}
        checks = [c["pyhessian"] for c in here if c.get("pyhessian")]
        checkpoints.append(
            {
                "index": index,
                "task": here[0]["task"],
                "seeds": len(here),
                "methods": per_method,
                "pyhessian": {f: stats([c.get(f) for c in checks]) for f in PYHESSIAN_FIELDS}
                if checks
                else None,
                "previous_task_train_error": stats([c["previous_task_train_error"] for c in here]),
            }
        )
    spearman = {
        m: stats([r.get("spearman", {}).get(m) for r in runs]) for m in methods if m != "exact"
    }
    return {"checkpoints": checkpoints, "spearman": spearman}


def _sig(value: float) -> str:
    return f"{value:.4g}"


def _rank(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def _pct(value: float) -> str:
    return f"{100 * value:+.0f}%" if abs(value) >= 0.1 else f"{100 * value:+.1f}%"


def _rho(value: float) -> str:
    return f"{value:.2f}"


def _secs(value: float) -> str:
    return f"{value:.2f}s" if value < 10 else f"{value:.1f}s" if value < 100 else f"{value:.0f}s"


def _bytes(value: float) -> str:
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}B"


def human_seconds(value: float) -> str:
    """``0.03 s``, ``3.2 s``, ``12 min``, ``1.9 h`` (a small model's prediction had read
    ``0.0 s``)."""
    if value < 0.1:
        return f"{value:.2g} s"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.0f} min" if value < 7200 else f"{value / 3600:.1f} h"


def human_bytes(value: float) -> str:
    """``1.5 GiB``, ``12.0 MiB``, ``512 B``."""
    text = _bytes(value)
    return f"{text[:-1]} {text[-1]}iB" if text[-1] in "GMK" else f"{text[:-1]} B"


FORMATS = {
    "srank": _rank,
    "numerical_rank": _rank,
    "srank_rel_error": _pct,
    "numerical_rank_rel_error": _pct,
    "top_rel_diff": _pct,
    "trace_rel_diff": _pct,
    "previous_task_train_error": _pct,
    "seconds": _secs,
    "peak_memory": _bytes,
    "spearman": _rho,
}


def cell(stat: dict[str, Any] | None, field: str) -> str:
    """``mean`` or ``mean±std`` (several seeds, sample standard deviation; time and memory:
    mean), formatted for ``field``; ``—`` if missing."""
    if stat is None:
        return "—"
    fmt = FORMATS.get(field, _sig)
    mean, std = stat["mean"], stat["std"]
    if stat["n"] == 1:
        return fmt(mean)
    if fmt is _rank:
        return f"{mean:.0f}±{std:.0f}"
    if fmt is _pct:
        digits = 0 if abs(mean) >= 0.1 else 1
        return f"{100 * mean:+.{digits}f}±{100 * std:.{digits}f}%"
    if fmt is _sig:
        return f"{mean:.3g}±{std:.1g}"
    if fmt is _rho:
        return f"{_rho(mean)}±{_rho(std)}"
    return fmt(mean)


def rank_cell(stat: dict[str, Any], field: str) -> str:
    """A rank with its relative error against exact in brackets."""
    text = cell(stat[field], field)
    error = stat[f"{field}_rel_error"]
    return text if error is None else f"{text} ({cell(error, f'{field}_rel_error')})"


def _seeded_records(report: dict[str, Any], index: int, method: str
                    ) -> list[tuple[int, dict[str, Any]]]:
    """``(seed, record)`` of ``method`` at checkpoint ``index`` for every run that has one."""
    return [
        (r["seed"], r["checkpoints"][index]["methods"][method])
        for r in report["runs"]
        if len(r["checkpoints"]) > index and method in r["checkpoints"][index]["methods"]
    ]


def _caveats(seeded: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """The records' caveats, once each; one that not every seed's record has names its seeds
    (an interval is one seed's)."""
    seeds: dict[str, list[int]] = {}
    for seed, record in seeded:
        for caveat in dict.fromkeys(record.get("caveats", [])):  # a seed once per caveat
            seeds.setdefault(caveat, []).append(seed)
    return [caveat if len(seeded) == 1 or len(found) == len(seeded)
            else f"(seed{'s' if len(found) > 1 else ''} {', '.join(map(str, found))}) {caveat}"
            for caveat, found in seeds.items()]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def title(report: dict[str, Any]) -> str:
    """One line naming the model (its parameters' dtype, the ``--weights`` loaded into it), data,
    threshold and seeds."""
    cfg, model, data = report["config"], report["model"], report["data"]
    seeds = cfg["seeds"]
    points = summary(report)["checkpoints"]
    measured = points[last_complete(report)]["seeds"] if points else len(seeds)
    seed_text = (f"seed {seeds[0]}" if len(seeds) == 1 else
                 f"{measured} of {len(seeds)} seeds" if measured < len(seeds) else
                 f"{len(seeds)} seeds")
    counts = [point["seeds"] for point in points]
    if len(seeds) > 1 and len(set(counts)) > 1:  # (a seed stopped after its first checkpoint:
        # that column averaged 2 seeds under a title of "1 of 2"; probe 160)
        seed_text += f" at the last checkpoint ({', '.join(map(str, counts))} per checkpoint)"

    if len(seeds) > 1:
        seed_text += " (mean±std, the sample standard deviation)"
    if model is None or data is None:
        return f"hessrank compare: {cfg['model']}, nothing measured"
    # --activation shapes the presets only: a user's model has its own.
    activation = f", {cfg['activation']}" if model["name"] in PRESETS else ""
    # (a saved table had not said --dtype float64 or --weights, which both change its numbers)
    weights = f" from {cfg['weights']}" if cfg["weights"] else ""
    return (
        f"hessrank compare: {model['name']} ({model['num_params']:,} {cfg['dtype']} parameters"
        f"{weights}{activation}) on {data['name']} (n = {data['num_samples']}, "
        f"C = {data['num_classes']}), srank threshold {cfg['threshold']}, {seed_text}"
    )


def _table(title: str) -> Table:
    return Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False
    )


def methods_table(
    report: dict[str, Any], summ: dict[str, Any], index: int
) -> tuple[Table, list[str]]:
    """Per estimator at checkpoint ``index``: ranks with their errors against exact, spectrum,
    cost; and the numbered caveats its last column refers to."""
    point = summ["checkpoints"][index]
    where = ""
    if point["task"] is not None:
        where = f" at the start of task {point['task']} (random labels)"
    against = " vs exact" if "exact" in report["config"]["methods"] else ""
    table = _table(f"Estimators{against}{where}")
    table.padding = (0, 0)
    headers = (
        "method",
        "srank\n(err)",
        "num. rank\n(err)",
        "top\neig",
        "trace",
        "time",
        "peak\nmemory",
        "backend",
        "notes",
    )
    for header in headers:
        left = header in ("method", "backend", "notes")
        table.add_column(header, justify="left" if left else "right", no_wrap=header != "notes")
    footnotes: list[str] = []
    for method in report["config"]["methods"]:
        seeded = _seeded_records(report, index, method)
        if not seeded:
            continue
        records = [record for _, record in seeded]
        stat = point["methods"][method]
        errors = _unique([r["error"] for r in records if r.get("error")])
        backend = ", ".join(_unique([r["backend"] for r in records if r.get("backend")]))
        notes = _caveats(seeded)
        notes += [f"failed: {e}" for e in errors]
        refs = []
        for note in notes:
            footnotes.append(f"[{len(footnotes) + 1}] {method}: {note}")
            refs.append(str(len(footnotes)))
        table.add_row(
            method,
            rank_cell(stat, "srank"),
            rank_cell(stat, "numerical_rank"),
            cell(stat["top_eigenvalue"], "top_eigenvalue"),
            cell(stat["trace"], "trace"),
            cell(stat["seconds"], "seconds"),
            cell(stat["peak_memory"], "peak_memory"),
            backend or "—",
            ",".join(refs),
        )
    return table, footnotes


def pyhessian_table(
    summ: dict[str, Any], report: dict[str, Any], index: int
) -> tuple[Table, list[str]] | None:
    """PyHessian's top eigenvalue and trace next to hessrank's exact values, and caveats."""
    checks = [
        r["checkpoints"][index]["pyhessian"]
        for r in report["runs"]
        if len(r["checkpoints"]) > index and r["checkpoints"][index].get("pyhessian")
    ]
    if not checks:
        return None
    stat = summ["checkpoints"][index]["pyhessian"]
    table = _table("Independent check: PyHessian (defaults) vs hessrank exact")
    for header in ("quantity", "hessrank exact", "pyhessian", "diff", "how"):
        left = header in ("quantity", "how")
        table.add_column(header, justify="left" if left else "right")
    probes = stat["trace_samples"]
    how = f"Hutchinson, {probes['mean']:.0f} probes" if probes else "Hutchinson"
    if stat["trace_stderr"] is not None:
        how += f", s.e. {stat['trace_stderr']['mean']:.2g}"
    if probes and probes["n"] > 1:  # (2 and 36 probes had read as 19; probe 115)
        how += f" (means over {probes['n']} seeds)"
    checked, seeds = seeds_averaged(stat), summ["checkpoints"][index]["seeds"]
    if checked < seeds:  # (stopped in a seed's check, it had read as a mean of all; probe 204)
        table.caption = (f"{checked} of {seeds} seeds: the run stopped before PyHessian "
                         "checked the others")
    table.add_row(
        "top eigenvalue",
        cell(stat["exact_top_eigenvalue"], "top_eigenvalue"),
        cell(stat["top_eigenvalue"], "top_eigenvalue"),
        cell(stat["top_rel_diff"], "top_rel_diff"),
        "power iteration",
    )
    table.add_row(
        "trace",
        cell(stat["exact_trace"], "trace"),
        cell(stat["trace"], "trace"),
        cell(stat["trace_rel_diff"], "trace_rel_diff"),
        how,
    )
    table.add_row("time", "", cell(stat["seconds"], "seconds"), "", "")
    notes = [f"pyhessian failed: {e}" for e in _unique([c["error"] for c in checks if c["error"]])]
    stopped = [c for c in checks if c.get("trace_stopped_by_sign")]
    if stopped:
        notes.append(
            f"pyhessian's trace stopped early in {len(stopped)} of {len(checks)} run(s): its "
            "stopping test divides by the signed running mean, so a negative mean ends it"
        )
    return table, notes


def trajectory_table(report: dict[str, Any], summ: dict[str, Any], saved: tuple[str, ...] = ()
                     ) -> Table | None:
    """srank and its error vs exact per checkpoint, and Spearman correlation with exact;
    ``saved`` as :func:`render` takes it."""
    points = summ["checkpoints"]
    if report["config"]["checkpoints"] < 1 or not points:
        return None
    shown = np.unique(np.linspace(0, len(points) - 1, MAX_TASK_COLUMNS).round().astype(int))
    points = [points[i] for i in shown]
    table = _table("srank at each task start (err vs exact); Spearman rho with exact over tasks")
    table.add_column("method")
    for point in points:
        table.add_column(f"task {point['task']}", justify="right")
    table.add_column("Spearman", justify="right")
    for method in report["config"]["methods"]:
        cells = []
        for point in points:
            stat = point["methods"].get(method)
            cells.append("—" if stat is None or stat["srank"] is None else rank_cell(stat, "srank"))
        rho = "" if method == "exact" else cell(summ["spearman"].get(method), "spearman")
        table.add_row(method, *cells, rho)
    errors = [cell(p["previous_task_train_error"], "previous_task_train_error") for p in points]
    if len(points) < len(summ["checkpoints"]):
        table.caption = (
            f"{len(points)} of {len(summ['checkpoints'])} tasks shown; "
            + (f"all in {' and '.join(saved)}" if saved else "--json or --csv keeps them all")
        )
    table.add_row("train err (prev)", *[e.lstrip("+") for e in errors], "")
    return table


def last_complete(report: dict[str, Any]) -> int:
    """Index of the last checkpoint the first seed measured with every method (Ctrl-C may cut
    the latest short); the last one if none is complete."""
    points = report["runs"][0]["checkpoints"] if report["runs"] else []
    methods = set(report["config"]["methods"])
    done = [p["index"] for p in points if methods <= set(p["methods"])]
    return done[-1] if done else max(len(points) - 1, 0)


def anything_measured(report: dict[str, Any]) -> bool:
    """Whether a method or PyHessian measured a checkpoint (a run stopped before its first
    measurement has nothing to show or write)."""
    return any(point["methods"] or point["pyhessian"] is not None
               for run in report["runs"] for point in run["checkpoints"])


def render(report: dict[str, Any], console: Console, saved: tuple[str, ...] = ()) -> None:
    """Print the tables of ``report`` (the last checkpoint in detail); ``saved`` names the
    options whose files hold every number (``--json``, ``--csv``), written."""
    summ = summary(report)
    console.print(title(report))
    measured = anything_measured(report)
    if report["interrupted"]:
        reason = report.get("stopped_by") or "Ctrl-C"
        # (stopped inside the first method, an empty table had followed; probe 146)
        console.print(f"Stopped by {reason}: showing what was measured before it."
                      if measured else f"Stopped by {reason} before the first measurement "
                      "ended: nothing to show.",
                      style="yellow", markup=False, highlight=False)
    if not summ["checkpoints"] or not measured:
        return
    last = last_complete(report)
    table, footnotes = methods_table(report, summ, last)
    console.print(table)
    for note in footnotes:
        console.print(note, markup=False, highlight=False)
    if (report["data"] or {}).get("device") == "cpu" and len(report["config"]["methods"]) > 1:
        console.print(CPU_MEMORY_NOTE, markup=False, highlight=False)
    check = pyhessian_table(summ, report, last)
    if "exact" not in report["config"]["methods"]:
        # PyHessian's table checks exact's numbers: without them it had been shown with every
        # exact and diff cell empty. Its numbers are said to be in the files written alone
        # (with none, it had named --json and --csv all the same; probe 204).
        where = (f"its numbers are in {' and '.join(saved)}" if saved else
                 "--json or --csv keeps its numbers; --no-pyhessian skips it")
        console.print("No exact reference (skipped): errors against exact are not computed"
                      + (f", and PyHessian's check of exact is not shown ({where})."
                         if check is not None else "."),
                      markup=False, highlight=False)
    elif check is not None:
        console.print()
        console.print(check[0])
        for note in check[1]:
            console.print(note, markup=False, highlight=False)
    trajectory = trajectory_table(report, summ, saved)
    if trajectory is not None:
        console.print()
        console.print(trajectory)


def _atomic_write(path: Path, text: str) -> None:
    """``text`` into the file ``path`` names: a regular file (or a new one) replaced whole,
    through any symbolic link (the link stays, its target is written); anything else (a pipe,
    ``/dev/stdout``, a process substitution's ``/dev/fd/N``) written through, as it is not a
    file to replace (those had been replaced by a regular file)."""
    if not_a_regular_file(path):
        with path.open("w") as handle:
            handle.write(text)
        return
    path = with_folder(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def not_a_regular_file(path: Path) -> bool:
    """Whether ``path`` exists (after links) as something other than a file or folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: Path) -> None:
    """The compare report plus its summary, atomically (safe to read while a run goes on)."""
    dump_json(dict(report, summary=summary(report)), path)


def dump_json(payload: dict[str, Any], path: Path) -> None:
    """``payload`` as JSON (non-finite floats as null), written atomically."""
    try:
        _atomic_write(path, json.dumps(_clean(payload), indent=1) + "\n")
    except OSError as err:
        raise cannot_write("--json", path, err) from err


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per seed, checkpoint and method (pyhessian included); mean/std rows for seeds,
    each with the number of seeds it averages (``n``)."""
    rows: list[dict[str, Any]] = []
    for run in report["runs"]:
        for point in run["checkpoints"]:
            base = {
                "seed": run["seed"],
                "checkpoint": point["index"],
                "task": point["task"],
                "previous_task_train_error": point["previous_task_train_error"],
            }
            for method, rec in point["methods"].items():
                lo, hi = rec.get("rank_interval") or (None, None)
                row = dict(base, method=method, backend=rec.get("backend"))
                row.update({f: rec.get(f) for f in METHOD_FIELDS})
                row.update(
                    max_rank=rec.get("max_rank"),
                    rank_lo=lo,
                    rank_hi=hi,
                    spearman_vs_exact=run.get("spearman", {}).get(method),
                    caveats="; ".join(rec.get("caveats", [])),
                    error=rec.get("error"),
                )
                rows.append(row)
            check = point.get("pyhessian")
            if check:
                row = dict(base, method="pyhessian", error=check["error"])
                row.update({f: check.get(f) for f in PYHESSIAN_FIELDS})
                row["trace_stopped_by_sign"] = check.get("trace_stopped_by_sign")
                rows.append(row)
    if len(report["runs"]) > 1:
        summ = summary(report)
        for point in summ["checkpoints"]:
            for which in ("mean", "std"):
                base = {"seed": which, "checkpoint": point["index"], "task": point["task"],
                        # (as the table shows it; the rows had left it empty: probe 211)
                        "previous_task_train_error": (point["previous_task_train_error"]
                                                      or {}).get(which)}
                # n: the seeds averaged, as the JSON's summary says (a run stopped in its last
                # seed's PyHessian check had a mean row of one seed beside others of two; probe
                # 204)
                for method, stat in point["methods"].items():
                    row = dict(base, method=method, n=seeds_averaged(stat))
                    row.update({f: s[which] if s else None for f, s in stat.items()})
                    row["spearman_vs_exact"] = (summ["spearman"].get(method) or {}).get(which)
                    rows.append(row)
                if point["pyhessian"]:
                    row = dict(base, method="pyhessian", n=seeds_averaged(point["pyhessian"]))
                    row.update({f: s[which] if s else None for f, s in point["pyhessian"].items()})
                    rows.append(row)
    return rows


def seeds_averaged(stats: dict[str, dict[str, Any] | None]) -> int:
    """How many seeds a row of :func:`summary`'s ``stats`` (field -> mean/std/n) averages: the
    most of any field (a field a seed left empty, such as an error against a failed exact,
    averages fewer)."""
    return max((stat["n"] for stat in stats.values() if stat), default=0)


def with_folder(path: Path) -> Path:
    """``path`` through any symbolic link (what is written), its folder made: as
    :func:`check_outputs` tried it (a CSV or figure through a dangling link's folder had been
    refused after the work; probe 148). Something other than a file or folder (a pipe, a
    process substitution's ``/dev/fd/N``, whose target is no path) is ``path`` itself."""
    if not_a_regular_file(path):
        return path
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def write_csv(report: dict[str, Any], path: Path) -> None:
    """Every number of the tables, one row per seed/checkpoint/method."""
    rows = csv_rows(report)
    try:
        with with_folder(path).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
    except OSError as err:
        raise cannot_write("--csv", path, err) from err


def cannot_write(option: str, path: Path, err: OSError) -> CliError:
    """The error for ``option``'s file ``path``, which ``err`` kept from being written: a file
    standing where a folder of the path must be is named (the system says 'File exists' or
    'Not a directory'); otherwise the system's reason, and to choose another path."""
    blocking = next((folder for folder in path.parents if folder.is_file()), None)
    reason = (f"{blocking} is a file, not a folder: choose a path in a folder"
              if blocking is not None else f"{err.strerror or err}: choose another path")
    return CliError(f"cannot write {option} {path}: {reason}")


#: The output options whose file is a figure (its extension must be one matplotlib writes).
PLOT_OPTIONS = ("--plot", "-o")


def check_outputs(outputs: dict[str, Path | None], quiet: bool = False,
                  reads: dict[str, Path | None] | None = None) -> list[str]:
    """Before any work: the output files (option -> path; None or ``-``: none) are distinct, none
    is a file the command reads (``reads``, option -> path), each can be written (tried, the
    folders it needs made and the file opened, and what that made removed: a refused command
    leaves none; a folder stays only where a file is written), and a figure's
    extension is one matplotlib writes.

    Returns:
        The line that names each file that holds something already, as it will be replaced
        (none where ``quiet``), for the command to print on stderr once its work goes ahead:
        said here, it had been followed by refusals of the work (a budget, the model, an
        estimator option) that left the file as it was (probes 204, 243).

    Raises:
        CliError: naming the option, the problem and the fix.
    """
    replaced: list[str] = []
    read = {path.resolve(): option for option, path in (reads or {}).items() if path is not None}
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None or str(path) == "-":
            continue
        resolved = path.resolve()
        if resolved in read:  # (--json w.pt replaced the --weights file w.pt; probe 85)
            raise CliError(f"{option} {path} is the {read[resolved]} file the command reads: "
                           f"writing it would replace it; give {option} another name")
        if resolved in seen:
            raise CliError(f"{seen[resolved]} and {option} name the same file {path}: the second "
                           "would replace the first; give each its own")
        # (--json out/a.json --csv out: each had been tried alone, and the second refused after
        # the work; probe 148)
        for other, other_option in seen.items():
            if other in resolved.parents or resolved in other.parents:
                inner, outer = ((option, other_option) if other in resolved.parents
                                else (other_option, option))
                raise CliError(f"{outer} {outputs[outer]} is a folder of {inner} "
                               f"{outputs[inner]}: one path cannot be a file and the other's "
                               "folder; give each its own file")
        seen[resolved] = option
        # before a figure's ending (-o /tmp had been told that its name lacks one; probe 243)
        if path.is_dir():
            raise CliError(f"cannot write {option} {path}: it is a folder: name a file in it")
        if option in PLOT_OPTIONS:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            plt = pyplot(option)
            formats = dict(FigureCanvasAgg.get_supported_filetypes())
            texsystem = plt.rcParams["pgf.texsystem"]
            if shutil.which(texsystem) is None:  # .pgf is written by running LaTeX
                del formats["pgf"]
                if path.suffix.lower() == ".pgf":
                    raise CliError(f"{option} {path}: matplotlib writes .pgf through LaTeX "
                                   f"({texsystem}), which is not installed; end the name in "
                                   ".png, .pdf or .svg")
            if path.suffix.lstrip(".").lower() not in formats:
                what = (f"no '{path.suffix}' figure" if path.suffix
                        else "figures by their name's ending, which this one lacks")
                others = sorted(set(formats) - {"png", "pdf", "svg"})  # (listed twice before)
                raise CliError(f"{option} {path}: matplotlib writes {what}; end the name in "
                               f".png, .pdf or .svg (or {', '.join('.' + f for f in others)})")
        if not_a_regular_file(path):  # a pipe: opened once, to write (a test open ends it)
            if not os.access(path, os.W_OK):
                raise cannot_write(option, path, PermissionError(13, "Permission denied"))
            continue
        # a symbolic link is checked at its target, which is what is written (a dangling
        # link's target was made, and the link removed as the empty file it seemed; probe 69)
        target = Path(os.path.realpath(path))
        existed = target.exists()
        # Tried as writing will do it, the folders it needs made and the file opened, and what
        # this made removed: a permission os.access grants can still be refused (root's, in
        # /sys: --json /sys/x/r.json was refused after the work, at its first write).
        made: list[Path] = []
        try:
            for folder in reversed(target.parents):
                if not folder.exists():
                    folder.mkdir()
                    made.append(folder)
            with target.open("a"):  # (an existing file is left as it is)
                pass
        except OSError as err:
            raise cannot_write(option, path, err) from err
        finally:
            if not existed and target.is_file() and target.stat().st_size == 0:
                target.unlink()
            for folder in reversed(made):
                with contextlib.suppress(OSError):  # (another process's file in it meanwhile)
                    folder.rmdir()
        if existed and not quiet and target.stat().st_size > 0:
            replaced.append(f"hessrank: {option} {path} exists; it will be replaced")
    return replaced


def pyplot(what: str) -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Raises:
        CliError: matplotlib is not installed (``what`` names the option that needs it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise CliError(f"{what} needs matplotlib: pip install 'hessrank[plot]'") from err
    return plt


def count_axis(axes: Any, values: list[float] | np.ndarray) -> None:
    """Whole-number ticks on ``axes``' x axis (steps, tasks), one unit either side of a single
    value (its autoscaled range had been 0.945 to 1.055, and -0.04 to 0.04 for step 0; probe
    91)."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(values) and min(values) == max(values):
        axes.set_xlim(min(values) - 1, max(values) + 1)


def save_figure(fig: Any, path: Path, what: str) -> None:
    """Write ``fig`` as a PNG at ``path`` (its folder created) and close it.

    Raises:
        CliError: the file cannot be written.
    """
    plt = pyplot(what)
    try:
        fig.savefig(with_folder(path), dpi=120)
    except OSError as err:
        raise cannot_write(what, path, err) from err
    finally:
        plt.close(fig)


def write_plot(report: dict[str, Any], path: Path) -> bool:
    """Spectra of every method overlaid (|eigenvalue| vs index, log y) at the last checkpoint of
    the first seed, and srank over checkpoints (mean over the seeds that measured each, min-max
    band).

    Returns:
        Whether it was written (not where no checkpoint was measured).
    """
    plt = pyplot("--plot")

    methods = report["config"]["methods"]
    runs = [r for r in report["runs"] if r["checkpoints"]]
    if not runs:
        return False
    trajectory = report["config"]["checkpoints"] > 1
    fig, axes = plt.subplots(1, 2 if trajectory else 1, figsize=(12 if trajectory else 6.5, 4.5))
    axes = np.atleast_1d(axes)
    last = runs[0]["checkpoints"][last_complete(report)]
    top, bottom = 0.0, np.inf
    for method in methods:
        rec = last["methods"].get(method)
        if not rec or not rec.get("eigenvalues"):
            continue
        values = np.abs(np.asarray(rec["eigenvalues"]))
        values = values[values > 0]
        if values.size:
            top, bottom = max(top, values.max()), min(bottom, values.min())
        label = f"{method} (srank {rec['srank']:.0f})"
        axes[0].semilogy(np.arange(1, len(values) + 1), values, label=label)
    if top > 0:  # eigenvalues below 1e-16 of the top are round-off: cut them
        axes[0].set_ylim(max(bottom, top * 1e-16) / 2, top * 2)
    axes[0].set_xlabel("index")
    axes[0].set_ylabel("|eigenvalue|")
    where = f", start of task {last['task']}" if last["task"] is not None else ""
    axes[0].set_title(f"spectra, seed {runs[0]['seed']}{where}")
    axes[0].legend()
    if trajectory:
        for method in methods:
            series = [
                [c["methods"].get(method, {}).get("srank") for c in r["checkpoints"]] for r in runs
            ]
            # to the longest seed (the shortest cut an interrupted run's others; probe 103)
            length = max(len(s) for s in series)
            values = np.array([[np.nan if v is None else v for v in s]
                               + [np.nan] * (length - len(s)) for s in series])
            if np.isnan(values).all():
                continue
            x = np.arange(1, length + 1)
            with warnings.catch_warnings():  # a checkpoint no seed measured: a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=0)
            axes[1].plot(x, mean, marker="o", label=method)
            if len(runs) > 1:
                axes[1].fill_between(x, np.nanmin(values, 0), np.nanmax(values, 0), alpha=0.2)
        count_axis(axes[1], np.arange(1, max(len(r["checkpoints"]) for r in runs) + 1))
        axes[1].set_xlabel("task (checkpoint at its start)")
        axes[1].set_ylabel(f"srank at {report['config']['threshold']}")
        axes[1].set_title("rank over checkpoints" + (  # two lines: one was cut (probe 115)
            "\nmean over the seeds that measured it, band min to max" if len(runs) > 1
            else ""))
        axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path, "--plot")
    return True
