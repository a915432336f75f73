"""Progress bars: asked for, refused, and by default where the work is predicted long and
someone watches a terminal."""

from __future__ import annotations

import re
import sys
import threading

import pytest
import torch
from reference import classification_batch, mlp
from torch import nn

import hessrank
from hessrank import monitor

CE = nn.CrossEntropyLoss()


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The task descriptions of each progress bar of the library's own that was displayed
    (started)."""
    shown: list[list[str]] = []
    original = monitor.progress_bar

    def recording(**options: object) -> object:
        bar = original(**options, disable=True)
        tasks: list[str] = []
        add_task, start = bar.add_task, bar.start

        def add(description: str, **kwargs: object) -> object:
            tasks.append(description)
            return add_task(description, **kwargs)

        def started() -> None:
            shown.append(tasks)
            start()

        bar.add_task = add  # type: ignore[method-assign]
        bar.start = started  # type: ignore[method-assign]
        return bar

    monkeypatch.setattr(monitor, "progress_bar", recording)
    return shown


def _call(method: str, **options: object) -> hessrank.RankResult:
    model = mlp((5, 7, 3), dtype=torch.float32)
    return hessrank.effective_rank(model, CE, classification_batch(16, 5, 3, torch.float32),
                                   method, **options)


#: (progress=, stderr a terminal, the task runs past the threshold, a bar displayed)
_CASES = [
    (True, False, False, True),
    (False, True, True, False),
    (None, True, True, True),
    (None, False, True, False),  # a notebook, a log file, a pipe
    (None, True, False, False),  # short work
]


@pytest.mark.parametrize("method", ["lanczos", "exact"])
@pytest.mark.parametrize(("progress", "terminal", "long", "shown"), _CASES)
def test_a_bar_where_asked_or_where_long_work_is_watched(
        monkeypatch: pytest.MonkeyPatch, bars: list[list[str]], method: str,
        progress: bool | None, terminal: bool, long: bool, shown: bool) -> None:
    """``progress=None`` (the default) shows a bar once a task has run 5 s, where stderr is an
    interactive terminal: a 22 s ``lanczos`` had shown nothing (probe 124). The threshold is
    lowered here, not the work lengthened."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    monkeypatch.setattr(monitor, "AUTO_PROGRESS_SECONDS", 0.0 if long else float("inf"))
    _call(method, progress=progress)
    assert bool(bars) == shown
    if shown:
        assert any(task.startswith(method) for tasks in bars for task in tasks)


def test_a_tracker_shows_no_bar_unless_asked(monkeypatch: pytest.MonkeyPatch,
                                             bars: list[list[str]]) -> None:
    """Amid a training loop's own output a bar would interleave with it: the tracker's
    measurements show none unless ``progress=True`` is among its options."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(monitor, "AUTO_PROGRESS_SECONDS", 0.0)
    batch = classification_batch(16, 5, 3, torch.float32)
    for options, shown in (({}, False), ({"progress": True}, True)):
        bars.clear()
        with hessrank.Tracker(mlp((5, 7, 3), dtype=torch.float32), CE, "lanczos", log=None,
                              **options) as tracker:
            tracker.measure(batch)
        assert bool(bars) == shown


@pytest.mark.parametrize("stderr", [None, object()], ids=["none", "without isatty"])
def test_a_missing_or_bare_stderr_shows_nothing(monkeypatch: pytest.MonkeyPatch,
                                                bars: list[list[str]], stderr: object) -> None:
    """``sys.stderr`` is None under ``pythonw`` or with its descriptor closed, and a stand-in
    may lack ``isatty``: the default raised ``AttributeError`` there, after the work had begun
    (probe 126)."""
    monkeypatch.setattr(monitor, "AUTO_PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(sys, "stderr", stderr)
    _call("lanczos")
    assert not bars


def test_no_bar_inside_the_caller_s_own_display(monkeypatch: pytest.MonkeyPatch,
                                                bars: list[list[str]]) -> None:
    """A caller's ``rich`` progress display on rich's console (``Progress()``, ``track``) and the
    default bar fought over the lines, one left on the screen (probe 126): inside it the
    default shows none."""
    from rich.progress import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(monitor, "AUTO_PROGRESS_SECONDS", 0.0)
    with Progress(transient=True) as own:
        own.add_task("training", total=3)
        _call("lanczos")
    assert not bars
    _call("lanczos")
    assert bars


@pytest.fixture
def added(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """The ``(description, total)`` of each task added to a progress bar of the library's own."""
    tasks: list[tuple[str, object]] = []
    original = monitor.progress_bar

    def recording(**options: object) -> object:
        bar = original(**options, disable=True)
        add_task = bar.add_task

        def add(description: str, **kwargs: object) -> object:
            tasks.append((description, kwargs.get("total")))
            return add_task(description, **kwargs)

        bar.add_task = add  # type: ignore[method-assign]
        return bar

    monkeypatch.setattr(monitor, "progress_bar", recording)
    return tasks


def test_a_lanczos_bar_says_the_total_it_counts_to(added: list[tuple[str, object]]) -> None:
    """The bar counts the spot check's products too: labelled with the run's alone, a bar of
    "300 products" had counted to 316 (probe 132)."""
    model = mlp((5, 20, 3), dtype=torch.float32)  # P = 183: 80 steps, 8 to check them
    hessrank.effective_rank(model, CE, classification_batch(16, 5, 3, torch.float32),
                            "lanczos", progress=True, lanczos_steps=80)
    ((label, total),) = [(label, total) for label, total in added if label.startswith("lanczos")]
    counts = [int(number) for number in re.findall(r"\d+", label)]
    assert len(counts) == 2 and sum(counts) == total, (label, total)


def test_a_blocking_step_is_shown_without_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a task is shown once it has run the threshold even while one step blocks: an
    8,522 x 8,522 eigen-solve ran 37 s with nothing on the screen (the bar had waited for a step
    to come; probe 141)."""
    started = threading.Event()
    original = monitor.progress_bar

    def recording(**options: object) -> object:
        bar = original(**options, disable=True)
        start = bar.start

        def started_now() -> None:
            start()
            started.set()

        bar.start = started_now  # type: ignore[method-assign]
        return bar

    monkeypatch.setattr(monitor, "progress_bar", recording)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(monitor, "AUTO_PROGRESS_SECONDS", 0.0)
    with monitor.Reporter(None).solving(8522):
        assert started.wait(timeout=30)  # shown while the step is still running
    started.clear()
    monkeypatch.setattr(monitor, "AUTO_PROGRESS_SECONDS", float("inf"))
    with monitor.Reporter(None).solving(8522):
        pass
    assert not started.is_set()


@pytest.mark.parametrize(("method", "options"), [
    ("exact", {}), ("exact", {"eigenvectors": 2}), ("ggn", {}), ("fisher", {"eigenvectors": 2}),
    ("ggn", {"per_layer": True})])
def test_the_eigen_solve_has_a_task_of_its_own(added: list[tuple[str, object]], method: str,
                                               options: dict[str, object]) -> None:
    """The dense eigen-solve, the longest single step of the dense methods, is a task named with
    the matrix's size (it had run inside the previous bar's last step, or after it)."""
    result = _call(method, progress=True, **options)
    size = {"exact": result.num_params, "ggn": 16 * 2, "fisher": 16}[method]
    assert (f"eigen-solve ({size} x {size})", None) in added, added
    if options.get("per_layer"):
        assert ("eigen-solves of 2 layers' Gram matrices", 2) in added, added
