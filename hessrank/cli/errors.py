"""The one exception the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class CliError(Exception):
    """A problem the user can act on: ``str(err)`` is the message, ``code`` the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
