"""The one declaration of every `selfhost serve` setting: default, bounds, help.

`ServeOptions` (selfhost/serve/server.py) builds its pydantic fields from it and the CLI builds its
typer options from it (selfhost/cli/serve.py), so a default or a bound is written once. No pydantic
here: `selfhost --help` reads this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selfhost.runtime.defaults import DEFAULT_PREFILL_CHUNK, SLOT_QUEUE


@dataclass(frozen=True)
class Setting:
    default: Any
    help: str
    ge: int | None = None
    le: int | None = None


SERVE: dict[str, Setting] = {
    "host": Setting("127.0.0.1", "Address to listen on (0.0.0.0: every interface)."),
    "port": Setting(8000, "Port (0: any free port).", ge=0, le=65535),
    "parallel": Setting(None, "Slots per model (default: up to 4, sized by memory).", ge=1, le=64),
    "ctx": Setting(None, "Context per slot in tokens, per model (default: by memory).", ge=16),
    "gpu_layers": Setting(None, "Layers to offload, every model (default: all when the build can).", ge=-1),
    "threads": Setting(None, "CPU threads (default: all cores).", ge=1),
    "max_queue": Setting(
        None, f"Requests that may wait for a slot (default: {SLOT_QUEUE} per slot); then 503.", ge=0
    ),
    "max_body": Setting(8 * 2**20, "Largest request body in bytes.", ge=1024),
    "prefill_chunk": Setting(
        DEFAULT_PREFILL_CHUNK, "Prompt tokens read per step, so new prompts do not stall replies.", ge=16
    ),
    "keep_alive": Setting(
        "5m", "How long a model stays loaded after its last request (30s, 5m, 1h; -1: forever; 0: unload "
        "right after the reply)."
    ),
    "max_models": Setting(None, "Most models loaded at once (default: as many as free memory holds).", ge=1),
}


def field(name: str) -> Any:
    """The pydantic Field of setting `name` (called by ServeOptions)."""
    from pydantic import Field

    s = SERVE[name]
    return Field(s.default, ge=s.ge, le=s.le, description=s.help)
