"""What several command modules share, so that command modules never import each other."""

from __future__ import annotations

from pathlib import Path

from selfhost.cli.output import Output


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
