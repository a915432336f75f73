"""Run a measurement in a process of its own: ``in_fresh_process(function, *args)``.

On CPU, ``measure_memory=True`` reads the process's resident-set high-water mark, and in a full
suite that process has run a thousand tests: a call's allocations reuse memory the C allocator
kept from them (an LSTM's ``lanczos`` measured 118 MiB there, 205-220 MiB in fresh processes) or
land in a heap they fragmented (``exact`` measured 88.7 MB there, 58-72 MB fresh). Here
``function`` runs in a new Python process that has run every method once on a tiny model first,
so that neither the suite's heap nor a first call's lazy imports are measured. (A child forked
from one warm server was tried and measured more: fork leaves the code pages' page-table entries
to be faulted in again, and the call's first touch of each counted in its resident set.)

Each such process imports torch and warms up (about 4 s) before its measurement: the suite
measures its cases :func:`in_fresh_processes`, two at a time (the resident sets are each
process's own; the suite's own process waits meanwhile).

``function`` must be defined at the top level of a module importable from ``sys.path`` (it is
pickled by reference); its result must pickle.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def unruled_model() -> Any:
    """A model of one layer no rule claims (``nn.Bilinear``): the Gram methods' general path,
    ``torch.func``. (This module imports torch only in the processes it starts.)"""
    from torch import Tensor, nn

    class Unruled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bilinear = nn.Bilinear(3, 3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.bilinear(x, x)

    return Unruled()


def _warm_up() -> None:
    """Every method once on tiny models: their lazy imports and first-use code pages, those of
    the Gram methods' general path (``torch.func``, a module no rule claims: a first call there
    holds about 110 MiB once) and of their batched backward pass (``K > 1`` columns) too."""
    import torch
    from torch import nn

    import hessrank

    torch.manual_seed(0)
    batch = torch.randn(6, 3), torch.randint(0, 3, (6,))
    ruled = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    for method in hessrank.ESTIMATORS:
        options = {"lanczos_steps": 4} if "lanczos" in method else {}
        hessrank.effective_rank(ruled, nn.CrossEntropyLoss(), batch, method,
                                measure_memory=True, **options)
    for method in ("fisher", "ggn"):
        hessrank.effective_rank(unruled_model(), nn.CrossEntropyLoss(), batch, method,
                                measure_memory=True)


def _serve() -> None:
    """The child: the pickled ``(function, args)`` on stdin, ``(ok, result or traceback)``
    back on stdout."""
    function, args = pickle.load(sys.stdin.buffer)
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # what the measured code prints must not enter the reply
    _warm_up()
    try:
        reply = True, function(*args)
    except BaseException:  # noqa: BLE001 - reported to the test, which raises it
        reply = False, traceback.format_exc()
    pickle.dump(reply, replies)
    replies.flush()


def in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a new Python process.

    Returns:
        Its result.

    Raises:
        AssertionError: holding the traceback of a call that raised, or the error output of a
            process that ended without a reply.
    """
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], input=pickle.dumps((function, args)),
        capture_output=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if done.returncode != 0 or not done.stdout:
        raise AssertionError(f"the fresh process ended without a reply (status "
                             f"{done.returncode}):\n{done.stderr.decode(errors='replace')}")
    ok, result = pickle.loads(done.stdout)
    if not ok:
        raise AssertionError(f"in the fresh process:\n{result}")
    return result


def in_fresh_processes(calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
                       at_once: int = 2) -> list[Any]:
    """``[function(*args) for function, args in calls]``, each in a new Python process
    (:func:`in_fresh_process`), ``at_once`` of them running at a time."""
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return list(pool.map(lambda call: in_fresh_process(call[0], *call[1]), calls))


if __name__ == "__main__":
    _serve()
