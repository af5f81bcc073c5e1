"""Shared Rich consoles. Rich honours NO_COLOR and non-terminal output by itself."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def plain(value: object, style: str = "") -> Text:
    """`value` as literal text: strings from users, files or the Hub are never parsed as Rich markup
    (a '[/]' in a chat title or a file name would otherwise crash the command)."""
    return Text(str(value), style=style)
