"""Progress reporting and peak-memory measurement for long calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

Advance = Callable[[int], None]


class Reporter:
    """Progress bars with ETA through ``rich``; silent unless asked for.

    ``progress`` is ``False`` (silent), ``True`` (a bar of its own on stderr) or a
    ``rich.progress.Progress`` that tasks are added to (so a CLI can show them in its own display).
    """

    def __init__(self, progress: object = False) -> None:
        self._external = None if isinstance(progress, bool) else progress
        self._enabled = bool(progress)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        """A progress task of ``total`` units; yields ``advance(k)``."""
        if not self._enabled:
            yield lambda k: None
            return
        if self._external is not None:
            owner = nullcontext(self._external)
        else:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            owner = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(),
                             console=Console(stderr=True), transient=True)
        with owner as progress:
            task_id = progress.add_task(description, total=total)
            try:
                yield lambda k: progress.advance(task_id, k)
            finally:
                if self._external is not None:
                    progress.remove_task(task_id)


def _resident_bytes() -> int | None:
    """Current resident set size of this process (Linux ``/proc``), None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block, in bytes above its start.

    CUDA: the caching allocator's peak (``max_memory_allocated``), reset at entry. CPU: the
    resident set size sampled every millisecond in a thread (allocations shorter than a
    millisecond may be missed). ``peak`` is None where neither is available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None
        self._stop = threading.Event()
        self._max = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._start = _resident_bytes()
        if self._start is not None:
            self._max = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            current = _resident_bytes() or 0
            self._max = max(self._max, current)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, _resident_bytes() or 0)
        self.peak = self._max - self._start
