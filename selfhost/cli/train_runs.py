"""`selfhost train runs list|show|compare|rm`, and the curves printed at the end of a training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from selfhost.cli.common import draw_curves
from selfhost.cli.output import Output, fmt_duration

runs_app = typer.Typer(help="Training runs: their metrics, curves and history.", no_args_is_help=True)
JSON_OPTION = typer.Option("--json", help="Print JSON instead of tables.")


def register(app: typer.Typer, train: typer.Typer) -> None:
    train.add_typer(runs_app, name="runs")


# -- formatting ---------------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    return "-" if seconds is None else fmt_duration(seconds)


def metric_text(values: dict[str, Any], with_train: bool = False) -> str:
    """`val loss 1.8234 @ step 2000` / `test 99.41% @ epoch 5`."""
    if not values:
        return "-"
    if values.get("test_accuracy") is not None:
        text = f"test {100 * values['test_accuracy']:.2f}% @ epoch {values.get('epoch', '?')}"
        if with_train and values.get("train_accuracy") is not None:
            text = f"train {100 * values['train_accuracy']:.2f}%, {text}"
        return text
    if values.get("val_loss") is not None:
        text = f"val loss {values['val_loss']:.4f} @ step {values.get('step', '?')}"
        if with_train and values.get("train_loss") is not None:
            text = f"train loss {values['train_loss']:.4f}, {text}"
        return text
    return "-"


def _steps(run: Any) -> str:
    if run.steps is None:
        return "-"
    return f"{run.steps:,}/{run.max_steps:,}" if run.max_steps else f"{run.steps:,}"


# -- commands -----------------------------------------------------------------------------------
@runs_app.command("list")
def list_command(as_json: Annotated[bool, JSON_OPTION] = False) -> None:
    """Every run under SELFHOST_HOME/runs, newest first."""
    from selfhost.train import runs

    out = Output(as_json)
    out.result(runs.list_runs(), lambda found: _print_list(out, found))


def _print_list(out: Output, found: list[Any]) -> None:
    from rich.table import Table

    if not found:
        out.console.print("no training runs yet: try `selfhost train gpt` or `train mnist`", markup=False)
        return
    table = Table()
    for column in ("run", "kind", "status", "steps", "best", "wall time", "device", "updated", "model"):
        table.add_column(column, justify="right" if column in ("steps", "wall time") else "left")
    for r in found:
        model = (r.exported or {}).get("name") or Path((r.exported or {}).get("path") or "-").name
        table.add_row(r.name, r.kind, r.status, _steps(r), metric_text(r.best), duration(r.wall_s),
                      r.device or "-", (r.updated or "-").replace("T", " ")[:16], model)  # fmt: skip
    out.console.print(table)


@runs_app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="Run name (see `selfhost train runs list`) or folder.")],
    plot: Annotated[Path | None, typer.Option("--plot", help="Also write the curves to this PNG.")] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """A run's settings, data, device, best and final metrics, wall time, model and curves."""
    from selfhost.train import runs

    out = Output(as_json)
    run_dir = runs.find_run(name)
    summary = runs.summarize(run_dir)
    if plot is not None:
        _write_curves([run_dir], plot)
    value = {**summary.to_json(), "metrics": runs.read_metrics(run_dir), "plot": plot}
    out.result(value, lambda _: _print_show(out, summary, run_dir, plot))


def _print_show(out: Output, summary: Any, run_dir: Path, plot: Path | None) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    exported = summary.exported or {}
    config = " ".join(f"{k}={v}" for k, v in summary.config.items())
    for key, value in (
        ("run", f"{summary.name} ({summary.kind}, {summary.status})"), ("folder", str(summary.path)),
        ("data", summary.data or "-"), ("device", summary.device or "-"), ("steps", _steps(summary)),
        ("wall time", duration(summary.wall_s)), ("best", metric_text(summary.best)),
        ("final", metric_text(summary.final, with_train=True)),
        ("model", " ".join(filter(None, [exported.get("name"), exported.get("path")])) or "-"),
        ("config", config or "-"), ("started", summary.created or "-"),
    ):  # fmt: skip
        table.add_row(key, value)
    out.console.print(table)
    draw_curves(out, run_dir)
    if plot is not None:
        out.console.print(f"curves: {plot}", markup=False)


@runs_app.command("compare")
def compare_command(
    names: Annotated[list[str], typer.Argument(metavar="RUN...", help="Two or more runs (names, folders).")],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG to write (default: runs/compare-<names>.png).")
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Overlay the runs' curves in one PNG and print their metrics and differing settings side by side."""
    from selfhost import paths
    from selfhost.errors import UsageError
    from selfhost.train import runs

    out = Output(as_json)
    if len(names) < 2:
        raise UsageError("name two or more runs to compare", hint="`selfhost train runs show NAME` for one")
    dirs = [runs.find_run(n) for n in names]
    summaries = [runs.summarize(d) for d in dirs]
    if plot is None:
        plot = paths.runs_dir() / ("compare-" + "-".join(s.name for s in summaries)[:120] + ".png")
    _write_curves(dirs, plot)
    keys = sorted({k for s in summaries for k in s.config})
    differing = [k for k in keys if len({json.dumps(s.config.get(k)) for s in summaries}) > 1]
    value = {"runs": summaries, "differing": differing, "plot": plot}
    out.result(value, lambda _: _print_compare(out, summaries, differing, plot))


def _print_compare(out: Output, summaries: list[Any], differing: list[str], plot: Path) -> None:
    from rich.table import Table

    table = Table()
    for column in ("run", "kind", "status", "steps", "best", "final", "wall time", "device", *differing):
        table.add_column(column)
    for s in summaries:
        table.add_row(s.name, s.kind, s.status, _steps(s), metric_text(s.best),
                      metric_text(s.final, with_train=True), duration(s.wall_s), s.device or "-",
                      *(str(s.config.get(k, "-")) for k in differing))  # fmt: skip
    out.console.print(table)
    out.console.print(f"curves: {plot}", markup=False)


@runs_app.command("rm")
def rm_command(
    name: Annotated[str, typer.Argument(help="Run name (see `selfhost train runs list`) or folder.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Delete a run folder: checkpoints, metrics, curves. Models exported from it stay in the store."""
    from selfhost.train import runs

    out = Output(as_json)
    run_dir = runs.find_run(name)
    out.confirm(f"remove run '{run_dir.name}' ({run_dir})?", yes)
    removed = runs.remove_run(run_dir)
    out.result({"removed": removed.name, "path": removed.path},
               lambda r: out.console.print(f"removed run '{r['removed']}' ({r['path']})", markup=False))


def _write_curves(dirs: list[Path], path: Path) -> Path:
    from selfhost.cli import plots
    from selfhost.train import runs

    for d in dirs:
        runs.require_rows(d)
    title = dirs[0].name if len(dirs) == 1 else "training curves"
    return plots.curves_png([(d.name, runs.curves(d)) for d in dirs], path, title=title)
