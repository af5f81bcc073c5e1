"""`selfhost pull NAME` (the auto-pull of `chat`, `serve` and `quantize` is `cli.common.ensure_model`).

Flags map onto `selfhost.models.pull.pull()`; its notices and per-file progress bars go to stderr
through the output layer, the result (or the dry-run plan) to stdout, as JSON with `--json`.
"""

from __future__ import annotations

import typer

from selfhost.cli import output
from selfhost.cli.output import Output, fmt_bytes


def register(app: typer.Typer) -> None:
    @app.command("pull")
    def pull_command(
        name: str = typer.Argument(
            ...,
            help="alias[:QUANT] (see `selfhost models list --available`), owner/repo[:QUANT|:file.gguf], "
            "or a .gguf file to import",
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
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Download a GGUF model from the Hugging Face Hub (resumable, sha256-verified) and register it."""
        from selfhost.models.pull import ConvertibleRepo, pull

        out = Output(as_json)
        try:
            value = out.run(pull(name, revision=revision, dry_run=dry_run, offline=offline))
        except ConvertibleRepo as exc:
            _offer_convert(exc, out, dry_run)
            return
        out.result(value, lambda v: render_result(v, out))


def _offer_convert(exc: BaseException, out: Output, dry_run: bool) -> None:
    """A repo with safetensors but no GGUF: on a terminal, offer to convert it now; else the error."""
    from selfhost.models.pull import ConvertibleRepo

    assert isinstance(exc, ConvertibleRepo)
    if dry_run or out.json_mode or not output.is_interactive():
        raise exc
    try:
        out.confirm(f"{exc.repo} has no GGUF files. Convert its safetensors weights to GGUF now?", yes=False)
    except typer.Exit:
        raise exc from None
    from selfhost.cli.common import render_convert
    from selfhost.convert.flow import ConvertOptions, convert

    render_convert(convert(exc.repo, ConvertOptions(revision=exc.revision)))


def render_result(value: object, out: Output) -> None:
    """The pulled record (two lines) or the dry-run plan (a table), on stdout."""
    from rich.table import Table

    from selfhost.cli.console import plain
    from selfhost.models.pull import PullPlan, PullResult

    if isinstance(value, PullResult):
        r = value.record
        how = "downloaded and verified" if value.downloaded else "already on disk, verified"
        if r.source in ("quantized", "trained", "converted"):
            how = "already in the store"  # a model selfhost made: nothing to fetch or verify
        digest = (r.sha256 or "not computed")[:12]
        out.console.print(plain(f"{r.name}: {how} (sha256 {digest}, {fmt_bytes(r.size)}, source {r.source})"))
        out.console.print(plain(f"  {r.path}", "dim"))
    elif isinstance(value, PullPlan):
        table = Table(title=plain(f"dry run: {value.name} (nothing written)"))
        for column, justify in (("file", "left"), ("size", "right"), ("status", "left")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for f in value.files:
            partial = f"partial: {fmt_bytes(f.partial)} on disk" if f.partial else "to download"
            size = fmt_bytes(f.size) if f.size is not None else "?"
            table.add_row(plain(f.file), size, "cached" if f.cached else partial)
        out.console.print(table)
        out.console.print(plain(f"to download: {fmt_bytes(value.to_download)}"))
