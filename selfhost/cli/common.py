"""What several command modules share, so that command modules never import each other."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from selfhost.cli import output as output_layer
from selfhost.cli.console import plain
from selfhost.cli.output import Output, fmt_bytes

if TYPE_CHECKING:
    from selfhost.chat.model import EngineOptions
    from selfhost.events import Event
    from selfhost.models.names import ModelName
    from selfhost.models.resolve import ResolvedModel

PULL_HELP = "Download the model first if it is not here yet (alias or owner/repo), without asking."


# -- the end of a training run ------------------------------------------------------------------
def draw_curves(out: Output, run_dir: Path) -> None:
    """The run's loss (and accuracy) curves in the terminal, on stdout."""
    from rich.text import Text

    from selfhost.cli import plots
    from selfhost.errors import DependencyError
    from selfhost.train import runs

    panels = runs.curves(run_dir)
    width = min(out.console.width, 100) if out.console.is_terminal else 80
    try:
        for name, series in panels.items():
            if max(len(s.x) for s in series) > 1:  # one epoch's accuracy is a number, not a curve
                out.console.print(Text.from_ansi(plots.terminal_curve(series, width=width, y_label=name)))
    except DependencyError as exc:
        out.console.print(f"no curves: {exc}", markup=False, style="dim")


def curves_png(run_dir: Path) -> Path | None:
    """curve.png in the run folder (None: no metrics yet, or matplotlib is not installed)."""
    from selfhost.cli import plots
    from selfhost.train import runs

    panels = runs.curves(run_dir)
    if not panels or not plots.available():
        return None
    return plots.curves_png([(run_dir.name, panels)], run_dir / runs.CURVE_FILE, title=run_dir.name)


# ------------------------------------------------ engine flags shared by `chat` and `serve`
SPEC_OPTION = typer.Option(
    "none", "--spec", help="Speculative decoding: ngram (prompt lookup, no second model) or none."
)
SPEC_DRAFT_OPTION = typer.Option(8, "--spec-draft", min=1, max=64, help="Most tokens drafted per step.")
SPEC_NGRAM_OPTION = typer.Option(
    3, "--spec-ngram", min=1, max=16, help="N-gram size looked up (--spec ngram)."
)
DRAFT_MODEL_OPTION = typer.Option(
    None, "--draft-model", help="A small model of the same vocabulary that drafts tokens (any model name)."
)
CACHE_TYPE_K_OPTION = typer.Option("f16", "--cache-type-k", help="KV cache K type: f16, q8_0 or q4_0.")
CACHE_TYPE_V_OPTION = typer.Option(
    "f16", "--cache-type-v", help="KV cache V type: f16, q8_0 or q4_0 (quantized V needs flash attention)."
)
FLASH_ATTN_OPTION = typer.Option("auto", "--flash-attn", help="Flash attention: on, off or auto.")
CACHE_DIR_OPTION = typer.Option(
    None, "--cache-dir", help="Keep the prompt cache in this directory across restarts."
)


def engine_options(
    spec: str,
    spec_draft: int,
    spec_ngram: int,
    draft_model: str | None,
    cache_type_k: str,
    cache_type_v: str,
    flash_attn: str,
    cache_ram: int,
    cache_dir: Path | None,
    pull: bool,
) -> EngineOptions:
    """The engine flags as EngineOptions; a bad value is one clear line (UsageError)."""
    from pydantic import ValidationError

    from selfhost.chat.model import EngineOptions
    from selfhost.errors import UsageError
    from selfhost.runtime.kvcache import KVSettings
    from selfhost.runtime.speculative import SpecSettings

    if spec not in ("none", "ngram"):
        raise UsageError(f"--spec {spec} is not known", hint="use --spec ngram, or --draft-model NAME")
    for flag, value, allowed in (
        ("--cache-type-k", cache_type_k, ("f16", "q8_0", "q4_0")),
        ("--cache-type-v", cache_type_v, ("f16", "q8_0", "q4_0")),
        ("--flash-attn", flash_attn, ("on", "off", "auto")),
    ):
        if value not in allowed:
            raise UsageError(f"{flag} {value} is not one of {', '.join(allowed)}")
    if draft_model is not None:
        draft_model = ensure_model(draft_model, pull)
    try:
        return EngineOptions(
            kv=KVSettings(type_k=cache_type_k, type_v=cache_type_v, flash_attn=flash_attn).check(),  # type: ignore[arg-type]
            spec=SpecSettings(mode=spec, draft_max=spec_draft, ngram=spec_ngram),  # type: ignore[arg-type]
            draft_model=draft_model,
            cache_ram_mb=cache_ram,
            cache_dir=cache_dir,
        )
    except ValidationError as exc:  # pragma: no cover - the checks above cover the flags
        raise UsageError(str(exc).splitlines()[0]) from exc


def show_notices(engine: object) -> None:
    """Print what the prompt cache had to say (a foreign or corrupt file ignored)."""
    cache = getattr(engine, "prompt_cache", None)
    if cache is None:
        return
    out = Output()
    for notice in cache.take_notices():
        out.notice(notice.message, level=notice.level)
# -- the auto-pull of chat, serve and quantize ---------------------------------------------------
def ensure_model(
    name: str | None, pull: bool, purpose: str = "chat", out: Output | None = None
) -> ResolvedModel:
    """The one place a command turns its model name into a model (resolved once, handed down to the
    loader), with the auto-pull of `chat`, `serve` and `quantize` (like `ollama run`): an alias or
    owner/repo not downloaded yet is pulled (`--pull`, or a 'y' on a terminal). Without `--pull` and
    without a terminal: one line naming the fix, and nothing is downloaded."""
    from selfhost.models.pull import pull as pull_model
    from selfhost.models.resolve import NotDownloaded, resolve_model

    try:
        return resolve_model(name, purpose=purpose)  # type: ignore[arg-type]
    except NotDownloaded as missing:
        out = out or Output()
        if not pull:
            if not output_layer.is_interactive():
                hint = f"pass --pull to download it now, or {missing.hint}"
                raise NotDownloaded(missing.name, hint=hint) from None
            out.confirm(f"{missing.name} is not downloaded{_about(missing.name)}. Pull it now?", yes=False)
        record = out.run(pull_model(str(missing.name))).record
    return resolve_model(record.name, purpose=purpose)  # type: ignore[arg-type]  # the new store entry


def _about(name: ModelName) -> str:
    """' (about 1.2 GB)' from the registry's size of an alias's quant; '' when unknown."""
    from selfhost.models.registry import load_registry

    entry = load_registry().get(name.base) if name.kind == "alias" else None
    size = entry.size_bytes(name.quant) if entry is not None else None
    return f" (about {fmt_bytes(size)})" if size else ""


# -- a conversion's progress and result (convert, and pull's offer to convert) -------------------
def render_convert(events: Iterable[Event], output: Output | None = None) -> None:
    """Download bars (Hub sources) and a bar for the tensor data written on stderr, then the result."""
    output = output or Output()
    output.result(output.run(events), human=lambda result: _print_converted(output, result))


def _print_converted(output: Output, r) -> None:  # noqa: ANN001
    output.console.print(plain(str(r.output), "bold"))
    output.console.print(plain(
        f"  converted from {r.source} by llama.cpp's converter: {r.architecture}, "
        f"{r.n_params / 1e6:.1f} M parameters, {r.quant}, {fmt_bytes(r.size)}"
    ))
    if r.name:
        output.console.print(plain(
            f"  registered as {r.name}: try `selfhost chat {r.name}` or "
            f"`selfhost quantize {r.name} --type Q4_K_M`"
        ))
