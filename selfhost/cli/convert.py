"""`selfhost convert SOURCE`: flags map onto `selfhost.convert.flow.convert()`; this module renders it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer

from selfhost.cli.console import plain
from selfhost.cli.output import Output, fmt_bytes
from selfhost.events import Event


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert Hugging Face safetensors weights to GGUF with llama.cpp's converter and register it."""
    from selfhost.convert.flow import ConvertOptions, convert

    options = ConvertOptions(outtype=outtype, name=name, revision=revision, force=force)
    render(convert(source, options), Output(as_json))


def render(events: Iterable[Event], output: Output | None = None) -> None:
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
