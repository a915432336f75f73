"""MkDocs hook: ``<!-- hessrank-help: COMMAND -->`` becomes that command's ``--help``."""

from __future__ import annotations

import os
import re
from typing import Any

MARKER = re.compile(r"<!-- hessrank-help: (\w+) -->")


def _help(command: str) -> str:
    from hessrank.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.choices and command in a.choices)
    text = subcommands.choices[command].format_help()
    return f"```text\n{text}```"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace every help marker of a page."""
    return MARKER.sub(lambda match: _help(match.group(1)), markdown)
