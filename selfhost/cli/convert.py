"""`selfhost convert SOURCE`: flags map onto `selfhost.convert.run.convert()`; this module renders events."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer

from selfhost.cli.console import console, err_console


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


def convert(
    source: Annotated[str, typer.Argument(help="A Hugging Face model folder, or owner/repo on the Hub.")],
    outtype: Annotated[
        str, typer.Option("--outtype", help="f16, bf16, q8_0, or auto (F16/BF16 as the weights are).")
    ] = "auto",
    name: Annotated[
        str | None, typer.Option("--name", help="Store name (default: folder name or owner/repo).")
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", "-r", help="Hub branch, tag or commit (default: main).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output file.")] = False,
) -> None:
    """Convert Hugging Face safetensors weights to GGUF with llama.cpp's converter and register it."""
    from selfhost.convert.run import ConvertOptions
    from selfhost.convert.run import convert as run

    options = ConvertOptions(outtype=outtype, name=name, revision=revision, force=force)
    render(run(source, options))


def render(events: Iterable[object]) -> None:
    """Download bars (Hub sources), one bar for the tensor data written, then the summary."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from selfhost.atomic import human_bytes
    from selfhost.convert.run import Converted, ConvertProgress, Started
    from selfhost.events import Notice
    from selfhost.events import Progress as Download

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=err_console, transient=True,
    ) as bars:
        tasks: dict[str, int] = {}
        for event in events:
            if isinstance(event, Download):
                if event.task not in tasks:
                    tasks[event.task] = bars.add_task(event.task, total=event.total)
                bars.update(tasks[event.task], completed=event.done, total=event.total)
            elif isinstance(event, Notice):
                err_console.print(event.message, markup=False)
            elif isinstance(event, Started):  # on the transient bar: a failure leaves one error line
                label = f"{event.architecture}, {event.n_params / 1e6:.1f} M parameters -> {event.outtype}"
                tasks["<write>"] = bars.add_task(f"converting ({label})", total=None)
            elif isinstance(event, ConvertProgress):
                bars.update(tasks["<write>"], completed=event.done, total=event.total)
            elif isinstance(event, Converted):
                r = event.result
                console.print(f"[bold]{r.output}[/bold]")
                console.print(
                    f"  converted from {r.source} by llama.cpp's converter: {r.architecture}, "
                    f"{r.n_params / 1e6:.1f} M parameters, {r.quant}, {human_bytes(r.size)}",
                    markup=False, highlight=False,
                )
                if r.name:
                    console.print(
                        f"  registered as {r.name}: try `selfhost chat {r.name}` or "
                        f"`selfhost quantize {r.name} --type Q4_K_M`", markup=False,
                    )
