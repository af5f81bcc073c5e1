"""Per-model serve settings and keep-alive durations.

Slots, context, GPU layers and keep-alive are per-model: the server's flags give the defaults, and a
`[serve.models."NAME"]` table overrides them for one model, in `$SELFHOST_HOME/models.toml` or in the
file given to `selfhost serve --config FILE` (which may also hold server flags in its `[serve]` table):

    [serve]
    keep_alive = "10m"
    max_models = 2

    [serve.models."qwen3-8b"]
    parallel = 2
    ctx = 16384

    [serve.models."smollm2-135m"]
    parallel = 8
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfhost.errors import UsageError

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: str | float | int | None) -> float | None:
    """Seconds a model stays loaded after its last request, as Ollama reads `keep_alive`: a number of
    seconds or a duration ("5m", "1h30m", "45s"); negative: forever (returned as -1); 0: unload right
    after the reply. None stays None (the next default applies). Raises ValueError."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive is a duration, not true/false")
    if isinstance(value, int | float):
        return -1.0 if value < 0 else float(value)
    text = value.strip().lower()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return -1.0 if number < 0 else number
    if text.startswith("-"):
        return -1.0
    pieces = _DURATION_RE.findall(text)
    if not pieces or "".join(n + u for n, u in pieces) != text:
        raise ValueError(f"'{value}' is not a duration (e.g. 30s, 5m, 1h, -1, 0)")
    return sum(float(n) * _UNITS[u] for n, u in pieces)


class ModelSettings(BaseModel):
    """What may differ per model; None: the server's default."""

    model_config = ConfigDict(extra="forbid")

    parallel: int | None = Field(None, ge=1, le=64)
    ctx: int | None = Field(None, ge=16)
    gpu_layers: int | None = Field(None, ge=-1)
    keep_alive: str | float | None = None

    def merged(self, other: ModelSettings) -> ModelSettings:
        """These settings with `other`'s set fields on top."""
        return self.model_copy(update=other.model_dump(exclude_none=True))


def read_config(path: Path | None) -> tuple[dict[str, Any], dict[str, ModelSettings]]:
    """(server options from the file's [serve] table, per-model settings) of `path`, merged over the
    per-model settings of $SELFHOST_HOME/models.toml. Raises UsageError naming the bad entry."""
    from selfhost import paths

    per_model: dict[str, ModelSettings] = {}
    server: dict[str, Any] = {}
    home_file = paths.home() / "models.toml"
    for source in (home_file, path):
        if source is None or (source is home_file and not source.is_file()):
            continue
        table = _serve_table(Path(source))
        models = table.pop("models", {}) or {}
        if source is not home_file:
            server = table
        if not isinstance(models, dict):
            raise UsageError(f"{source}: [serve.models] must be a table of model names")
        for name, body in models.items():
            try:
                settings = ModelSettings.model_validate(body)
                parse_keep_alive(settings.keep_alive)
            except (ValidationError, ValueError) as exc:
                raise UsageError(f"{source}: [serve.models.\"{name}\"]: {_first_error(exc)}") from None
            per_model[name] = per_model.get(name, ModelSettings()).merged(settings)
    return server, per_model


def _serve_table(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no such config file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    table = raw.get("serve", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [serve] must be a table")
    return dict(table)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
    return str(exc)
