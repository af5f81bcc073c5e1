"""`selfhost convert SOURCE`: flags map onto `selfhost.convert.flow.convert()`; cli.common renders it."""

from __future__ import annotations

from typing import Annotated

import typer

from selfhost.cli.common import render_convert
from selfhost.cli.output import Output


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
    render_convert(convert(source, options), Output(as_json))
