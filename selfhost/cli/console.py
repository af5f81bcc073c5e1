"""Shared Rich consoles. Rich honours NO_COLOR and non-terminal output by itself."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
