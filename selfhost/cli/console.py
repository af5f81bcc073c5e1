"""Shared Rich consoles. Rich honours NO_COLOR and non-terminal output by itself.

Piped or redirected output is never cut to the terminal's width: Rich would otherwise size it
from the terminal on stdin (or COLUMNS) and truncate table cells ("99.…"). Off a terminal the
consoles are PIPE_WIDTH columns wide; tables and text only take the width their content needs.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.text import Text

PIPE_WIDTH = 1000


def _width(stream: TextIO) -> int | None:
    """None (Rich's own choice) on a terminal; a width that cuts nothing otherwise."""
    try:
        return None if stream.isatty() else PIPE_WIDTH
    except (AttributeError, ValueError):  # closed or replaced stream
        return PIPE_WIDTH


console = Console(highlight=False, width=_width(sys.stdout))
err_console = Console(stderr=True, highlight=False, width=_width(sys.stderr))


def plain(value: object, style: str = "") -> Text:
    """`value` as literal text: strings from users, files or the Hub are never parsed as Rich markup
    (a '[/]' in a chat title or a file name would otherwise crash the command)."""
    return Text(str(value), style=style)
