"""The one CLI output layer: results on stdout, progress and notices on stderr, `--json` everywhere.

Every command builds one `Output` (`Output(json_mode)`) and goes through it:
- `out.run(events)` drives a long operation (selfhost.events): notices and progress bars go to stderr
  (bars only on a terminal; off a terminal one line per finished task), and it returns the Result's value.
- `out.result(value, human)` prints the command's result: JSON (one writer, `write_json`) with `--json`,
  else `human(value)`, which prints through `out.console`.
- `out.confirm(question, yes)` is the one confirmation rule: `--yes` skips it, a terminal asks, and
  without a terminal the command refuses in one line (exit 2) instead of guessing.
- `error_line(exc)` is the one error formatter (the command boundary and the chat REPL use it).
Human number, size and duration formatting lives here once: `fmt_bytes`, `fmt_count`, `fmt_duration`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from selfhost.cli.console import console, err_console, plain
from selfhost.errors import SelfhostError, UsageError
from selfhost.events import Event, Notice, Progress, run_to_end
from selfhost.units import human_bytes as fmt_bytes  # decimal units, as disks and the Hub count

# -- formatting (human output only; JSON carries raw numbers) ------------------------------------


def fmt_count(n: float, exact: bool = False) -> str:
    """12.3M, 1.5K, 999 (`exact`: also the full figure, '1.50M (1,500,000)')."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            short = f"{n / scale:.2f}{unit}" if exact else f"{n / scale:.1f}{unit}"
            return f"{short} ({int(n):,})" if exact else short
    return f"{n:.0f}"


def fmt_duration(seconds: float | None) -> str:
    """'45.2 s' under a minute, then '3m 05s', '2h 03m', '1d 4h'; '?' when unknown."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    return f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s"


# -- JSON ---------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Plain JSON data. Our own hooks first (an object's `to_json`, dataclass fields, containers, so a
    nested `to_json` is honoured); every other value (pydantic models, paths, enums, datetimes, ...) goes
    through pydantic-core's own converter."""
    from pydantic_core import to_jsonable_python

    if hasattr(value, "to_json") and callable(value.to_json) and not isinstance(value, type):
        return jsonable(value.to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return to_jsonable_python(value)


def write_json(value: Any) -> None:
    """The one JSON writer: indented, UTF-8, to stdout, never through Rich (no wrapping, no markup)."""
    sys.stdout.write(json.dumps(jsonable(value), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# -- errors -------------------------------------------------------------------------------------


def error_line(exc: BaseException) -> tuple[str, int]:
    """The one line (and exit code) a user sees for an error they can fix."""
    if isinstance(exc, SelfhostError):
        return f"error: {exc}", exc.exit_code
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "error: the disk is full (free some space and run the command again)", 1
        where = f": {exc.filename}" if exc.filename else ""
        return f"error: {exc.strerror or exc}{where}", 1
    return f"error: {exc}", 1


def print_error(exc: BaseException) -> int:
    """Print `exc` as its one line on stderr; return the exit code."""
    line, code = error_line(exc)
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    return code


def is_interactive() -> bool:
    """A person can answer a question: stdin is a terminal."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


# -- the output object --------------------------------------------------------------------------


class Output:
    """Where a command's output goes (see the module docstring)."""

    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.console = console  # results (human form)
        self.err = err_console  # notices and progress

    def notice(self, message: str, level: str = "info") -> None:
        style = "yellow" if level == "warning" else ""
        self.err.print(plain(message, style), highlight=False, soft_wrap=True)

    def result(self, value: Any, human: Callable[[Any], None] | None = None) -> None:
        """`value` as JSON with --json, else rendered by `human` (default: its str on stdout)."""
        if self.json_mode:
            write_json(value)
        elif human is not None:
            human(value)
        elif value is not None:
            self.console.print(plain(value), soft_wrap=True)

    def run(self, events: Iterable[Event], on_event: Callable[[Event], bool] | None = None) -> Any:
        """Drive a long operation (selfhost.events.run_to_end), rendering it on stderr; return its
        Result's value.

        `on_event` may render an event itself (command-specific lines); returning True skips the
        default rendering of that event.
        """
        with ProgressBars(self.err) as bars:

            def render(event: Event) -> None:
                if on_event is None or not on_event(event):
                    bars.show(event)

            return run_to_end(events, render)

    def confirm(self, question: str, yes: bool) -> None:
        """Go on only with `--yes` or a person's 'y'; raise otherwise (no terminal: exit 2, one line)."""
        if yes:
            return
        if not is_interactive():
            raise UsageError(f"{question.rstrip('?')}: refusing without a terminal", hint="pass --yes")
        import typer

        if not typer.confirm(question, default=False, err=True):
            raise typer.Exit(1)


class ProgressBars:
    """Rich progress bars keyed by task on a terminal (gone once finished); off a terminal, one line per
    finished task."""

    def __init__(self, stream_console: Any) -> None:
        self.console = stream_console
        self.live = stream_console.is_terminal
        self.bars: Any = None
        self.tasks: dict[str, Any] = {}
        self.reported: set[str] = set()

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars = None

    def show(self, event: Event) -> None:
        """Render a Notice (a line above the bars) or a Progress (its bar); a Result is the caller's."""
        if isinstance(event, Notice):
            self.print(plain(event.message, "yellow" if event.level == "warning" else ""))
        elif isinstance(event, Progress):
            self.update(event)

    def print(self, renderable: Any) -> None:
        (self.bars.console if self.bars is not None else self.console).print(
            renderable, highlight=False, soft_wrap=True
        )

    def update(self, event: Progress) -> None:
        if not self.live:
            if event.finished and event.task not in self.reported:
                self.reported.add(event.task)
                self.console.print(plain(f"{event.task}: {_amount(event.done, event.unit)} done"))
            return
        if self.bars is None:
            self.bars = _new_bars(self.console)
            self.bars.start()
        fields = {"detail": event.detail, "amount": _amounts(event), "unit": event.unit}
        if event.task not in self.tasks:
            self.tasks[event.task] = self.bars.add_task(  # from `done`: resumed bytes are no speed
                event.task, total=event.total, completed=event.done, **fields
            )
        self.bars.update(self.tasks[event.task], completed=event.done, total=event.total, **fields)
        if event.finished:  # a finished bar leaves the screen; what it produced is the caller's to say
            self.bars.remove_task(self.tasks.pop(event.task))


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        return fmt_bytes(n)
    return f"{n:g} {unit}".rstrip()


def _amounts(event: Progress) -> str:
    if event.total is None:
        return _amount(event.done, event.unit)
    if event.unit == "B":
        return f"{fmt_bytes(event.done)}/{fmt_bytes(event.total)}"
    return f"{event.done:g}/{event.total:g} {event.unit}".rstrip()


def _new_bars(stream_console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class ByteSpeed(ProgressColumn):
        """The transfer speed of byte tasks (downloads); nothing for other units."""

        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{fmt_bytes(speed)}/s" if task.fields.get("unit") == "B" and speed else "")

    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.fields[amount]}", markup=False),
        ByteSpeed(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}", markup=False),
        console=stream_console,
        transient=True,
    )
