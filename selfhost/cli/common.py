"""What several command modules share, so that command modules never import each other."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from selfhost.cli import output as output_layer
from selfhost.cli.console import plain
from selfhost.cli.output import Output, fmt_bytes

if TYPE_CHECKING:
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
