"""``hessrank plot``: rank and top eigenvalue against step, from the tracker's JSON lines."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hessrank.cli.errors import CliError
from hessrank.cli.report import count_axis, pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RANK_KEYS = ("rank", "srank", "numerical", "entropy", "stable", "participation")
#: The record's 95 % interval of a rank key, where Lanczos gives one (shaded around its line).
INTERVALS = {"rank": "rank_interval", "srank": "rank_interval",
             "numerical": "numerical_interval"}
LAYER_COLUMNS = 3
MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", ":", "-.")


@dataclass
class Run:
    """The records of one JSON-lines file: measurements, and failures kept apart.

    Attributes:
        cut_line: the number of a last line that a crash cut mid-write (left out), or None.
    """

    name: str
    records: list[dict[str, Any]]
    failures: list[dict[str, Any]] = field(default_factory=list)
    cut_line: int | None = None

    def methods(self) -> list[str]:
        """Methods in order of first appearance, those that only failed last."""
        return list(dict.fromkeys(r["method"] for r in (*self.records, *self.failures)))

    def series(self, method: str, key: str, layer: str | None = None) -> tuple[list, list]:
        """Steps and values of ``key`` (a layer's, if given) for ``method``, in step order (see
        :meth:`points`)."""
        def value(record: dict[str, Any]) -> float | None:
            found = _source(record, layer).get(key)
            return None if found is None else float(found)
        return self.points(method, value, math.nan, _tolerance(key, layer))

    def points(self, method: str, read: Callable[[dict[str, Any]], Any], gap: Any,
               tolerance: Callable[[dict[str, Any]], Any] | None = None) -> tuple[list, list]:
        """Steps and ``read(record)`` of ``method``'s records, in step order; records it reads
        None from are left out, and ``gap`` (a NaN, where matplotlib breaks a line or a band)
        goes midway between two records of another number of parameters (a layer frozen) or
        with a failure of the method between them: joined, their jump had read as the
        curvature's (probe 137); and, given the ``tolerance`` the values are counted at (the
        numerical rank's ``rtol``), between two records on one number of samples counted at
        another (a model cast to float64 mid-run: the default rtol, the matrix's size times
        the dtype's epsilon, fell from 5.4e-5 to 1e-13 and the rank jumped from 343 to 385;
        probe 243). Another number of samples moves the default rtol too: those records are
        drawn hollow (:meth:`other_samples`)."""
        def regime(record: dict[str, Any]) -> tuple[Any, Any, Any]:
            return (record.get("num_params"), record.get("num_samples"),
                    None if tolerance is None else tolerance(record))

        points = [(record["step"], read(record), regime(record))
                  for record in self.records if record["method"] == method]
        points = sorted((p for p in points if p[1] is not None), key=lambda p: p[0])
        failed = [r["step"] for r in self.failures if r["method"] == method]
        steps: list[float] = []
        values: list[Any] = []
        for index, (step, value, (size, samples, counted_at)) in enumerate(points):
            if index:
                before, _, (was, had, counted_before) = points[index - 1]
                if (size != was or (samples == had and counted_at != counted_before)
                        or any(before < f < step for f in failed)):
                    steps.append((before + step) / 2)
                    values.append(gap)
            steps.append(step)
            values.append(value)
        return steps, values

    def other_samples(self, method: str, key: str,
                      layer: str | None = None) -> tuple[list, list, int]:
        """The steps and values of ``method``'s records whose ``num_samples`` is not its most
        common one, and that one: their ranks move with the batch (a boundary measurement on
        twice the samples had read as a spike of the curvature; probe 137)."""
        counts: dict[int, int] = {}
        for record in self.records:
            if record["method"] == method and record.get("num_samples") is not None:
                counts[record["num_samples"]] = counts.get(record["num_samples"], 0) + 1
        common = max(counts, key=lambda n: counts[n]) if counts else 0
        steps, values = [], []
        for record in self.records:
            found = _source(record, layer).get(key)
            if (record["method"] == method and found is not None
                    and record.get("num_samples", common) != common):
                steps.append(record["step"])
                values.append(float(found))
        return steps, values, common


def _source(record: dict[str, Any], layer: str | None) -> dict[str, Any]:
    """The record's numbers, or those of its ``layer`` (empty where it has none)."""
    return record if layer is None else record.get("layers", {}).get(layer, {})


def _tolerance(key: str, layer: str | None) -> Callable[[dict[str, Any]], Any] | None:
    """The reader of the tolerance that rank ``key`` (a layer's, if given) is counted at, the
    numerical rank's ``rtol``; None for a rank that reads none."""
    if key != "numerical":
        return None
    return lambda record: _source(record, layer).get("rtol")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _record_problem(record: dict[str, Any]) -> str | None:
    """What makes ``record`` (a JSON object with ``step`` and ``method``) no tracker record, or
    None: the fields the plot reads must hold what the tracker writes."""
    step, method = record["step"], record["method"]
    if not isinstance(step, int) or isinstance(step, bool) or step < -1:
        return f"its step {step!r} is not an integer >= -1 (-1: the model before any update)"
    if not isinstance(method, str):
        return f"its method {method!r} is not a name"
    sources = [("", record)] + [(f"layer {name!r}: ", values)
                                for name, values in (record.get("layers") or {}).items()]
    for where, source in sources:
        if not isinstance(source, dict):
            return f"{where}not an object of numbers"
        for key in (*RANK_KEYS, "top_eigenvalue", "threshold"):
            if source.get(key) is not None and not _is_number(source[key]):
                return f"{where}its {key} {source[key]!r} is not a number"
    for name in dict.fromkeys(INTERVALS.values()):
        interval = record.get(name)
        if interval is not None and not (isinstance(interval, list) and len(interval) == 2
                                         and all(_is_number(v) for v in interval)):
            return f"its {name} {interval!r} is not [low, high]"
    return None


def _refuse_a_report(path: Path, text: str) -> None:
    """Raise where ``path`` is a ``compare`` or ``rank`` report (one JSON document, not a log of
    lines), read where its first line is not a record: it had been refused as "not JSON"
    (probe 146).

    Raises:
        CliError: naming the report and what draws it.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(document, dict) and document.get("command") in ("compare", "rank"):
        raise CliError(f"{path} is a hessrank {document['command']} report (--json), not a "
                       "tracker log: hessrank plot draws the logs a Tracker writes (a "
                       "comparison's figure comes from hessrank compare --plot FILE.png)")


def read_run(path: Path, name: str | None = None) -> Run:
    """The records of ``path`` (the run called ``name``, default the file's stem); a line that
    is not a record is an error naming the line, except a last line without its newline that
    is not JSON: a crash cut it mid-write (the tracker writes each line whole), and it is left
    out (``Run.cut_line``)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror or err}") from err
    lines = text.splitlines()
    run = Run(path.stem if name is None else name, [])
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == 1:
                _refuse_a_report(path, text)
            if number == len(lines) and not text.endswith("\n"):
                run.cut_line = number
                continue
            raise CliError(f"{path}:{number} is not JSON ({err.msg}): not a tracker log") from err
        if not isinstance(record, dict) or "step" not in record or "method" not in record:
            raise CliError(f"{path}:{number} has no step and method: not a tracker log")
        problem = _record_problem(record)
        if problem is not None:
            raise CliError(f"{path}:{number}: {problem}: not a tracker record")
        (run.failures if "error" in record else run.records).append(record)
    if not run.records:
        raise CliError(f"{path} holds no measurement" + (
            f" ({len(run.failures)} failed ones)" if run.failures else ""))
    return run


def run_names(paths: list[Path]) -> list[str]:
    """A name per log, for the legend: the file's stem, with as many of its folders as it takes
    to tell logs of the same name apart (``relu/curvature``, ``tanh/curvature``); with their
    suffixes where only those differ (``run.jsonl``, ``run.log``: both had been ``run``;
    probe 211)."""
    for named in (lambda path: path.with_suffix(""), lambda path: path):  # then with suffixes
        names = [named(path).name for path in paths]
        for depth in range(1, max(len(path.parts) for path in paths)):
            if len(set(names)) == len(names):
                return names
            names = [str(Path(*named(path).parts[-depth - 1:])) for path in paths]
        if len(set(names)) == len(names):
            return names
    return names  # (the same file twice)


NO_LAYERS = ("--layers: the log has no per-layer ranks; record them with "
             "Tracker(..., per_layer=True)")


def layer_names(runs: list[Run]) -> list[str]:
    """Layers recorded in any run, in order of first appearance."""
    names: dict[str, None] = {}
    for run in runs:
        for record in run.records:
            names.update(dict.fromkeys(record.get("layers", {})))
    return list(names)


def _styles(runs: list[Run]) -> dict[tuple[str, str], dict[str, Any]]:
    """The same colour and marker for a method in every panel (a line style per file), and
    lines that thin out in drawing order, so that coinciding series stay visible."""
    methods = list(dict.fromkeys(m for run in runs for m in run.methods()))
    styles = {}
    for run_index, run in enumerate(runs):
        for method in run.methods():
            index = methods.index(method)
            styles[run.name, method] = {
                "color": f"C{index % 10}",
                "marker": MARKERS[index % len(MARKERS)],
                "markersize": 4.5 - 2.5 * index / max(len(methods) - 1, 1),
                "linewidth": 3.0 - 2.0 * index / max(len(methods) - 1, 1),
                "linestyle": LINESTYLES[run_index % len(LINESTYLES)],
            }
    return styles


def _draw(axes: Axes, runs: list[Run], key: str, layer: str | None = None) -> None:
    """One line per (run, method) of ``key`` against step."""
    styles = _styles(runs)
    drawn: list[float] = []
    for run in runs:
        for method in run.methods():
            steps, values = run.series(method, key, layer)
            failed = sorted({r["step"] for r in run.failures if r["method"] == method})
            drawn.extend([*steps, *failed])
            label = method if len(runs) == 1 else f"{run.name}: {method}"
            if key in ("rank", "srank") and len(_thresholds(runs)) > 1:
                label += f" at {', '.join(map(str, _thresholds([run], method)))}"
            style = styles[run.name, method]
            if steps:
                axes.plot(steps, values, label=label, **style)
            for index, step in enumerate(failed):  # (a method that only failed, too)
                axes.axvline(step, color=style["color"], linestyle=":", linewidth=1.0,
                             alpha=0.7, label=f"{label} failed" if index == 0 else None)
            other, other_values, common = run.other_samples(method, key, layer)
            if other:
                axes.plot(other, other_values, linestyle="none", marker=style["marker"],
                          markersize=style["markersize"] + 3, markerfacecolor="white",
                          markeredgecolor=style["color"],
                          label=f"{label} on other than {common} samples")
            if key in INTERVALS:
                # a layer's too: its line alone read 519 for an exact 268 (probe 67); the
                # numerical rank's: its line read 1209 -> 167, its interval about [69, 1210]
                # (probe 85); broken where the line is
                def interval(record: dict[str, Any]) -> Any:
                    return _source(record, layer).get(INTERVALS[key])
                band_steps, bands = run.points(method, interval, [math.nan, math.nan],
                                               _tolerance(key, layer))
                if band_steps:
                    axes.fill_between(band_steps, [b[0] for b in bands], [b[1] for b in bands],
                                      color=style["color"], alpha=0.15, label=f"{label} interval")
    count_axis(axes, drawn)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)


def _thresholds(runs: list[Run], method: str | None = None) -> list[float]:
    """The srank thresholds recorded (of ``method``'s records only, if given), in order."""
    return list(dict.fromkeys(
        r["threshold"] for run in runs for r in run.records
        if r.get("threshold") is not None and method in (None, r["method"])))


def build_figure(runs: list[Run], key: str = "rank", layers: bool = False) -> Figure:
    """Rank ``key`` and top eigenvalue against step (one line per method), then, with
    ``layers``, one panel per layer with its rank.

    Raises:
        CliError: ``layers`` is asked for and no record has per-layer ranks.
    """
    plt = pyplot("hessrank plot")
    names = layer_names(runs) if layers else []
    if layers and not names:
        raise CliError(NO_LAYERS)
    layer_rows = math.ceil(len(names) / LAYER_COLUMNS)
    columns = max(2, min(LAYER_COLUMNS, len(names)))
    fig = plt.figure(figsize=(4.2 * columns, 3.4 * (1 + layer_rows)))
    grid = fig.add_gridspec(1 + layer_rows, 2 * columns)
    half = columns  # the two top panels share the first row equally
    rank_axes = fig.add_subplot(grid[0, :half])
    _draw(rank_axes, runs, key)
    label = "srank" if key == "rank" else key if key.endswith("rank") else f"{key} rank"
    thresholds = _thresholds(runs)
    if label == "srank" and len(thresholds) == 1:
        label += f" at {thresholds[0]}"  # several: each line's label says its own
    rank_axes.set_ylabel(label)
    rank_axes.set_title(f"{label} of the curvature")
    rank_axes.legend(fontsize="small")
    top_axes = fig.add_subplot(grid[0, half:])
    _draw(top_axes, runs, "top_eigenvalue")
    tops = [r["top_eigenvalue"] for run in runs for r in run.records
            if r.get("top_eigenvalue") is not None]
    if tops and min(tops) > 0:
        top_axes.set_yscale("log")
    elif any(tops):  # a signed top (a Hessian's negative one): logarithmic on either side
        # (a linear axis had flattened every run under one large value; probe 137), linear
        # within a millionth of the largest (a top of -1e-8 had drawn 24 decades; probe 139)
        largest = max(abs(t) for t in tops)
        top_axes.set_yscale("symlog", linthresh=max(min(abs(t) for t in tops if t),
                                                     1e-6 * largest))
    top_axes.set_ylabel("top eigenvalue")
    top_axes.set_title("top eigenvalue")
    for index, name in enumerate(names):
        row, column = divmod(index, LAYER_COLUMNS)
        axes = fig.add_subplot(grid[1 + row, 2 * column : 2 * column + 2])
        _draw(axes, runs, key, layer=name)
        axes.set_title(f"layer {name}")
        axes.set_ylabel(label)
        if index == 0:
            axes.legend(fontsize="small")
    fig.tight_layout()
    return fig


def read_runs(paths: list[Path], key: str, layers: bool = False) -> list[Run]:
    """The logs' runs, checked to hold something to plot under ``key``, and per-layer ranks
    where ``layers`` asks for them (before a figure that exists is said to be replaced: a
    compare report given as a log had been, probe 160; a log without per-layer ranks, probe
    204).

    Raises:
        CliError: a log cannot be read or holds no record, nor a failure, to plot, or no
            per-layer rank that ``layers`` asks for.
    """
    runs = [read_run(path, name) for path, name in zip(paths, run_names(paths), strict=True)]
    if not any(_is_number(r.get(key)) for run in runs for r in run.records) and not any(
            run.failures for run in runs):  # (an empty figure and matplotlib's warning; probe 146)
        raise CliError(f"no record of {', '.join(map(str, paths))} holds a {key!r} value: "
                       "nothing to plot (a Tracker writes one per measurement; --rank names the "
                       "rank to draw)")
    if layers and not layer_names(runs):
        raise CliError(NO_LAYERS)
    return runs


def plot(runs: list[Run], paths: list[Path], output: Path, key: str, layers: bool
         ) -> list[str]:
    """Draw the ``runs`` read from ``paths`` (:func:`read_runs`) and write ``output``; returns
    what was left out of the plot, one line each: a last line cut by a crash, then the failed
    measurements (each marked by a dotted line at its step, where its method's line breaks)."""
    fig = build_figure(runs, key, layers)
    save_figure(fig, output, "--output")
    left_out = [f"{path}:{run.cut_line}, the last line, which a crash cut mid-write"
                for path, run in zip(paths, runs, strict=True) if run.cut_line is not None]
    failures = [f"{run.name}: {r['method']} at step {r['step']}: {r['error']}"
                for run in runs for r in run.failures]
    if failures:
        left_out.append(f"{len(failures)} failed measurement(s), the first: {failures[0]}")
    return left_out
