"""Curvature over training: :class:`Tracker` measures ranks on a schedule from any training loop.

>>> tracker = hessrank.Tracker(model, loss_fn, methods=("fisher",), every=100,
...                            log="runs/curvature.jsonl")
>>> for step, (x, y) in enumerate(loader):
...     ...                      # your forward, backward, optimizer step
...     tracker.step((x, y))     # measures when due; one JSON line per method and measurement
>>> tracker.close()

Every measurement goes through :func:`hessrank.effective_rank`, which leaves the model, its
gradients, buffers, modes, hooks and the global RNG exactly as they were, so a training run is
bitwise identical with and without the tracker. The same :meth:`Tracker.measure` records the
checkpoints of ``hessrank compare --checkpoints``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import numbers
import operator
import os
import time
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import torch
from torch import Tensor, nn

import hessrank
from hessrank.api import checked_request, effective_rank
from hessrank.estimators import ALL_METHODS
from hessrank.guard import deferred_interrupts, handled_now, signalled
from hessrank.problem import check_batch, named_selection, selected_size, unwrap_model
from hessrank.streaming import is_batch_stream

if TYPE_CHECKING:
    from hessrank.results import RankResult

__all__ = ["JsonLinesSink", "Measurement", "Sink", "TensorBoardSink", "Tracker", "record_scalars"]

ON_ERROR = ("raise", "warn", "record")
# effective_rank's own arguments that the tracker sets itself.
_RESERVED = ("model", "loss_fn", "batch", "method", "per_layer")
#: What ends a refusal of a shared option that some of the methods take (the CLI, which passes
#: each flag to every method that reads it, leaves it out).
METHOD_OPTIONS_HINT = (" (an option for some of the methods only goes in method_options, e.g. "
                       "method_options={'exact': {'mode': 'train'}})")


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised in this module point at the first line
    outside it (the caller's ``tracker.step(...)``), however deep in the tracker it is raised."""
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None  # the frame that calls warnings.warn
    level = 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _finite(value: float) -> float | None:
    """``value`` as a float, or None when it is NaN or infinite (JSON has no such numbers)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _summary(result: RankResult) -> dict[str, Any]:
    """The numbers of one result (the whole model's or a layer's): srank, every entry of
    ``result.ranks``, top eigenvalue, trace, the numerical rank's ``rtol`` (it differs by method
    and layer: the matrix's size times epsilon), and the 95 % ``rank_interval``,
    ``trace_interval`` and ``numerical_interval`` (Lanczos)."""
    out: dict[str, Any] = {"rank": int(result.rank)}
    out.update({name: _finite(value) for name, value in result.ranks.items()})
    out["top_eigenvalue"] = _finite(result.top_eigenvalue)
    out["trace"] = _finite(result.trace)
    out["rtol"] = float(result.rtol)
    for name in ("rank_interval", "trace_interval", "numerical_interval"):
        interval = getattr(result, name)
        if interval is not None:
            out[name] = [_finite(bound) for bound in interval]
    return out


@dataclass(frozen=True)
class Measurement:
    """One method measured at one step: its result, or the error it raised.

    Attributes:
        step: the training step the measurement belongs to.
        method: the estimator's name (one of :data:`hessrank.ESTIMATORS`: ``"fisher"``,
            ``"ggn"``, ``"exact"``, ``"lanczos"``, ``"ggn_lanczos"``, ``"fisher_lanczos"``).
        result: the :class:`hessrank.RankResult`, None when the method failed.
        error: the exception the method raised (``on_error`` ``"warn"``/``"record"``), else None.
        record: the JSON line: ``step``, ``method``, ``rank``, every entry of ``result.ranks``
            (``srank``, ``numerical``, ...), ``top_eigenvalue``, ``trace``, ``seconds``,
            ``num_params``, ``num_samples``, ``threshold``, ``rtol``, ``backend``,
            ``rank_interval``, ``trace_interval`` and ``numerical_interval`` (``lanczos``),
            ``layers`` (each layer's ranks, top eigenvalue, trace, ``rtol`` and intervals, with
            ``per_layer=True``), ``notes`` (the result's caveats: a Lanczos run whose Ritz values
            did not converge, a rank capped by ``n``, the mode measured); for a failure
            ``step``, ``method`` and ``error`` (the message). Non-finite numbers are None.
    """

    step: int
    method: str
    result: RankResult | None = None
    error: Exception | None = None
    record: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        record: dict[str, Any] = {"step": self.step, "method": self.method}
        if self.result is None:
            record["error"] = " ".join(f"{type(self.error).__name__}: {self.error}".split())
        else:
            res = self.result
            record.update(_summary(res))
            record.update(
                seconds=float(res.seconds),
                num_params=int(res.num_params),
                num_samples=int(res.num_samples),
                threshold=float(res.threshold),
                backend=res.backend,
                notes=list(res.notes),
            )
            if res.layers:
                record["layers"] = {name: _summary(layer) for name, layer in res.layers.items()}
        object.__setattr__(self, "record", record)


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record as flat keys, for scalar loggers (TensorBoard, Lightning, W&B).

    Args:
        record: a :attr:`Measurement.record`.

    Returns:
        ``method/name`` -> value (``fisher/rank``, ``fisher/top_eigenvalue``, and
        ``fisher/layers/0/srank`` for per-layer records); ``{}`` for a failure. Null (non-finite)
        numbers are left out.
    """
    method = record["method"]
    skip = ("step", "method", "backend", "error", "rank_interval", "trace_interval",
            "numerical_interval", "layers", "rtol", "notes")
    out = {
        f"{method}/{key}": float(value)
        for key, value in record.items()
        if key not in skip and isinstance(value, int | float)
    }
    for layer, values in record.get("layers", {}).items():
        out.update(
            {f"{method}/layers/{layer}/{key}": float(v) for key, v in values.items()
             if key not in skip and isinstance(v, int | float)}
        )
    return out


class Sink(Protocol):
    """Where records go: anything with ``write(record)`` and ``close()``."""

    def write(self, record: dict[str, Any]) -> None:
        """Store one record.

        Args:
            record: a :attr:`Measurement.record`.
        """

    def close(self) -> None:
        """Flush and release the destination."""


class JsonLinesSink:
    """One JSON object per line, flushed after each, so a crash keeps what was measured.

    The file is checked writable when the sink is made, and opened at the first record: making
    a sink (a tracker built and never run) leaves an existing file as it is.

    Args:
        path: the file; its folder is created (and removed again by :meth:`close`, with any
            folder above it that the sink created, where no record was written and they are
            empty). A folder (a string that ends in a path separator, or an existing folder)
            is refused. Replaced at the first record unless ``append``,
            with a ``RuntimeWarning`` that names what an earlier run left there; a file that
            holds anything but records is refused. Where another open sink of this process has
            the file, this one takes it over (a cell run again), with a ``RuntimeWarning``, and
            the other's next record raises; another process writing it (its sink open) is
            refused, where the system locks files (``fcntl``).
        append: add to an existing file (a resumed run) instead of replacing it. A last line
            that a crash cut mid-write (no newline, not JSON) is dropped at the first record,
            with a ``RuntimeWarning`` that shows it, so that the record starts a line of its own.
            Where a method's first record's step is not past the file's (a run resumed from a
            checkpoint older than its last records), the method's records of that step and
            later, which the resumed run redoes, are moved to ``<name>.superseded<suffix>``,
            with a ``RuntimeWarning``; :meth:`resume` moves those of the step training resumes
            at and later.
        new: the file must not exist yet: it is created now, exclusively, so no other sink (in
            this process or another) can have it, and removed by :meth:`close` if no record was
            written to it.

    Attributes:
        next_step: one past the largest ``step`` of the records already in the file when
            ``append`` (0 for a new or empty file, or without ``append``).

    Raises:
        FileExistsError: ``new`` and the file exists.
        IsADirectoryError: ``path`` names a folder, not a file in it.
        ValueError: both ``new`` and ``append``, or the file holds something other than
            records (a line that is not a JSON object with ``step`` and ``method``).
        OSError: the file cannot be opened for writing, or another process's sink has it.
    """

    #: another sink of this process has taken over the file (:meth:`write` raises)
    superseded: bool

    def __init__(self, path: str | Path, append: bool = False, *, new: bool = False) -> None:
        if new and append:
            raise ValueError("JsonLinesSink(new=True) makes a file of its own: there is nothing "
                             "to append to; pass one of new and append")
        # absolute: a relative path read after the caller changes folder was another file (a
        # log of that folder's replaced, this one left empty; probe 103)
        self.path = Path(path).absolute()
        separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
        if (isinstance(path, str) and path.endswith(separators)) or self.path.is_dir():
            # Path() drops a trailing separator: log="runs/" wrote a file named runs (probe 115)
            raise IsADirectoryError(
                f"log {str(path)!r} names a folder, not a file: name a file in it, e.g. "
                f"log={str(Path(path) / DEFAULT_LOG.name)!r}")
        self._key = self.path.resolve()  # the file, however its path is spelt
        earlier = None if new else _OPEN_LOGS.get(self._key)  # new: made exclusively
        if earlier is not None:  # two writers would overwrite each other's lines
            earlier.superseded = True
            earlier.close()
            warnings.warn(
                f"{self.path} was the log of another open tracker, which writes to it no more "
                "(its next record raises): this one takes it over, as when a cell that builds a "
                "tracker runs again. To keep both, give each tracker its own log=, or measure "
                "the methods with one Tracker(model, loss_fn, methods=[...])",
                RuntimeWarning, stacklevel=_user_stacklevel())
        self.superseded = False
        self._pid = os.getpid()  # a forked child holds a copy that must not write
        #: the folders the sink creates for the file, deepest first: removed at close, where
        #: empty, if it got no record (a tracker that recorded nothing left out/ behind; probe
        #: 115)
        self._made_folders = [folder for folder in self.path.parents if not folder.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a bare "[Errno 2] ..." had named no log= (probe 124)
            self._remove_made_folders()
            raise type(error)(error.errno, (
                f"log {str(path)!r}: its folder {str(self.path.parent)!r} cannot be created "
                f"({error.strerror}): give log= a file in a folder you can write, or log=None "
                "for no file")) from error
        self.append = append
        self._file: TextIO | None = None
        #: the sink made the file (it was not there): removed at close if it got no record
        self._made = new or not self.path.exists()
        try:
            #: the steps of the records the file holds, by method (checked: a log, or empty):
            #: an earlier run's, and this one's as it writes them
            self._logged = ({} if new or self._made
                            else _steps_by_method(_logged_records(self.path)))
            # writable? (creates it, changes nothing that is there); held, locked, until close
            try:
                self._lock = self.path.open("x" if new else "a")
            except OSError as error:
                if error.errno is None or isinstance(error, (FileExistsError, IsADirectoryError)):
                    raise
                # (a bare "[Errno 2] ... '/proc/x.jsonl'" had named no log=; probe 146)
                raise type(error)(error.errno, (
                    f"log {str(path)!r} cannot be opened for writing ({error.strerror}): give "
                    "log= a file you can write, or log=None for no file")) from error
        except BaseException:
            self._remove_made_folders()
            raise
        try:
            _lock_against_other_processes(self._lock, self.path)
        except OSError:
            self._lock.close()
            if self._made and self.path.stat().st_size == 0:
                self.path.unlink()
                self._remove_made_folders()
            raise
        #: the steps of the records this sink wrote that the file holds, by method
        self._own: dict[str, list[int]] = {}
        if new:
            self._file = self._lock
        self.next_step = max((max(steps) for steps in self._logged.values()),
                             default=-1) + 1 if append else 0
        _OPEN_LOGS[self._key] = self

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line.

        Args:
            record: a :attr:`Measurement.record` (JSON-serialisable, no NaN or infinity).

        Raises:
            RuntimeError: a newer sink of this process has taken over the file, or this is a
                forked child of the process that made the sink.
        """
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"{self.path} is the log of the tracker of process {self._pid}, which forked "
                f"this one ({os.getpid()}): two processes writing one log interleave their "
                "lines; measure in the parent, or give the child a tracker and log= of its own")
        if self.superseded:
            raise RuntimeError(
                f"{self.path} has been taken over by a newer tracker's log (the same log= path), "
                "so this tracker writes to it no more (the record is in its .records): give "
                "each tracker its own log=")
        if self._file is None:
            if self.append:
                _end_last_line(self.path)
            elif self.path.stat().st_size > 0:
                warnings.warn(f"replacing {self.path}, which holds an earlier run's records: "
                              "pass append=True to add to it, or another log path",
                              RuntimeWarning, stacklevel=_user_stacklevel())
            self._file = self.path.open("a" if self.append else "w")
            if not self.append:
                self._logged = {}  # the earlier run's records are gone
        # the first record of a method this run resumes before its last ones (a later one that
        # goes back is the run's own, warned of by the tracker, not an earlier run's to move)
        method, step = record["method"], record["step"]
        steps = self._logged.get(method)
        if self.append and method not in self._own and steps and step <= max(steps):
            self._supersede({method}, step)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        # kept, not popped at the first record: a measure() before the loop had emptied it,
        # and the resume that followed moved nothing (steps 15-30 logged twice; probe 115)
        self._own.setdefault(method, []).append(step)
        self._logged.setdefault(method, []).append(step)

    def resume(self, step: int, methods: Collection[str]) -> set[str]:
        """The run resumes training at ``step`` (a tracker's first counted step): where
        ``append``, the records of ``methods`` at that step and later, taken on the trajectory
        the run abandoned, move to the ``.superseded`` file beside it, with a
        ``RuntimeWarning``, whichever steps the resumed run records them at (other methods'
        records stay: a run that adds a method to a log). Those this sink wrote before (a
        :meth:`Tracker.measure` of the restored model, numbered by the log's last step) move
        too: the run redoes those steps, and the log holds each method's step once.

        Args:
            step: the first step the resumed run counts.
            methods: the methods the resumed run measures.

        Returns:
            The methods whose records moved.
        """
        if not self.append or self.superseded:  # (a superseded sink's file is another's)
            return set()
        redone = {method for method in methods
                  if max(self._logged.get(method) or [-1]) >= step}
        if redone:
            # whole or not at all: a Ctrl-C between the copy to the side file and the log's
            # rewrite had the next step move the records again, into the side file twice
            # (probe 153)
            with deferred_interrupts():
                self._supersede(redone, step)
        return redone

    def _supersede(self, methods: set[str], step: int) -> None:
        """Move the file's records of ``methods`` at ``step`` and later to the ``.superseded``
        file beside it: the run resumed before them, and redoes them (other methods' records
        stay)."""
        reopen = self._file is not None
        if self._file is not None:
            self._file.close()
            self._file = None  # (closing after an interrupted move asks no closed file)
        else:  # a crash-cut last line dropped first: its warning numbers the file as it was,
            _end_last_line(self.path)  # not as rewritten (line 10 for 12; probe 187)
        side = self.path.with_name(f"{self.path.stem}.superseded{self.path.suffix}")
        kept: list[str] = []
        moved: list[str] = []
        for line in self.path.read_text().splitlines(keepends=True):
            _, record, _ = _line_record(line)
            redone = (record is not None and record["method"] in methods
                      and record["step"] >= step)
            (moved if redone else kept).append(line)
        with side.open("a") as file:
            file.writelines(moved)
            file.flush()
            os.fsync(file.fileno())
        # The log is written whole beside itself and swapped in: rewritten in place it was empty
        # until written again, and a kill then lost every record (300,000 of them; probe 85).
        # The copy is locked before it takes the log's name, so no other process's tracker can
        # take the file between. (A kill before the swap leaves the moved records in both files.)
        target = Path(os.path.realpath(self.path))  # a link stays a link
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a killed rewrite's copy
            stale.unlink(missing_ok=True)  # (only the sink holding the log's lock rewrites it)
        copy = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        lock = copy.open("w")
        try:
            _lock_against_other_processes(lock, copy)
            lock.writelines(kept)
            lock.flush()
            os.fsync(lock.fileno())
            os.replace(copy, target)
        except BaseException:
            lock.close()
            copy.unlink(missing_ok=True)
            raise
        self._lock.close()
        self._lock = lock
        own = sum(s >= step for method in methods for s in self._own.get(method, ()))
        for steps in (self._logged, self._own):
            for method in methods & steps.keys():
                steps[method] = [s for s in steps[method] if s < step]
        if reopen:
            self._file = self.path.open("a")
        # (this run's own: recorded before the step it resumes at was known, e.g. a measure()
        # of the restored model numbered by the log's last step)
        whose = ("from an earlier run" if not own else
                 f"{len(moved) - own} from an earlier run, {own} this run's own from before "
                 "it counted a step")
        warnings.warn(f"{self.path}: this run resumes {', '.join(sorted(methods))} at step "
                      f"{step}, before the last {len(moved)} record(s) ({whose}; steps {step} "
                      f"and on), which it redoes: moved them to {side}",
                      RuntimeWarning,
                      stacklevel=_user_stacklevel())

    def close(self) -> None:
        """Close the file; remove it if this sink made it and wrote no record to it (an empty
        log, which ``hessrank plot`` refuses, is not left behind)."""
        if self._lock.closed:
            return
        if _OPEN_LOGS.get(self._key) is self:
            del _OPEN_LOGS[self._key]
        unused = self._file is None or self._file.tell() == 0
        if self._file is not None:
            self._file.close()
        self._lock.close()
        if self._made and unused and self.path.exists() and self.path.stat().st_size == 0:
            self.path.unlink()
            self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        """Remove the folders the sink created for its file, deepest first, while empty (one
        that holds another file now stays, with those above it)."""
        for folder in self._made_folders:
            try:
                folder.rmdir()
            except OSError:
                return


#: The files of this process's open :class:`JsonLinesSink` s (an unreferenced one drops out).
_OPEN_LOGS: weakref.WeakValueDictionary[Path, JsonLinesSink] = weakref.WeakValueDictionary()


def _end_last_line(path: Path) -> None:
    """Make the next byte appended to ``path`` start a line: a last line without its newline
    gets one where it is a whole record, and is dropped, with a ``RuntimeWarning`` that shows
    it, where a crash cut it mid-write (it is not JSON)."""
    data = path.read_bytes()
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    if not tail:
        return
    try:
        json.loads(tail)
    except ValueError:  # not JSON, or not text
        os.truncate(path, start)
        number = data.count(b"\n") + 1
        shown = tail[:60].decode(errors="replace") + ("..." if len(tail) > 60 else "")
        warnings.warn(f"{path}: dropped line {number}, which a crash cut "
                      f"mid-write ({len(tail)} bytes, not a record: {shown!r}); appending "
                      "after the last whole line", RuntimeWarning, stacklevel=_user_stacklevel())
    else:
        with path.open("a") as file:
            file.write("\n")


#: :func:`hessrank.effective_rank`'s default ``threshold``.
_DEFAULT_THRESHOLD = inspect.signature(effective_rank).parameters["threshold"].default

#: Every record's JSON line starts so (its first key is the step).
_RECORD_START = '{"step": '


def _line_record(line: str) -> tuple[str, dict[str, Any] | None, bool]:
    """A log line without its padding (blanks, NUL bytes), the record it holds (a JSON object
    with an integer ``step`` and a ``method`` name; None for anything else), and whether it is
    JSON at all."""
    content = line.strip().strip("\x00")
    try:
        value, whole = json.loads(content), True
    except json.JSONDecodeError:
        value, whole = None, False
    is_record = (isinstance(value, dict) and isinstance(value.get("step"), int)
                 and isinstance(value.get("method"), str))
    return content, value if is_record else None, whole


def _logged_records(path: Path) -> list[dict[str, Any]]:
    """The records in the log at ``path``, in order. Blank lines and NUL bytes (a file
    system's padding after a power loss) are left out, and so is a last line without its
    newline that a crash may have cut: a whole record, or one that begins as records do.

    Raises:
        ValueError: a line is not a record (a JSON object with an integer ``step`` and a
            ``method``): the file is not a log, and a tracker would replace or extend it.
    """
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        text = None
    lines = [] if text is None else text.split("\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        content, record, whole = _line_record(line)
        if not content:
            continue
        if record is not None:
            records.append(record)
            continue
        if number == len(lines) and not whole and (content.startswith(_RECORD_START)
                                                   or _RECORD_START.startswith(content)):
            continue  # no newline after it, and not whole: a record a crash cut
        break
    else:
        if text is not None:
            return records
        number, line = 1, "(not text)"
    shown = line[:60] + ("..." if len(line) > 60 else "")
    raise ValueError(f"log {path} holds something other than hessrank records (line {number}: "
                     f"{shown!r}), which a tracker would replace or extend: name another file")


def _listed_params(options: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``options`` with a ``params`` iterator (not a list) read into a list, and parameters
    given as tensors named as ``model`` (the module analysed) names them: a layer
    re-initialised with new ``nn.Parameter`` objects (a plasticity study's reset) is the same
    selection, which the tensors had refused as not the model's at every later measurement
    (probe 216). A selection that does not name the model's parameters is left as it is, for
    the check that refuses it."""
    chosen = options.get("params")
    if isinstance(chosen, Iterator):
        chosen = list(chosen)
    if isinstance(chosen, list | tuple) and any(isinstance(item, Tensor) for item in chosen):
        inner = unwrap_model(model)[0]
        try:
            wanted = named_selection(inner, chosen)
        except (TypeError, ValueError):
            pass
        else:
            chosen = [name for name, _ in inner.named_parameters() if wanted and name in wanted]
    return options if chosen is options.get("params") else {**options, "params": chosen}


def _steps_by_method(records: Iterable[Mapping[str, Any]]) -> dict[str, list[int]]:
    """The records' steps, by method, in order."""
    steps: dict[str, list[int]] = {}
    for record in records:
        steps.setdefault(record["method"], []).append(record["step"])
    return steps


#: What a record says of the measurement's configuration, which a log's trajectory holds fixed.
_CONFIGURATION = ("num_params", "threshold", "rtol")


def _refuse_other_configuration(path: Path, methods: Iterable[str],
                                configuration: Callable[[str], Mapping[str, object]],
                                before: int | None = None) -> bool:
    """Raise where the log at ``path`` (if any, and a log) holds measurements of one of
    ``methods`` of another configuration than ``configuration(method)`` gives (``num_params``,
    ``threshold``, ``rtol``; a value None is not known before the first measurement, a lazy
    module's size, or not set, the default ``rtol``), asked only where the log has a record of
    the method to compare with.

    With ``before`` (the step a resumed run counts from), its last record before that step is
    compared: the later ones are the abandoned trajectory's, which the resume moves aside. With
    ``before`` None (no step known yet), a log that holds the configuration at some record is
    not refused (a layer frozen after the checkpoint the run resumes from: its later records
    differ, and an appending run had been refused; probe 195): that is asked again, of the
    records before the resumed step, once it is known.

    Returns:
        Whether a record of another configuration was let pass, to be asked again with
        ``before``.

    Raises:
        ValueError: naming the method, the fields, their values there and here, and the fix.
    """
    try:
        records = _logged_records(path) if path.is_file() else []
    except (OSError, ValueError):  # the sink names what is wrong with the file
        return False
    configured = [record for record in records if all(key in record for key in _CONFIGURATION)
                  and (before is None or record["step"] < before)]
    pending = False
    for method in methods:
        expected = configuration(method)

        def differ(record: Mapping[str, Any], expected: Mapping[str, object] = expected
                   ) -> list[str]:
            return [key for key in _CONFIGURATION
                    if expected[key] is not None and record[key] != expected[key]]

        logged = [record for record in configured if record["method"] == method]
        if not logged or not differ(logged[-1]):
            continue
        if before is None and any(not differ(record) for record in logged):
            pending = True
            continue
        there = logged[-1]
        shown = "; ".join(f"{key} {there[key]!r} there, {expected[key]!r} here"
                          for key in differ(there))
        raise ValueError(
            f"log {str(path)!r} holds {method} measurements of another configuration "
            f"({shown}; its last at step {there['step']}): appended, the two runs would "
            "read as one trajectory, with a jump that is the configuration's. Give this "
            "run another log=, or the same configuration as the logged one (params=, "
            "threshold=, rtol=)")
    return pending


#: The open files that hold this process's log locks (a child forked from it closes its
#: copies: a DataLoader worker's kept the lock after the tracker had closed its log).
_LOCKS: weakref.WeakSet[TextIO] = weakref.WeakSet()


def _close_inherited_locks() -> None:
    """In a forked child: point the lock files' descriptors at /dev/null (the lock is the
    parent's; the file objects stay valid, and closing them later closes /dev/null)."""
    if not _LOCKS:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for file in list(_LOCKS):
            with contextlib.suppress(OSError, ValueError):  # ValueError: closed already
                os.dup2(null, file.fileno())
    finally:
        os.close(null)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _lock_against_other_processes(file: TextIO, path: Path) -> None:
    """Lock ``file`` for this process until it is closed; raise if another process holds it
    (no lock where the system has no ``fcntl``, or the file system none: Lustre without
    ``flock``, NFS without a lock daemon).

    Raises:
        OSError: another process's sink has the file.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        raise OSError(f"log {path} is being written by a tracker in another process: give each "
                      "run its own log=") from error
    except OSError:  # ENOSYS, ENOLCK: this file system does not lock
        return
    _LOCKS.add(file)


#: The ``log`` a :class:`Tracker` writes when none is given. It never replaces an earlier run's
#: file, nor shares one with another tracker: the next ``curvature-<k>.jsonl`` that does not
#: exist is taken instead.
DEFAULT_LOG = Path("curvature.jsonl")


def _sink_failure(sinks: Sequence[Sink], act: Callable[[Sink], None]) -> Exception | None:
    """``act`` on every sink; the first error one raised, None if none: a sink that fails (a
    network logger's ``ConnectionError``) had kept the record from the ones after it, the JSON
    log among them (probe 124)."""
    failed: Exception | None = None
    for sink in sinks:
        try:
            act(sink)
        except Exception as error:  # noqa: BLE001 - raised once every sink has had its turn
            failed = failed or error
    return failed


def _every_sink(sinks: Sequence[Sink], act: Callable[[Sink], None]) -> None:
    """``act`` on every sink, then the first error one raised (:func:`_sink_failure`)."""
    failed = _sink_failure(sinks, act)
    if failed is not None:
        raise failed


def _default_log_sink() -> JsonLinesSink:
    """A sink on ``curvature.jsonl`` in the working folder, or on the first
    ``curvature-<k>.jsonl`` that does not exist: each is created exclusively, so two trackers,
    in one process or in several, never write to the same file."""
    candidate, k = DEFAULT_LOG, 1
    while True:
        try:
            return JsonLinesSink(candidate, new=True)
        except FileExistsError:
            if _abandoned(candidate):
                # taken where it is, under the sink's own lock (not removed and made again: a
                # process that took it in between had written to a file then unlinked, its
                # records lost; probe 139)
                try:
                    sink = JsonLinesSink(candidate)
                except OSError:  # another process has taken it since
                    pass
                else:
                    sink._made = True  # removed at close if it gets no record, as if made
                    return sink
            candidate = DEFAULT_LOG.with_name(f"{DEFAULT_LOG.stem}-{k}{DEFAULT_LOG.suffix}")
            k += 1


def _abandoned(path: Path) -> bool:
    """Whether ``path`` is an empty log that no tracker holds: a default log left behind by a
    run that crashed before its first record (its close, which removes it, never ran), which
    the next run had passed over for ``curvature-1.jsonl``, so that ``hessrank plot
    curvature.jsonl`` found no measurement (probe 137). Held means open in this process or
    locked by another; where the system cannot lock, no file is taken for abandoned."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        if path.absolute().resolve() in _OPEN_LOGS or path.stat().st_size:
            return False
        with path.open("a") as file:  # (the lock goes with the file)
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # gone, locked, or a file system without locks
        return False
    return True


class TensorBoardSink:
    """Scalars ``hessrank/<method>/<name>`` at each step, through ``torch.utils.tensorboard``.

    Args:
        log_dir: the TensorBoard run folder (``tensorboard --logdir`` its parent).

    Raises:
        ImportError: the ``tensorboard`` package is not installed (``pip install tensorboard``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "Tracker(tensorboard=...) needs the tensorboard package: pip install tensorboard"
            ) from err
        Path(log_dir).mkdir(parents=True, exist_ok=True)  # (refused now where it cannot be)
        self._make_writer = functools.partial(SummaryWriter, log_dir=str(log_dir))
        self._writer: Any = None  # made at the first record (resume() may purge before it)
        self._purge_step: int | None = None

    def resume(self, step: int) -> None:
        """The run resumes at ``step`` (a tracker appending to its log): the folder's points
        at that step and later, the trajectory the run abandoned, are hidden from TensorBoard
        (``SummaryWriter(purge_step=step)``), as the JSON log moves them aside (its curves had
        gone back from step 7 to 5; probe 195). Before the first record only."""
        if self._writer is None:
            self._purge_step = step

    def write(self, record: dict[str, Any]) -> None:
        """Every number of ``record`` as a scalar at ``record['step']``; a failure as text.

        Args:
            record: a :attr:`Measurement.record`.
        """
        if self._writer is None:
            self._writer = self._make_writer(purge_step=self._purge_step)
        step = record["step"]
        if "error" in record:
            self._writer.add_text(f"hessrank/{record['method']}/error", record["error"], step)
        for key, value in record_scalars(record).items():
            self._writer.add_scalar(f"hessrank/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()


def _check_options(options: Mapping[str, Any], where: str, methods: Sequence[str]) -> None:
    """Every key of ``options`` must be a keyword of ``hessrank.effective_rank`` or an
    estimator option (``hessrank.estimator_options()``) that one of ``methods`` takes (the
    tracker's methods for its shared options, the one method for its ``method_options``).

    Raises:
        TypeError: a name that is neither.
        ValueError: an estimator option none of ``methods`` takes.
    """
    estimator_options = hessrank.estimator_options()
    keywords = {name for name, parameter in
                inspect.signature(hessrank.effective_rank).parameters.items()
                if parameter.kind is not inspect.Parameter.VAR_KEYWORD}
    accepted = (keywords | set(estimator_options)) - set(_RESERVED)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"{where}: {', '.join(unknown)} not an option of hessrank.effective_rank; "
            f"choose from {', '.join(sorted(accepted))}"
        )
    # effective_rank ignores an option of another method (one set of keywords serves a loop
    # over the methods), but one that none of the methods measured takes is a mistake: fisher
    # with lanczos_steps=5 measured as if it had not been given (probe 115); the option's
    # default (None, or backend='auto') any method may be passed
    foreign = [name for name, value in options.items() if name in estimator_options
               and value is not None and value != estimator_options[name]["default"]
               and not set(methods) & set(estimator_options[name]["methods"])]
    if foreign:
        takers = "; ".join(f"{name} is taken by {', '.join(estimator_options[name]['methods'])}"
                           for name in foreign)
        own = "; ".join(
            f"{method} takes " + (", ".join(name for name, option in estimator_options.items()
                                            if method in option["methods"])
                                  or "none of the estimator options")
            for method in methods)
        raise ValueError(
            f"{where}: {', '.join(foreign)} not an option of {' or '.join(methods)}, which "
            f"would ignore it ({takers}; {own}): give it to a method that takes it, or drop it")


def _own_copy(value: Any) -> Any:
    """``value`` with every tensor in it detached and copied (``requires_grad`` as it was):
    tuples and lists as such, any mapping (HuggingFace's ``BatchEncoding``, a ``UserDict``
    that torch's tree functions take for a leaf; probe 139) as a dict, which the analysis
    reads alike; anything else as is."""
    if isinstance(value, torch.Tensor):  # (requires_grad kept: a batch measured by step(batch)
        # and as eval_batch had been analysed as two, with and without it; probe 241)
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, Mapping):
        return {key: _own_copy(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        items = [_own_copy(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


#: Entries of each parameter whose values :func:`_versions` keeps, evenly spaced.
FINGERPRINT_ENTRIES = 16


@dataclass(frozen=True)
class _Rescaled:
    """A weight that its module's forward rescales in place (``nn.Embedding`` or
    ``nn.EmbeddingBag`` with ``max_norm``), as :func:`_versions` read it: its version counter
    and a copy of its values."""

    version: int
    values: Tensor
    max_norm: float
    norm_type: float

    def rescaled_since(self, later: _Rescaled) -> bool:
        """Whether ``later`` holds this reading's values, but for rows that lookups rescaled
        since (``torch.embedding_renorm_``, once per forward: each changed row equals the
        kernel's rescaling of its earlier values, applied up to once per version the counter
        rose, as a row a later forward reaches again shrinks again by its rounding). Exact:
        an update, in place, through ``.data`` or by a fused kernel (neither raises the
        counter), changes a row otherwise."""
        before, after = self.values, later.values
        if (before.shape != after.shape or before.dtype != after.dtype
                or before.device != after.device):
            return False
        changed = ~torch.isclose(before, after, rtol=0, atol=0, equal_nan=True)
        rows = changed.reshape(len(changed), -1).any(dim=1).nonzero().squeeze(1)
        if not len(rows):
            return True
        old, new = before[rows], after[rows]
        matched = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        every = torch.arange(len(rows), device=rows.device)
        for _ in range(later.version - self.version):
            rescaled = old.clone()
            torch.embedding_renorm_(rescaled, every, self.max_norm, self.norm_type)
            matched |= (rescaled == new).reshape(len(rows), -1).all(dim=1)
            if bool(matched.all()) or torch.equal(rescaled, old):
                break
            old = rescaled
        return bool(matched.all())


@dataclass(frozen=True)
class _Reading:
    """What :func:`_versions` reads of the parameters.

    Attributes:
        version: the sum of the version counters of the parameters but ``rescaled``'s.
        entries: their fingerprint entries, joined into one tensor a device and dtype.
        rescaled: the weights a forward rescales in place, whole.
    """

    version: int
    entries: list[Tensor]
    rescaled: tuple[_Rescaled, ...]


def _versions(model: nn.Module) -> _Reading:
    """The sum of the parameters' version counters, which every in-place update of a tensor
    raises, and up to :data:`FINGERPRINT_ENTRIES` evenly spaced entries of each parameter:
    fused optimizer kernels (``Adam(fused=True)``) and writes to ``param.data`` update the
    values without raising the counter (such updates had been taken for gradient
    accumulation's micro-batches and dropped without a word; probe 160). Both unchanged: no
    update happened. The entries are joined into one tensor a device and dtype, compared in
    one operation each (one copy and comparison a parameter had cost 22.6 ms a step on a
    model of 2,000 parameter tensors, 8.5 ms joined; ``benchmarks/tracker_fingerprint.py``).
    A lazy module's parameters before its first forward have no values and are left out (their
    reading had raised torch's error out of ``step()``, whatever ``on_error``; probe 241): they
    come in, an update, as they are initialised.

    The weight of an embedding with ``max_norm`` is read whole instead (:class:`_Rescaled`):
    every forward rescales the rows it looks up in place, raising the counter whether a value
    moves or not, so each micro-batch had been taken for an update, measured and recorded
    again, and warned of as two models at one step (probe 243). Its copy is the one cost of a
    reading that grows with the model, paid by such models alone."""
    rescaled: dict[int, _Rescaled] = {}  # (a table tied to two modules: read once)
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.max_norm is not None:
            rescaled[id(module.weight)] = _Rescaled(
                module.weight._version, module.weight.detach().clone(), module.max_norm,
                module.norm_type)
    params = [param for param in model.parameters()
              if not torch.nn.parameter.is_lazy(param) and id(param) not in rescaled]
    joined: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for param in params:
        joined.setdefault((param.device, param.dtype), []).append(
            param.detach().reshape(-1)[::max(1, param.numel() // FINGERPRINT_ENTRIES)])
    return _Reading(sum(param._version for param in params),
                    [torch.cat(entries) for entries in joined.values()],
                    tuple(rescaled.values()))


def _same_versions(earlier: _Reading | None, later: _Reading | None) -> bool:
    """Whether two :func:`_versions` readings, in the order they were read, show no update
    between them (NaN entries equal; a weight a forward rescales, no change but its lookups'
    rescaling)."""
    if earlier is None or later is None:
        return earlier is later
    return (earlier.version == later.version and len(earlier.entries) == len(later.entries)
            and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                    and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
                    for a, b in zip(earlier.entries, later.entries))
            and len(earlier.rescaled) == len(later.rescaled)
            and all(a.rescaled_since(b) for a, b in zip(earlier.rescaled, later.rescaled)))


def _check_values(loss_fn: Callable[..., Any], method: str, per_layer: bool,
                  options: Mapping[str, Any]) -> None:
    """:func:`hessrank.effective_rank`'s own checks of the values it would get for ``method``
    (:func:`hessrank.api.checked_request`, with its defaults where ``options`` sets none): they
    need no batch, so a tracker runs them when it is made, not at its first measurement. The
    model is checked at each measurement, where a lazy module has had its first training step
    (and a method that refuses the model is recorded as failed there, by ``on_error``)."""
    call = inspect.signature(hessrank.effective_rank).bind_partial(**options)
    call.apply_defaults()
    given = {name: value for name, value in call.arguments.items()
             if name not in ("method", "params", "process_group")}
    checked_request(None, loss_fn, method, **{**given, "per_layer": per_layer})


def _check_eval_batch(batch: object) -> None:
    """``eval_batch`` checked as :func:`hessrank.effective_rank` checks a batch (its form,
    sample counts, finiteness), each batch of a list too."""
    _check_batch(batch, "eval_batch")
    if not is_batch_stream(batch):
        labelled = [("eval_batch", batch)]
    elif isinstance(batch, tuple | list):
        labelled = [(f"eval_batch[{index}]", pair) for index, pair in enumerate(batch)]
    else:
        return  # a DataLoader: each batch is checked when it is measured
    for label, pair in labelled:
        try:
            check_batch(pair)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{label}: {err}") from err


def _check_batch(batch: object, name: str) -> None:
    """Accept what :func:`hessrank.effective_rank` takes: a pair, a list of pairs, a loader."""
    if not is_batch_stream(batch):
        if isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[1],
                                                                               torch.Tensor):
            return
    elif not isinstance(batch, tuple | list):
        return  # a DataLoader: effective_rank validates each batch
    elif batch and all(isinstance(item, tuple | list) and len(item) == 2 for item in batch):
        return
    raise TypeError(f"{name} must be a pair (inputs, targets), a list of such pairs or a "
                    f"DataLoader yielding them, got {type(batch).__name__}")


def _step_number(value: object, name: str, least: int = 0) -> int:
    """``value`` as a step number: an integer ``>= least`` (a Python or NumPy integer, or a
    one-element integer tensor, as a loop over ``np.arange`` or a trainer's counter gives).

    Raises:
        ValueError: anything else (a float, a bool, a smaller integer), naming ``name``.
    """
    try:
        number = None if isinstance(value, bool | float) else operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or number < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r} "
                         f"({type(value).__name__})")
    return number


def _method_names(methods: Sequence[str] | str, known: Sequence[str], name: str
                  ) -> tuple[str, ...]:
    """``methods`` (a single name too) as a tuple, each of ``known`` and named once.

    Raises:
        ValueError: none, an unknown one or one named twice.
    """
    chosen = (methods,) if isinstance(methods, str) else tuple(methods)
    if not chosen:
        raise ValueError(f"{name} is empty: name one or more of {', '.join(known)}")
    for method in chosen:
        if method not in known:
            raise ValueError(f"{name}: {method!r} is not one of {', '.join(known)}")
    twice = sorted({method for method in chosen if chosen.count(method) > 1})
    if twice:
        raise ValueError(f"{name} names {', '.join(twice)} more than once (one record per "
                         "method and step)")
    return chosen


class Tracker:
    """Rank of the curvature on a schedule, from any training loop, to JSON lines and loggers.

    Call :meth:`step` once per training step (after your optimizer step); it measures each
    method through :func:`hessrank.effective_rank` when the schedule says so and writes one
    record per method. The run is bitwise identical with and without the tracker: a
    measurement changes no parameter, gradient, buffer, mode, hook or RNG state.

    Args:
        model: the module being trained (``model(*inputs)`` gives outputs, batch first).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, as for :func:`hessrank.effective_rank`.
        methods: estimators to measure, in order (a single name is accepted).
        every: measure at steps ``0, every, 2 * every, ...``.
        steps: measure at exactly these steps (those :meth:`step` counts; one its step numbers
            pass over, as ``step=2 * i`` does 5, is warned of, once).
        budget: share of the loop's wall time (between 0 and 1) to spend measuring, as often as
            that allows: the first step is measured (to learn the cost) unless :meth:`measure`
            already has, and later ones when the time spent so far plus the last measurement's
            cost stays within ``budget`` of the elapsed time, and the time since the last one
            is at least its cost times ``(1 - budget) / budget`` (spread out, not in bursts
            after a slow first measurement). ``overhead`` reports the share
            spent; in a loop shorter than a few measurements, the first one alone can exceed
            the budget.
        eval_batch: a fixed ``(inputs, targets)`` measured every time, so measurements are
            comparable across steps (the tracker keeps a copy of its tensors, which later
            in-place changes to yours leave alone), or a fixed data set (a ``DataLoader`` or
            list of batches, see :func:`hessrank.effective_rank`, read as it is at each
            measurement); without it each measurement uses the batch given to :meth:`step`.
        log: JSON-lines file (None for none); by default ``curvature.jsonl`` in the working
            folder, or the first ``curvature-<k>.jsonl`` that does not exist yet
            (:attr:`log_path` says which), created now so that no other tracker takes it, and
            removed at :meth:`close` if it got no record. A file given here is replaced at the
            first record, with a warning where it holds records; one that another open tracker
            logs to is taken over, with a warning (that tracker's next record raises). Its
            folder is created, and removed at :meth:`close` (where empty) if it got no record;
            a folder (``"runs/"``) is refused: name a file in it.
        append: add to an existing ``log`` (a resumed run) instead of replacing it; give
            :meth:`step` the step the run resumes from (without ``step=``, step numbers go on
            from the largest the log holds, with a warning), and a last line that a crash cut
            mid-write is dropped, with a warning. The first step :meth:`step` counts is where
            training resumed: the log's records of the tracker's methods from that step on,
            taken on the trajectory the run abandoned, move to ``<log>.superseded.jsonl``,
            with a warning (a :meth:`measure` at an earlier step moves its method's from there
            on), and so do the records of a :meth:`measure` before it at that step or later
            (one without ``step=`` records the log's largest step): each method's step is in
            the log once; other methods' records stay. A log whose last record of a method
            was measured with another ``threshold`` or another number of parameters
            (``num_params``: another ``params=``, a layer frozen or unfrozen) is refused,
            before any measurement: the two runs would read as one trajectory. (Another
            selection of the same size is not told apart: records do not name parameters.)
        tensorboard: a TensorBoard run folder to also write scalars to (needs ``tensorboard``).
        sinks: further destinations, objects with ``write(record)`` and ``close()``; every
            sink gets each record even where another fails, whose error is then raised.
        per_layer: also record each parameterised module's ranks (``record["layers"]``).
        on_error: ``"raise"`` (default) re-raises a method's error; ``"warn"`` writes it as the
            record's ``error``, warns (``RuntimeWarning``) and goes on; ``"record"`` the same
            without the warning, for callers that report ``Measurement.error`` themselves.
        method_options: per-method keyword arguments of :func:`hessrank.effective_rank`,
            e.g. ``{"lanczos": {"lanczos_steps": 40}}``, for methods among ``methods``; an
            estimator option the method does not take is refused (given in ``**options``, it
            goes to the methods that take it).
        clock: the wall clock of the ``budget`` schedule (seconds); replace it to simulate time.
        **options: keyword arguments of :func:`hessrank.effective_rank` for every method
            (``threshold``, ``rtol``, ``params``, ``max_memory``, ``seed``, ...); ``progress``
            is ``False`` unless given (no bar amid the training loop's own output).

    Attributes:
        records: every record written so far, in order (also kept in memory).
        sinks: the destinations records go to (``log`` last).
        log_path: the JSON-lines file written, or None.

    Raises:
        ValueError: an unknown method, a schedule that is not exactly one of ``every``,
            ``steps`` and ``budget`` (or none, for :meth:`measure` only), values out of range,
            an option value or ``eval_batch`` that :func:`hessrank.effective_rank` would
            refuse (checked by its own rules, before any work), ``method_options`` for a
            method not among ``methods`` or with an estimator option that method does not
            take, ``append`` to a log of another configuration, or ``budget`` with a
            ``process_group`` (its processes' clocks would schedule them apart).
        TypeError: an option :func:`hessrank.effective_rank` does not take, an ``eval_batch``
            that is not a pair, ``steps`` that is not a list, or a sink without ``write`` or
            ``close``.
        ImportError: ``tensorboard`` is given and the tensorboard package is not installed.
        OSError: the ``log`` file cannot be written (``IsADirectoryError``: it names a
            folder).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        methods: Sequence[str] | str = ("fisher",),
        *,
        every: int | None = None,
        steps: Iterable[int] | None = None,
        budget: float | None = None,
        eval_batch: Any = None,
        log: str | Path | None = DEFAULT_LOG,
        append: bool = False,
        tensorboard: str | Path | None = None,
        sinks: Sequence[Sink] = (),
        per_layer: bool = False,
        on_error: str = "raise",
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.methods = _method_names(methods, ALL_METHODS, "methods")
        given = [name for name, value in (("every", every), ("steps", steps), ("budget", budget))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(f"give one schedule, not {' and '.join(given)}")
        self.every = None if every is None else _step_number(every, "every", least=1)
        if steps is not None and (not isinstance(steps, Iterable) or isinstance(steps, str)):
            raise TypeError(f"steps is a list of step numbers (steps=[{steps!r}] for one), got "
                            f"{type(steps).__name__}")
        listed = None if steps is None else list(steps)
        if listed == []:
            raise ValueError("steps is empty, so the tracker would never measure: name the steps "
                             "(steps=[0, 100, 1000]), or use every= or budget=")
        self._steps = None if listed is None else frozenset(
            _step_number(value, f"steps[{index}]") for index, value in enumerate(listed))
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real)
                                   or not 0.0 < budget < 1.0):
            raise ValueError(f"budget is a share of wall time in (0, 1), got {budget!r}")
        if budget is not None and any(chosen.get("process_group") is not None for chosen in
                                      (options, *(method_options or {}).values())):
            # (each process's clock decided alone: one measured while another trained, and a
            # DDP job aborted in gloo; probe 218)
            raise ValueError(
                "budget= schedules the measurements by this process's own clock, which the "
                "processes of process_group do not share: they would measure at different "
                "steps, and their collectives would not meet; pass every= or steps=, the same "
                "in every process")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if eval_batch is not None:
            _check_eval_batch(eval_batch)
        for index, sink in enumerate(sinks):
            lacking = [name for name in ("write", "close")
                       if not callable(getattr(sink, name, None))]
            if lacking:  # found at the first record, after a measurement (probe 124)
                raise TypeError(f"sinks[{index}] ({type(sink).__name__}) has no "
                                f"{' or '.join(f'{name}()' for name in lacking)}: a sink is an "
                                "object with write(record) and close() (hessrank.tracker.Sink)")
        _check_options(options, "Tracker options", self.methods)
        # a selection given as an iterator (model[0].parameters()) is read once, here: every
        # measurement had read it again, the second finding it empty
        options = _listed_params(options, model)
        self._method_options = {m: _listed_params(dict(o), model)
                                for m, o in (method_options or {}).items()}
        for method, extra in self._method_options.items():
            if method not in self.methods:
                raise ValueError(f"method_options names {method!r}, not one of the methods "
                                 f"({', '.join(self.methods)}), so its options would be "
                                 "ignored: add it to methods, or drop its options")
            _check_options(extra, f"method_options[{method!r}]", [method])
        self.options = options
        refusals: dict[str, TypeError | ValueError] = {}
        for method in self.methods:
            try:
                _check_values(loss_fn, method, per_layer, self._options_for(method))
                chosen = self._options_for(method).get("params")
                if isinstance(chosen, Sequence):  # names checked now, not at the first record
                    # (of the module analysed: a compiled model's names without _orig_mod.)
                    named_selection(unwrap_model(model)[0], chosen)
            except (TypeError, ValueError) as error:
                refusals[method] = error
        if refusals:
            # a value another of the methods takes belongs in method_options; one none takes
            # is simply wrong
            method, first = next(iter(refusals.items()))
            hint = METHOD_OPTIONS_HINT if len(refusals) < len(self.methods) else ""
            raise type(first)(f"{method}: {first}{hint}") from first
        self.model, self.loss_fn = model, loss_fn
        self.budget, self.per_layer, self.on_error = budget, per_layer, on_error
        # its own copy of a pair: data a training loop modifies in place (a task switch that
        # permutes the inputs) had changed the "fixed" batch between measurements (probe 137)
        self.eval_batch = (eval_batch if eval_batch is None or is_batch_stream(eval_batch)
                           else _own_copy(tuple(eval_batch)))
        self.records: list[dict[str, Any]] = []
        self._clock = clock
        self._next_step = 0
        self._last_step: int | None = None  # the last step counted by step()
        #: the first step step() was given, where a log appended to resumes
        self._resume_from: int | None = None
        self._warned_passed = False  # of scheduled steps that step() passed over
        #: the parameters' versions (their in-place updates) at the last step() with step=
        self._last_versions: _Reading | None = None
        #: the methods due at the last counted step that have no record of it yet (its
        #: measurement cut short: retried by a step() of it with no update since)
        self._unfinished: list[str] = []
        self._unfinished_versions: _Reading | None = None
        self._counted = 0  # step() calls so far (updates of the model, as far as we know)
        #: method -> the step of its last record and the step() calls before it
        self._recorded: dict[str, tuple[int, int]] = {}
        #: method -> (num_params, num_samples, rtol) of its last result
        self._sizes: dict[str, tuple[int, int, float]] = {}
        self._warned_samples = False
        self._start: float | None = None
        self._spent = 0.0
        self._last_cost: float | None = None
        self._last_end = 0.0  # when the last measurement ended (the clock's reading)
        self._closed = False
        #: where the log's configuration is asked again, of the records before the resumed
        #: step, once it is known (:func:`_refuse_other_configuration`)
        self._configuration_pending = False
        self._append = append
        if log is not None and append:  # before any sink is made (a writer left open)
            self._configuration_pending = _refuse_other_configuration(
                Path(log), self.methods, self._configuration)
        self.sinks: list[Sink] = list(sinks)
        if tensorboard is not None:
            self.sinks.append(TensorBoardSink(tensorboard))
        self.log_path: Path | None = None
        if log is not None:
            sink = (_default_log_sink() if log is DEFAULT_LOG and not append
                    else JsonLinesSink(log, append=append))
            self.sinks.append(sink)
            self.log_path = sink.path
            self._next_step = sink.next_step

    @property
    def overhead(self) -> float:
        """Share of the wall time since the first :meth:`step` or :meth:`measure` spent
        measuring (0 before)."""
        if self._start is None:
            return 0.0
        elapsed = self._clock() - self._start
        return self._spent / elapsed if elapsed > 0 else 0.0

    def due(self, step: int) -> bool:
        """Whether the schedule measures at ``step`` now.

        Args:
            step: the step number.

        Returns:
            True when ``step`` is on the schedule (``budget``: when measuring now keeps within
            it).

        Raises:
            ValueError: the tracker has no schedule (``every``, ``steps`` or ``budget``).
        """
        if self.every is not None:
            return step % self.every == 0
        if self._steps is not None:
            return step in self._steps
        if self.budget is not None:
            if self._last_cost is None or self._start is None:
                return True
            now = self._clock()
            within = (self._spent + self._last_cost
                      <= self.budget * (now - self._start + self._last_cost))
            # Spread out: after a measurement of cost c, c (1 - budget) / budget of training
            # first. Without it the time a long measurement (the first, warming up) left
            # unspent went in a burst: 117 measurements in a row after 2,328 steps of none.
            spaced = ((now - self._last_end) * self.budget
                      >= self._last_cost * (1 - self.budget))
            return within and spaced
        raise ValueError("this tracker has no schedule: pass every=, steps= or budget=, "
                         "or call measure() yourself")

    def step(self, batch: Any = None, *, step: int | None = None) -> list[Measurement]:
        """Count one training step and measure if it is due.

        Args:
            batch: this step's ``(inputs, targets)``, measured when due; not needed with an
                ``eval_batch`` (which is measured instead).
            step: the step's number (e.g. a global step: an ``int``, a NumPy integer or a
                one-element integer tensor); default: one more than the last (on a log
                appended to, one more than its last record's, with a warning: pass it there).
                A call with the last call's ``step`` and no parameter updated since (the
                micro-batches of gradient accumulation) is that step again: not counted, not
                measured.

        Returns:
            The measurements taken (one per method), or ``[]`` when not due.

        Raises:
            ValueError: the tracker is closed or has no schedule, or ``step`` is not an integer
                >= 0.
            TypeError: no batch is given and there is no ``eval_batch``.
            Exception: whatever a method raised, with ``on_error="raise"``.
        """
        if self._closed:
            raise ValueError("this tracker is closed")
        index = self._next_step if step is None else _step_number(step, "step")
        if self._configuration_pending:
            self._ask_configuration_again(
                index if self._resume_from is None else min(index, self._resume_from))
        if self._resume_from is None:  # (a first step interrupted before it counted: the
            self._resume_from = index  # next one resumed there, past the records of this one)
        if self.eval_batch is None:
            if batch is None:
                raise TypeError("step() needs the batch, or create the Tracker with eval_batch=")
            _check_batch(batch, "batch")
        versions = None if step is None else _versions(self.model)
        if self._unfinished and step in (None, self._last_step) and _same_versions(
                self._unfinished_versions,
                _versions(self.model) if versions is None else versions):
            # the last counted step again, its measurement cut short (an error raised, a
            # Ctrl-C) and no update since: the loop retries it. Its methods not recorded are
            # measured at it (a retry had been taken for a micro-batch and measured nothing,
            # or, without step=, counted as the next step, every later record one step off;
            # probe 195)
            return self.measure(None if self.eval_batch is not None else batch,
                                step=self._last_step, methods=list(self._unfinished))
        if (step is not None and index == self._last_step
                and _same_versions(self._last_versions, versions)):
            # another micro-batch of the step counted last (gradient accumulation): no update
            # since, so neither a step to count nor a model to measure again (each had been
            # measured once per micro-batch, warned of as two models at one step; probe 137).
            # A parameter updated since makes it a training step, warned of when measured
            # (a step= per epoch, given at every batch, had been dropped silently; probe 139)
            return []
        self._last_versions = versions
        self._unfinished = []  # (a step counted: the last one's retry is past)
        if self._counted == 0 and step is None:
            # the log holds the measured steps only: one after its last is where training
            # resumed only if the run stopped right after that measurement (resumed from step
            # 75 of a log that reached 90, the record labelled 100 was the model at step 84;
            # probe 137)
            self._warn_resumed_log(
                f"step() without step= on a resumed log counts on from step {index}, one after "
                "the log's last record", "tracker.step(batch, step=global_step)")
        if self._counted == 0:  # where training resumed, for a log appended to
            resumed = min(index, self._resume_from)
            for sink in self.sinks:
                if isinstance(sink, TensorBoardSink) and self._append:
                    sink.resume(resumed)
                if isinstance(sink, JsonLinesSink):
                    for method in sink.resume(resumed, self.methods):
                        # a measure() before the loop at this step or later has left the log
                        # (the sink warned): the steps that follow do not go back from it
                        if self._recorded.get(method, (-1, 0))[0] >= resumed:
                            del self._recorded[method]
        elif not self._warned_passed and (self._steps is not None or self.every is not None):
            last = self._last_step or 0
            # (step=2 * i over steps=[5, 15] had measured nothing, silently; over every=5, every
            # other multiple; probe 160)
            every = self.every or 1  # (with steps= unset, every= is set)
            passed: Sequence[int] = (
                sorted(s for s in self._steps if last < s < index) if self._steps is not None
                else range((last // every + 1) * every, index, every))
            if passed:
                self._warned_passed = True
                remedy = ("name steps your loop counts, or use every=" if self._steps is not None
                          else f"use an every= that is a multiple of the steps' stride "
                          f"({index - last})")
                more = " ..." if len(passed) > 5 else ""
                warnings.warn(
                    f"hessrank.Tracker: step {index} follows step {self._last_step}, passing "
                    f"over the scheduled step(s) {list(passed[:5])}{more}, which are not "
                    "measured: a scheduled step is measured when step() counts it; "
                    f"{remedy} (said once)", RuntimeWarning, stacklevel=_user_stacklevel())
        self._next_step, self._last_step = index + 1, index
        self._counted += 1
        if self._start is None:
            self._start = self._clock()
        if not self.due(index):
            return []
        self._unfinished = list(self.methods)  # each leaves it once its record is written
        self._unfinished_versions = _versions(self.model) if versions is None else versions
        return self.measure(None if self.eval_batch is not None else batch, step=index)

    def measure(
        self, batch: Any = None, *, step: int | None = None, methods: Sequence[str] | None = None
    ) -> list[Measurement]:
        """Measure now, whatever the schedule, and write the records to every sink.

        Args:
            batch: ``(inputs, targets)`` to measure; default the ``eval_batch``.
            step: the step to record (an integer >= 0); default the last step counted by
                :meth:`step`, and before any the step whose model it is, one before the first
                :meth:`step` will count: -1 for the model before any update (the first
                ``step()`` counts 0, the model after one update), or the largest step of a log
                appended to.
            methods: a subset of the tracker's methods (a single name is accepted); default
                all of them.

        Returns:
            One :class:`Measurement` per method, in order.

        Raises:
            ValueError: the tracker is closed, a method is not one of the tracker's or named
                twice, or ``step`` is not an integer >= 0.
            TypeError: no batch and no ``eval_batch``.
            Exception: whatever a method raised, with ``on_error="raise"``.
        """
        if self._closed:
            raise ValueError("this tracker is closed")
        if self.eval_batch is not None and batch is None:
            batch = self.eval_batch
        if batch is None:
            raise TypeError("measure() needs a batch, or create the Tracker with eval_batch=")
        _check_batch(batch, "batch")
        chosen = (self.methods if methods is None
                  else _method_names(methods, self.methods, "measure(methods=)"))
        if step is not None:
            index = _step_number(step, "step")
        else:
            index = self._next_step - 1 if self._last_step is None else self._last_step
            if self._last_step is None:  # (a baseline from a checkpoint at step 24 had been
                # recorded as the log's last, 20, moving that step's own record aside; probe 160)
                self._warn_resumed_log(
                    f"measure() without step= before any step() on a resumed log records at "
                    f"step {index}, the log's last record's, redoing it", "tracker.measure("
                    "step=global_step)")
        if self._configuration_pending:  # (the records up to the measured step)
            self._ask_configuration_again(index + 1)
        if isinstance(batch, list):  # a DataLoader's batch, [inputs, targets]
            batch = tuple(batch)
        start = self._clock()
        if self._start is None:  # the wall time the overhead is a share of starts here
            self._start = start
        try:
            # every method measured and recorded before a sink's failure is raised (one logger
            # that failed had left the step's other methods unmeasured, without a word; probe
            # 216)
            measurements: list[Measurement] = []
            failure: BaseException | None = None
            for method in chosen:
                try:
                    measurement, failed = self._measure_one(method, batch, index)
                except BaseException as error:
                    if failure is not None and hasattr(error, "add_note"):  # (said, not
                        # dropped; probe 217)
                        error.add_note(f"hessrank.Tracker: a sink had failed to write an "
                                       f"earlier record of this step: {failure!r}")
                    raise
                measurements.append(measurement)
                failure = failure or failed
            if failure is not None:
                raise failure
            return measurements
        finally:
            self._last_end = self._clock()
            self._last_cost = self._last_end - start
            self._spent += self._last_cost

    def _warn_resumed_log(self, what: str, remedy: str) -> None:
        """Warn that ``what`` takes the step of a log appended to from its last record, with
        ``remedy``: nothing says where the checkpoint resumed (said where no log is resumed:
        nothing)."""
        if any(isinstance(sink, JsonLinesSink) and sink.append and sink.next_step > 0
               for sink in self.sinks):
            warnings.warn(
                f"hessrank.Tracker: {what}, which is the model's step only if the run stopped "
                f"right after that measurement: pass the step your checkpoint resumes from, "
                f"{remedy}, or records will carry other steps than their models'",
                RuntimeWarning, stacklevel=_user_stacklevel())

    def _ask_configuration_again(self, before: int) -> None:
        """The log's configuration asked again of its records before ``before``, the step the
        run resumes from (:func:`_refuse_other_configuration`), once, before any
        measurement."""
        if self.log_path is not None:
            _refuse_other_configuration(self.log_path, self.methods, self._configuration,
                                        before=before)
        self._configuration_pending = False

    def _configuration(self, method: str) -> dict[str, object]:
        """What ``method``'s records will say of the configuration (:data:`_CONFIGURATION`)."""
        options = self._options_for(method)
        rtol = options.get("rtol")
        return {"num_params": selected_size(unwrap_model(self.model)[0], options.get("params")),
                "threshold": float(options.get("threshold", _DEFAULT_THRESHOLD)),
                "rtol": None if rtol is None else float(rtol)}

    def _options_for(self, method: str) -> dict[str, Any]:
        """The keyword arguments of :func:`hessrank.effective_rank` for ``method``: the
        tracker's options, then the method's own."""
        return {**self.options, **self._method_options.get(method, {})}

    def _measure_one(self, method: str, batch: tuple[Any, Any], step: int
                     ) -> tuple[Measurement, BaseException | None]:
        """``method``'s measurement, recorded, and the first error of a sink that failed to
        write it (None: none)."""
        handled = handled_now()  # the caller's, not the call's (probes 181, 182)
        try:
            result = hessrank.effective_rank(
                self.model, self.loss_fn, batch, method=method, per_layer=self.per_layer,
                **{"progress": False, **self._options_for(method)},
            )
        except Exception as err:
            # a signal handler's exception (a job's timeout) is the caller's, not the method's
            # failure to record (probe 134: on_error="warn" had trained on past the timeout)
            if self.on_error == "raise" or signalled(err, handled) is not None:
                raise
            measurement = Measurement(step, method, error=err)
            if self.on_error == "warn":
                warnings.warn(f"hessrank.Tracker: {method} failed at step {step}: "
                              f"{measurement.record['error']}", RuntimeWarning,
                              stacklevel=_user_stacklevel())
        else:
            measurement = Measurement(step, method, result=result)
            self._warn_of_other_sizes(method, result, step)
        # a step again is another measurement of its model, unless step() counted an update since
        previous, counted = self._recorded.get(method, (-2, self._counted))
        trained = self._counted - counted  # step() calls between the two records
        if step < previous or (step == previous and trained):
            # what happened, no more: two measure() calls that go back had been said to have
            # "a training step" between them (probe 115)
            between = ("a training step" if trained == 1 else f"{trained} training steps")
            if not trained:
                what = ("with no training step between: one model at two steps, and the log's "
                        "steps go back")
            elif step == previous:
                what = (f"and {between}: two models at one step, which plots and readers take "
                        "for one")
            else:
                what = (f"and {between}: the log's steps go back, so plots and readers put a "
                        "later model before an earlier one")
            warnings.warn(f"hessrank.Tracker: {method} recorded at step {step} after step "
                          f"{previous} {what}; count steps with step() or give increasing step= "
                          "values", RuntimeWarning, stacklevel=_user_stacklevel())
        # in the records and in hessrank's sinks, or in none: a Ctrl-C between the two had
        # left a record the loop went on from out of the log (probe 153). The caller's own
        # sinks are written after, with Ctrl-C and signals let through: held back, a network
        # logger that stalled had held a Ctrl-C and a preemption handler for as long (probe
        # 195)
        def write(sink: Sink) -> None:
            sink.write(measurement.record)

        own = [sink for sink in self.sinks if isinstance(sink, (JsonLinesSink, TensorBoardSink))]
        with deferred_interrupts():
            self._recorded[method] = (step, self._counted)
            if step == self._last_step and method in self._unfinished:
                self._unfinished.remove(method)
            self.records.append(measurement.record)
            failed = _sink_failure(own, write)
        theirs = _sink_failure([sink for sink in self.sinks if sink not in own], write)
        return measurement, failed or theirs

    def _warn_of_other_sizes(self, method: str, result: RankResult, step: int) -> None:
        """Warn where ``method`` measured another number of parameters than at its last record
        (a layer frozen or unfrozen, added or removed: a model that grew had been told of
        "another params=", which a tracker keeps; probe 243) or, once, another number of
        samples (a step's batch of another size): a plot had joined them into one line, whose
        jump was the configuration's, not the curvature's (probe 137); or, on as many of both,
        counted its numerical rank at another ``rtol`` (a model cast to float64 mid-run: the
        default, the matrix's size times the dtype's epsilon, fell from 5.4e-5 to 1e-13, and
        the rank jumped from 343 to 385 without a word; probe 243)."""
        sizes = (result.num_params, result.num_samples, float(result.rtol))
        last = self._sizes.get(method)
        self._sizes[method] = sizes
        if last is None or last == sizes:
            return
        if last[0] != sizes[0]:
            warnings.warn(
                f"hessrank.Tracker: {method} measured {sizes[0]:,} parameters at step {step}, "
                f"{last[0]:,} at its last record (a layer frozen or unfrozen, added or removed, "
                "or reset to another size): its ranks jump with them, not with the curvature "
                "(hessrank plot breaks the line there)", RuntimeWarning,
                stacklevel=_user_stacklevel())
        elif last[1] != sizes[1]:
            if not self._warned_samples:
                self._warned_samples = True
                warnings.warn(
                    f"hessrank.Tracker: {method} measured {sizes[1]} samples at step {step}, "
                    f"{last[1]} at its last record: ranks bounded by the samples (fisher's by "
                    "n) and every estimate move with the batch, not with the curvature alone "
                    "(hessrank plot draws those points hollow); eval_batch= measures the same "
                    "samples every time (said once)", RuntimeWarning,
                    stacklevel=_user_stacklevel())
        else:
            warnings.warn(
                f"hessrank.Tracker: {method} counted its numerical rank at rtol {sizes[2]:.3g} "
                f"at step {step}, {last[2]:.3g} at its last record, on as many parameters and "
                "samples (the default rtol is the matrix's size times its dtype's epsilon: a "
                "model cast to another dtype moves it): its numerical rank jumps with it, not "
                "with the curvature (hessrank plot breaks that line there); rtol= counts at "
                "one tolerance throughout", RuntimeWarning, stacklevel=_user_stacklevel())

    def close(self) -> None:
        """Close every sink (idempotent); the tracker measures no more."""
        if self._closed:
            return
        self._closed = True
        _every_sink(self.sinks, lambda sink: sink.close())

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lightning_callback(self) -> Any:
        """A PyTorch Lightning ``Callback`` driving this tracker (``pip install
        'hessrank[lightning]'``).

        After each training batch it calls ``step(batch, step=trainer.global_step - 1)`` (the
        number of the optimizer step just taken), sends the numbers to the trainer's loggers,
        and closes the tracker at the end of ``fit``. Create the tracker on the
        ``LightningModule`` (its ``forward`` gives the outputs ``loss_fn`` takes).

        Returns:
            A ``lightning.pytorch.Callback`` for ``Trainer(callbacks=[...])``.

        Raises:
            ImportError: Lightning is not installed.
        """
        return _lightning_callback_class()(self)


def _lightning_callback_class() -> type:
    """``CurvatureCallback``, defined on first use so that hessrank does not import Lightning."""
    try:
        from lightning.pytorch import Callback
    except ImportError as err:
        raise ImportError(
            "Tracker.lightning_callback() needs Lightning: pip install 'hessrank[lightning]'"
        ) from err

    class CurvatureCallback(Callback):
        """Measures the curvature of the module being fitted on the tracker's schedule."""

        def __init__(self, tracker: Tracker) -> None:
            super().__init__()
            self.tracker = tracker
            self._last_step = -1

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            step = trainer.global_step - 1
            if step < 0 or step == self._last_step:  # no optimizer step (gradient accumulation)
                return
            self._last_step = step
            measured = self.tracker.step(batch, step=step)
            scalars: dict[str, float] = {}
            for measurement in measured:
                scalars.update(record_scalars(measurement.record))
            if scalars:
                for logger in trainer.loggers:
                    logger.log_metrics({f"hessrank/{k}": v for k, v in scalars.items()}, step)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.tracker.close()

    return CurvatureCallback
