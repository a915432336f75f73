"""Run measurements in processes of their own: ``in_fresh_processes([(function, args), ...])``.

On CPU, ``measure_memory=True`` reads the process's resident-set high-water mark, and in a full
suite that process has run a thousand tests: a call's allocations reuse memory the C allocator
kept from them (an LSTM's ``lanczos`` measured 118 MiB there, 205-220 MiB in fresh processes) or
land in a heap they fragmented (``exact`` measured 88.7 MB there, 58-72 MB fresh). Here each
``function`` runs in a process of its own that has run every method once on a tiny model first,
so that neither the suite's heap nor a first call's lazy imports are measured.

One server process imports torch and runs that warm-up (about 4 s), then forks a child per
measurement, one at a time. A forked child maps the server's code pages again as it touches them
(the kernel copies no page-table entries of file mappings), and those first touches would count
in its resident set (a child measuring straight away measured more than a fresh process): so
each child runs the tiny warm-up once more (about 0.1 s) before it measures. The server warms up
on one thread and the child restores the thread count: a child forked after OpenMP has started
its threads hangs at its first parallel region. One child runs at a time: two at once, each on
two threads, took 68 s for the suite's 29 measurements against 30 s one by one (OpenMP's waiting
threads spin). (Each measurement in a process started anew, as before, cost about 4.5 s, 125 s
in all; the peaks the two ways measure agree within their run-to-run spread, about 10 %.)

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


def _measure(function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """``(True, function(*args))``, or ``(False, its traceback)``."""
    try:
        return True, function(*args)
    except BaseException:  # noqa: BLE001 - reported to the test, which raises it
        return False, traceback.format_exc()


def _serve() -> None:
    """The server: the pickled calls on stdin, each call's ``(ok, result or traceback)`` back
    on stdout, in order."""
    import torch

    calls = pickle.load(sys.stdin.buffer)
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # what the measured code prints must not enter the reply
    threads = torch.get_num_threads()
    if not hasattr(os, "fork"):  # (no resident-set peaks to measure there either)
        _warm_up()
        pickle.dump([_measure(function, args) for function, args in calls], replies)
        return
    torch.set_num_threads(1)
    _warm_up()
    results = []
    for function, args in calls:
        reading, writing = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(reading)
            torch.set_num_threads(threads)
            _warm_up()
            with os.fdopen(writing, "wb") as reply:
                pickle.dump(_measure(function, args), reply)
            os._exit(0)
        os.close(writing)
        with os.fdopen(reading, "rb") as reply:
            data = reply.read()
        _, status = os.waitpid(child, 0)
        results.append(pickle.loads(data) if data else
                       (False, f"the forked child ended without a reply (status {status})"))
    pickle.dump(results, replies)
    replies.flush()


def in_fresh_processes(calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]
                       ) -> list[Any]:
    """``[function(*args) for function, args in calls]``, each in a process of its own forked
    from one warmed-up server, one after the other.

    Returns:
        Their results, in order.

    Raises:
        AssertionError: holding the traceback of a call that raised, or the error output of a
            server that ended without a reply.
    """
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], input=pickle.dumps(list(calls)),
        capture_output=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if done.returncode != 0 or not done.stdout:
        raise AssertionError(f"the measuring server ended without a reply (status "
                             f"{done.returncode}):\n{done.stderr.decode(errors='replace')}")
    results = []
    for ok, result in pickle.loads(done.stdout):
        if not ok:
            raise AssertionError(f"in the fresh process:\n{result}")
        results.append(result)
    return results


if __name__ == "__main__":
    _serve()
