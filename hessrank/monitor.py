"""Progress reporting and peak-memory measurement for long calls."""

from __future__ import annotations

import ctypes
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

import torch
from rich import get_console
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]


def progress_bar(**options: Any) -> Progress:
    """The progress display used by the library, the CLI and the examples.

    Description, bar, done/total, elapsed time and ETA, on stderr unless a ``console`` is given.

    Args:
        **options: keyword arguments of ``rich.progress.Progress`` (e.g. ``transient=True``,
            ``disable=True``, ``console=...``).

    Returns:
        A ``rich.progress.Progress``, to use as a context manager.
    """
    options.setdefault("console", Console(stderr=True))
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), **options)


#: Seconds a task runs before ``progress=None`` shows its bar (on an interactive terminal).
AUTO_PROGRESS_SECONDS = 5.0


def _watched() -> bool:
    """Whether someone may be watching this process's stderr, and nothing else draws there: an
    interactive terminal (not a notebook, a log file or a pipe; nor a missing stderr, None
    under ``pythonw`` or with its descriptor closed, or a stand-in without ``isatty``), not a
    data-parallel rank other than 0, and no live display of rich's own console running (a
    caller's ``rich.progress.track`` or ``Progress()``: two displays fought over the lines,
    and one was left on the screen; probe 126). A caller's display on a console of its own is
    not seen: pass ``progress=False`` there."""
    try:
        terminal = bool(sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):  # None, no isatty, a closed file
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return (terminal and not (distributed and torch.distributed.get_rank() != 0)
            and not getattr(get_console(), "_live_stack", None))


class Reporter:
    """Progress bars with ETA through ``rich``; silent unless asked for.

    ``progress`` is ``False`` (silent), ``True`` (a bar of its own on stderr), a
    ``rich.progress.Progress`` that tasks are added to (so a CLI can show them in its own
    display), or ``None``: a bar of its own once a task has run
    :data:`AUTO_PROGRESS_SECONDS`, where someone may watch stderr (:func:`_watched`), shown
    then even while a single step blocks (an eigen-solve: elapsed time and a spinner).
    """

    def __init__(self, progress: bool | Progress | None = False) -> None:
        self._external = None if progress is None or isinstance(progress, bool) else progress
        self._enabled = bool(progress)
        self._automatic = progress is None

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        """A progress task of ``total`` units (None: one blocking piece of work whose length is
        not counted, shown by its elapsed time; 0: nothing to show); yields ``advance(k)``."""
        if total == 0:
            yield lambda k: None
            return
        if self._automatic:
            if not _watched():
                yield lambda k: None
                return
            with self._delayed(description, total) as advance:
                yield advance
            return
        if not self._enabled:
            yield lambda k: None
            return
        owner: Any = (nullcontext(self._external) if self._external is not None
                      else progress_bar(transient=True))
        with owner as progress:
            task_id = progress.add_task(description, total=total)
            try:
                yield lambda k: progress.advance(task_id, k)
            finally:
                if self._external is not None:
                    progress.remove_task(task_id)

    def solving(self, size: int) -> AbstractContextManager[Advance]:
        """The task of one dense eigen-solve of a ``size x size`` matrix: a blocking step (tens
        of seconds from a few thousand rows on a CPU), shown by its elapsed time."""
        return self.task(f"eigen-solve ({size:,} x {size:,})", None)

    @staticmethod
    @contextmanager
    def _delayed(description: str, total: int | None) -> Iterator[Advance]:
        """A bar counted from the start, displayed :data:`AUTO_PROGRESS_SECONDS` after it (its ETA
        from the whole task's pace): by a timer, so that a step that blocks (an 8,522 x 8,522
        eigen-solve ran 37 s with nothing on the screen; probe 141) is shown too, and at a step
        that comes later than that."""
        bar = progress_bar(transient=True)
        task_id = bar.add_task(description, total=total)
        started = time.perf_counter()
        lock = threading.Lock()
        shown = finished = False

        def show() -> None:
            nonlocal shown
            with lock:
                if not shown and not finished:
                    bar.start()
                    shown = True

        timer = threading.Timer(AUTO_PROGRESS_SECONDS, show)
        timer.daemon = True
        if math.isfinite(AUTO_PROGRESS_SECONDS):
            timer.start()

        def advance(k: int) -> None:
            bar.advance(task_id, k)
            if not shown and time.perf_counter() - started >= AUTO_PROGRESS_SECONDS:
                show()

        try:
            yield advance
        finally:
            timer.cancel()
            with lock:
                finished = True
                if shown:
                    bar.stop()


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Return the C allocator's free memory to the system (glibc ``malloc_trim``), so that memory
    an earlier call freed is not silently reused and missed by the next measurement."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_high_water_mark() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory of a block, in bytes above its start (and ``held``, what its work holds from
    before), when ``enabled``.

    CUDA: the caching allocator's peak (``max_memory_allocated``), reset at entry. CPU (Linux):
    the kernel's resident-set high-water mark, reset at entry, minus the resident set at entry:
    memory the process had to obtain for the block. The C allocator's free memory is returned to
    the system at entry (``malloc_trim``), so memory an earlier call freed is counted again
    rather than silently reused. The heap earlier work left still moves the figure, either way:
    memory it kept is reused unmeasured, holes it left push new blocks onto fresh pages (an
    LSTM's ``lanczos`` measured 118 MiB after a test suite's thousand calls, 205-220 MiB in fresh
    processes; ten other calls before it moved figures by up to 35 MiB). A fresh process gives
    the call's own figure (as ``benchmarks/`` and the tests use), with what its first call loads
    once (code, lazily imported modules: 10-32 MiB on the CPU, 124-126 MiB with ``torch.func``,
    ``benchmarks/working_memory.py --first-call``; ``benchmarks/`` warm up first).
    ``peak`` is None where neither measure is available, or when not ``enabled``. Measuring
    resets process-wide state (the peak statistic a training loop may read afterwards), which is
    why a library call measures only when asked (``effective_rank(..., measure_memory=True)``).
    """

    def __init__(self, device: torch.device, enabled: bool = True, held: int = 0) -> None:
        self.device = device
        self.enabled = enabled
        #: bytes the block's work holds from before its start (a call's copy of its batch),
        #: added to the peak
        self.held = held
        self.peak: int | None = None
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_free_memory()
        if _reset_high_water_mark():
            self._start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start + self.held
            return
        high_water = _status_bytes("VmHWM")
        if high_water is not None:
            self.peak = max(0, high_water - self._start) + self.held
