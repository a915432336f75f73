"""The one exception the CLI turns into a one-line message and a non-zero exit, and the
library's messages in the command line's words."""

from __future__ import annotations

import re


class CliError(Exception):
    """A problem the user can act on: ``str(err)`` is the message, ``code`` the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


#: ``hessrank.effective_rank``'s keywords besides the estimator options whose flag takes the
#: same value (not ``max_memory``: bytes there, GiB on the command line).
_SAME_VALUE = ("threshold", "rtol")


def in_flags(message: str) -> str:
    """``message``, the library's, in the command line's words: each keyword argument that a
    flag of the same value sets, ``backend='auto'`` or ``lanczos_steps=1``, as that flag,
    ``--backend auto``, ``--lanczos-steps 1`` (``name=None``: ``no --name``). The CLI had
    told its user to "use backend='auto'" (probe 243).

    Args:
        message: a message of the library (an error a method raised, an option it refused).

    Returns:
        The message with those keyword arguments as flags.
    """
    import hessrank

    names = "|".join([*hessrank.estimator_options(), *_SAME_VALUE])
    keyword = re.compile(rf"(?<![\w.])({names})=('[^']*'|\"[^\"]*\"|[\w.+-]*\w)")

    def flag(match: re.Match[str]) -> str:
        option, value = "--" + match[1].replace("_", "-"), match[2].strip("'\"")
        return f"no {option}" if value == "None" else f"{option} {value}"

    return keyword.sub(flag, message)
