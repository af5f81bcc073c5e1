"""Helpers shared by the long operations that report progress as a generator of events."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def run_to_end(events: Iterable[Any], final: type, on_event: Callable[[Any], None] | None = None) -> Any:
    """Drive `events` to the end, passing each to `on_event`; return the `.result` of the `final` event."""
    result = None
    for event in events:
        if on_event is not None:
            on_event(event)
        if isinstance(event, final):
            result = event.result
    assert result is not None, f"the operation ended without a {final.__name__} event"
    return result
