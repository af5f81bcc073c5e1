"""`selfhost quantize` and `selfhost compare`: thin wrappers over selfhost.quantize.

`compare` is its own top-level command rather than `quantize compare`: a Typer command that takes
a positional MODEL cannot also hold sub-commands without ambiguity (`quantize compare` would
read as a model named "compare").
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfhost.cli.common import PULL_HELP, ensure_model
from selfhost.cli.console import plain
from selfhost.cli.output import Output, fmt_bytes, jsonable
from selfhost.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
    app.command("compare")(compare)


def quantize(
    model: Annotated[
        str | None, typer.Argument(help="A pulled model name or a .gguf file (F32/F16/BF16).")
    ] = None,
    type_: Annotated[
        str, typer.Option("--type", "-t", help="Quantization type (see --list-types).")
    ] = "Q4_K_M",
    list_types: Annotated[
        bool, typer.Option("--list-types", help="List every type with its size and cost.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result (or the --list-types table) as JSON.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output .gguf or directory (default: models dir)."),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads (default: all cores).")] = None,
    allow_requantize: Annotated[
        bool, typer.Option("--allow-requantize", help="Accept a quantized input (loses more quality).")
    ] = False,
    imatrix: Annotated[
        Path | None, typer.Option("--imatrix", help="Importance matrix file made by llama-imatrix.")
    ] = None,
    calibration: Annotated[
        str | None,
        typer.Option(
            "--calibration",
            help="Compute an importance matrix from this text file ('default': the text shipped with "
            "selfhost) and quantize with it.",
        ),
    ] = None,
    imatrix_out: Annotated[
        Path | None, typer.Option("--imatrix-out", help="Keep the computed importance matrix (GGUF) here.")
    ] = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Tokens per calibration chunk (--calibration).")
    ] = 512,
    calibration_chunks: Annotated[
        int | None, typer.Option("--calibration-chunks", help="Calibration chunks to use at most.")
    ] = None,
    output_tensor_type: Annotated[
        str | None, typer.Option("--output-tensor-type", help="ggml type for output.weight, e.g. Q8_0.")
    ] = None,
    token_embedding_type: Annotated[
        str | None, typer.Option("--token-embedding-type", help="ggml type for the token embeddings.")
    ] = None,
    pure: Annotated[
        bool, typer.Option("--pure", help="No K-quant mixture: every tensor gets the same type.")
    ] = False,
    leave_output_tensor: Annotated[
        bool, typer.Option("--leave-output-tensor", help="Keep output.weight unquantized.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output file.")] = False,
    eval_text: Annotated[
        Path | None,
        typer.Option("--eval", help="Then compare input and output on this text file (perplexity, speed)."),
    ] = None,
    window: Annotated[int, typer.Option("--window", help="Tokens per perplexity window (--eval).")] = 256,
    chunks: Annotated[int, typer.Option("--chunks", help="Windows to score at most (--eval).")] = 8,
    pull: Annotated[bool, typer.Option("--pull", help=PULL_HELP)] = False,
) -> None:
    """Quantize a GGUF model with llama.cpp and register it as <model>:<TYPE>."""
    output = Output(as_json)
    if list_types:
        from selfhost.quantize.types import supported_types

        output.result(supported_types(), human=lambda types: _print_types(output, types))
        return
    if model is None:
        raise UsageError(
            "name a model to quantize", hint="e.g. `selfhost quantize model-f16.gguf --type Q4_K_M`"
        )
    from selfhost.quantize.flow import QuantizeOptions, quantize
    from selfhost.quantize.perplexity import read_text

    text = read_text(eval_text) if eval_text else None  # fail on a bad --eval before quantizing
    model = ensure_model(model, pull, purpose="load")  # auto-pull: an alias or owner/repo not here yet
    options = QuantizeOptions(
        type=type_, out=out, threads=threads, allow_requantize=allow_requantize, imatrix=imatrix,
        calibration=calibration, imatrix_out=imatrix_out, chunk_size=chunk_size,
        calibration_chunks=calibration_chunks,
        output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type, pure=pure,
        leave_output_tensor=leave_output_tensor, force=force,
    )
    result = output.run(quantize(model, options))
    if not output.json_mode:
        _print_summary(output, result, imatrix_out)  # before the slower --eval
    report = None
    if text is not None:
        from selfhost.quantize.compare import compare as run_compare

        report = output.run(run_compare(
            [str(result.input), str(result.output)], text, window=window, chunks=chunks, threads=threads
        ))
    # JSON: the quantize result, with the --eval report (or null) under "eval"
    output.result({**jsonable(result), "eval": report}, human=lambda _value: _print_eval(output, report))


def compare(
    models: Annotated[list[str], typer.Argument(help="Model names or .gguf files to compare.")],
    text: Annotated[Path, typer.Option("--text", help="Text file to measure perplexity on.")],
    window: Annotated[int, typer.Option("--window", help="Tokens per perplexity window.")] = 256,
    chunks: Annotated[int, typer.Option("--chunks", help="Windows to score at most.")] = 8,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads (default: all cores).")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw perplexity increase and tok/s vs size (PNG).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Quality report: size, bits per weight, perplexity (and its increase) and tokens/s per model."""
    from selfhost.quantize.compare import compare as run_compare
    from selfhost.quantize.perplexity import read_text

    if plot is not None:
        from selfhost.cli import plots

        plots.pyplot()  # a missing matplotlib fails now, not after the slow part
    content = read_text(text)
    output = Output(as_json)
    report = output.run(run_compare(models, content, window=window, chunks=chunks, threads=threads))
    if plot is not None:
        title = f"perplexity on {text.name} ({report.n_scored} tokens scored)"
        plots.quality_png(report.rows, plot, title=title)

    def human(report) -> None:  # noqa: ANN001
        _print_report(output, report)
        if plot is not None:
            output.console.print(plain(f"plot: {plot}"))

    output.result(report, human=human)


# -- rendering -----------------------------------------------------------------------------
def _print_summary(output: Output, result, imatrix_out: Path | None) -> None:  # noqa: ANN001
    ratio = result.output_size / result.input_size if result.input_size else 0
    print_line = output.console.print
    print_line(plain(str(result.output), "bold"))
    print_line(plain(
        f"  size {fmt_bytes(result.input_size)} -> {fmt_bytes(result.output_size)} ({ratio:.0%}), "
        f"bits per weight {result.input_bpw:.2f} -> {result.output_bpw:.2f}, {result.seconds:.1f} s"
    ))
    types = ", ".join(f"{n} {k}" for k, n in sorted(result.tensor_types.items(), key=lambda kv: -kv[1]))
    print_line(plain(
        f"  {result.n_quantized} of {result.n_tensors} tensors quantized, {result.n_fallback} fell back "
        f"to another type (row size does not fit {result.type}); tensor types: {types}"
    ), soft_wrap=True)
    if result.name:
        print_line(plain(f"  registered as {result.name}: try `selfhost chat {result.name}`"))
    if imatrix_out is not None:
        print_line(plain(f"  importance matrix kept in {imatrix_out}"))


def _print_eval(output: Output, report) -> None:  # noqa: ANN001
    if report is not None:
        _print_report(output, report)


def _print_report(output: Output, report) -> None:  # noqa: ANN001
    from rich.table import Table

    table = Table(
        title=f"perplexity over {report.n_windows} window(s) of {report.window} tokens "
        f"({report.n_scored} tokens scored)",
    )
    for column in ("model", "type", "size", "bpw", "ppl", "Δppl", "prompt tok/s", "gen tok/s"):
        table.add_column(column, justify="left" if column in ("model", "type") else "right")
    for row in report.rows:
        delta = "reference" if row.reference else f"{row.ppl_increase:+.4f}"
        table.add_row(
            plain(row.name), plain(row.quant), fmt_bytes(row.size), f"{row.bpw:.2f}",
            f"{row.ppl:.4f}", delta,
            f"{row.prompt_tok_s:.1f}", f"{row.gen_tok_s:.1f}",
        )
    output.console.print(table)


def _print_types(output: Output, types) -> None:  # noqa: ANN001
    from rich.table import Table

    table = Table(title="quantization types of the installed llama.cpp")
    for column in ("type", "bpw", "ppl increase", "imatrix", "advice"):
        table.add_column(column, justify="right" if column in ("bpw", "ppl increase") else "left")
    for t in types:
        table.add_row(
            f"[bold]{t.name}[/bold]" if t.name == "Q4_K_M" else t.name,
            f"{t.bpw:.2f}" if t.bpw else "?",
            f"+{t.ppl_increase:.4f}" if t.ppl_increase is not None else "",
            "required" if t.needs_imatrix else "",
            t.advice,
        )
    output.console.print(table)
    output.console.print(
        "bpw: bits per weight of Llama-3-8B at that type (nominal where no size is published); "
        "ppl increase: llama.cpp's published perplexity increase over F16 on Llama-3-8B.",
        highlight=False,
    )
