"""Session set-up shared by every test module."""

from __future__ import annotations

import signal

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Give Ctrl-C its Python handler where the run started without one: a command sent to
    the background by a shell without job control (``(pytest &)``, as some CI runners do)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so the
    tests of Ctrl-C handling, and the command-line runs they start, saw none."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
