"""`selfhost pull NAME`: flags map onto `selfhost.models.pull.pull()`; this module only renders its events."""

from __future__ import annotations

from collections.abc import Iterable

import typer

from selfhost.cli.console import console, plain


def register(app: typer.Typer) -> None:
    @app.command("pull")
    def pull_command(
        name: str = typer.Argument(
            ...,
            help="alias[:QUANT] (see `selfhost models list --available`), owner/repo[:QUANT] or a .gguf",
        ),
        revision: str | None = typer.Option(
            None,
            "--revision",
            "-r",
            help="Branch, tag or commit on the Hub (default: the registry's, else main).",
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Show the files and sizes; write nothing."),
        offline: bool = typer.Option(
            False,
            "--offline",
            help="Never contact the Hub: use the Hugging Face cache (also HF_HUB_OFFLINE=1).",
        ),
    ) -> None:
        """Download a GGUF model from the Hugging Face Hub (resumable, sha256-verified) and register it."""
        from selfhost.models.pull import ConvertibleRepo, pull

        try:
            render(pull(name, revision=revision, dry_run=dry_run, offline=offline))
        except ConvertibleRepo as exc:
            if dry_run or not _interactive() or not typer.confirm(
                f"{exc.repo} has no GGUF files. Convert its safetensors weights to GGUF now?", default=True
            ):
                raise
            from selfhost.cli.convert import render as render_convert
            from selfhost.convert.run import ConvertOptions, convert

            render_convert(convert(exc.repo, ConvertOptions(revision=exc.revision)))


def _interactive() -> bool:
    import sys

    return sys.stdin.isatty() and sys.stdout.isatty()


def render(events: Iterable[object]) -> None:
    """Print Resolved/Notice/Retrying lines, one Rich progress bar per file, and the result."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.table import Table

    from selfhost.atomic import human_bytes
    from selfhost.models import pull as core

    bars: Progress | None = None
    tasks: dict[str, int] = {}
    try:
        for event in events:
            if isinstance(event, core.Resolved):
                where = (
                    f"{event.repo}@{event.commit[:10]}"
                    if event.repo and event.commit
                    else event.repo or "local"
                )
                size = human_bytes(event.size) if event.size is not None else "size unknown"
                parts = f" and {event.parts - 1} more parts" if event.parts > 1 else ""
                console.print(f"{event.name}: {event.file}{parts} ({size}) from {where}", markup=False)
            elif isinstance(event, core.Notice):
                console.print(event.message, markup=False, style="yellow")
            elif isinstance(event, core.Retrying):
                console.print(
                    f"connection lost ({event.reason}); retrying {event.file} (attempt {event.attempt})",
                    markup=False,
                    style="yellow",
                )
            elif isinstance(event, core.Progress):
                if bars is None:
                    bars = Progress(
                        TextColumn("{task.description}", markup=False),
                        BarColumn(),
                        DownloadColumn(),
                        TransferSpeedColumn(),
                        TimeRemainingColumn(),
                        console=console,
                    )
                    bars.start()
                if event.file not in tasks:
                    if event.resumed_from:
                        console.print(
                            f"resuming {event.file} from {human_bytes(event.resumed_from)} already on disk",
                            markup=False,
                        )
                    tasks[event.file] = bars.add_task(event.file, total=event.total, completed=event.done)
                bars.update(tasks[event.file], completed=event.done, total=event.total)
            elif isinstance(event, core.DryRun):
                table = Table(title=plain(f"dry run: {event.name} (nothing written)"))
                table.add_column("file")
                table.add_column("size", justify="right")
                table.add_column("status")
                for f in event.files:
                    status = (
                        "cached"
                        if f.cached
                        else (f"partial: {human_bytes(f.partial)} on disk" if f.partial else "to download")
                    )
                    table.add_row(plain(f.file), human_bytes(f.size) if f.size is not None else "?", status)
                console.print(table)
                console.print(f"to download: {human_bytes(event.to_download)}", markup=False)
            elif isinstance(event, core.Pulled):
                if bars is not None:
                    bars.stop()
                    bars = None
                r = event.record
                how = "downloaded and verified" if event.downloaded else "already on disk, verified"
                digest = (r.sha256 or "not computed")[:12]
                console.print(
                    f"{r.name}: {how} (sha256 {digest}, {human_bytes(r.size)}, source {r.source})",
                    markup=False,
                )
                console.print(f"  {r.path}", markup=False, style="dim")
    finally:
        if bars is not None:
            bars.stop()
