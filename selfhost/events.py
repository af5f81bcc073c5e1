"""The one event vocabulary of long operations (pull, quantize, compare, convert, train, export).

A long operation is a generator: it yields `Notice`s (a line for the user), `Progress` of named tasks,
and ends with exactly one `Result` carrying its value. The caller decides what to render; the core
never takes callbacks. `run_to_end()` drives such a generator when nobody needs to watch it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Notice:
    """One line for the user: what is happening, or something worth knowing (`warning`)."""

    message: str
    level: Literal["info", "warning"] = "info"


@dataclass(frozen=True)
class Progress:
    """`done` of `total` `unit`s of the named `task` (total None: not known yet).

    `task` is both the key (events with the same task update one bar) and its label. `unit` "B" is
    rendered as bytes with a transfer speed. `detail` names the current item (a tensor, a file);
    `metrics` carries numbers a renderer or a log may show (loss, lr, tokens/s).
    """

    task: str
    done: float
    total: float | None = None
    unit: str = ""
    detail: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total


@dataclass(frozen=True)
class Result(Generic[T]):
    """The operation's value; always the last event."""

    value: T


Event = Notice | Progress | Result[Any]
Events = Generator[Event, None, None]


def run_to_end(events: Iterable[Event], on_event: Callable[[Event], None] | None = None) -> Any:
    """Drive `events` to the end, passing each to `on_event`; return the value of its `Result`."""
    results = []
    for event in events:
        if on_event is not None:
            on_event(event)
        if isinstance(event, Result):
            results.append(event.value)
    return _the_result(results)


def nested(events: Iterable[Event]) -> Generator[Event, None, Any]:
    """Run one long operation inside another: yield its notices and progress, return its Result's value.

    `value = yield from nested(perplexity(...))` keeps the outer operation's single Result.
    """
    results = []
    for event in events:
        if isinstance(event, Result):
            results.append(event.value)
        else:
            yield event
    return _the_result(results)


def _the_result(results: list[Any]) -> Any:
    if len(results) != 1:
        raise RuntimeError(f"a long operation must end with exactly one Result (got {len(results)})")
    return results[0]
