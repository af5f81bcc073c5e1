"""`selfhost quantize` and `selfhost compare`: thin wrappers over selfhost.quantize.

`compare` is its own top-level command rather than `quantize compare`: a Typer command that takes
a positional MODEL cannot also hold sub-commands without ambiguity (`quantize compare` would
read as a model named "compare").
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selfhost.cli.console import console, err_console, plain
from selfhost.cli.pull import PULL_HELP, ensure_model
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
    if list_types:
        _print_types()
        return
    if model is None:
        raise UsageError(
            "name a model to quantize", hint="e.g. `selfhost quantize model-f16.gguf --type Q4_K_M`"
        )
    from selfhost.quantize.perplexity import read_text
    from selfhost.quantize.run import QuantizeOptions, run_quantize

    text = read_text(eval_text) if eval_text else None  # fail on a bad --eval before quantizing
    model = ensure_model(model, pull, purpose="load")  # auto-pull: an alias or owner/repo not here yet
    options = QuantizeOptions(
        type=type_, out=out, threads=threads, allow_requantize=allow_requantize, imatrix=imatrix,
        calibration=calibration, imatrix_out=imatrix_out, chunk_size=chunk_size,
        calibration_chunks=calibration_chunks,
        output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type, pure=pure,
        leave_output_tensor=leave_output_tensor, force=force,
    )
    with _QuantizeProgress() as progress:
        result = run_quantize(model, options, on_event=progress.handle)
    _print_summary(result)
    if imatrix_out is not None:
        console.print(f"  importance matrix kept in {imatrix_out}", markup=False, highlight=False)
    if text is not None:
        from selfhost.quantize.compare import compare as run_compare

        report = _with_eval_progress(
            lambda on_event: run_compare(
                [str(result.input), str(result.output)], text, window=window, chunks=chunks,
                threads=threads, on_event=on_event,
            )
        )
        _print_report(report)


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
        from selfhost import plots

        plots.pyplot()  # a missing matplotlib fails now, not after the slow part
    content = read_text(text)
    report = _with_eval_progress(
        lambda on_event: run_compare(
            models, content, window=window, chunks=chunks, threads=threads, on_event=on_event
        )
    )
    if plot is not None:
        title = f"perplexity on {text.name} ({report.n_scored} tokens scored)"
        plots.quality_png(report.rows, plot, title=title)
    if as_json:
        import sys

        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
        return
    _print_report(report)
    if plot is not None:
        console.print(f"plot: {plot}", markup=False)


# -- rendering -----------------------------------------------------------------------------
class _QuantizeProgress:
    """Renders quantize events: a per-tensor progress bar, then notices."""

    def __enter__(self) -> _QuantizeProgress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[tensor]}", markup=False), console=err_console,
            transient=True,
        )
        self.progress.__enter__()
        self.task = None
        self.notices: list[str] = []
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]
        for notice in self.notices:
            err_console.print(f"note: {notice}", markup=False, highlight=False, soft_wrap=True)

    def handle(self, event: object) -> None:
        from selfhost.quantize.calibrate import ChunkDone, ImatrixStarted, ImatrixWritten
        from selfhost.quantize.run import Notice, Planned, TensorDone

        if isinstance(event, ImatrixStarted):
            err_console.print(
                f"computing the importance matrix: {event.n_chunks} chunks of {event.chunk_size} tokens",
                markup=False, highlight=False,
            )
            self.imatrix_task = self.progress.add_task("imatrix chunks", total=event.n_chunks, tensor="")
        elif isinstance(event, ChunkDone):
            self.progress.update(self.imatrix_task, completed=event.done, total=event.total)
        elif isinstance(event, ImatrixWritten):
            self.progress.remove_task(self.imatrix_task)
            per_1k = event.seconds / event.n_tokens * 1000 if event.n_tokens else 0.0
            err_console.print(
                f"importance matrix: {event.n_entries} weight matrices, {event.n_tokens} tokens in "
                f"{event.seconds:.1f} s ({per_1k:.1f} s per 1k tokens)", markup=False, highlight=False,
            )
        elif isinstance(event, Planned):
            err_console.print(
                f"quantizing {event.input_name} ({event.input_quant}) -> {event.type} "
                f"with {event.threads} threads", markup=False, highlight=False,
            )
            self.task = self.progress.add_task(event.type, total=event.n_tensors, tensor="")
        elif isinstance(event, TensorDone) and self.task is not None:
            self.progress.update(self.task, completed=event.index, total=event.total, tensor=event.name)
        elif isinstance(event, Notice):
            self.notices.append(event.message)


def _print_summary(result) -> None:  # noqa: ANN001
    from selfhost.atomic import human_bytes

    ratio = result.output_size / result.input_size if result.input_size else 0
    console.print(str(result.output), style="bold", markup=False)
    console.print(
        f"  size {human_bytes(result.input_size)} -> {human_bytes(result.output_size)} ({ratio:.0%}), "
        f"bits per weight {result.input_bpw:.2f} -> {result.output_bpw:.2f}, {result.seconds:.1f} s",
        highlight=False,
    )
    types = ", ".join(f"{n} {k}" for k, n in sorted(result.tensor_types.items(), key=lambda kv: -kv[1]))
    console.print(
        f"  {result.n_quantized} of {result.n_tensors} tensors quantized, {result.n_fallback} fell back "
        f"to another type (row size does not fit {result.type}); tensor types: {types}",
        highlight=False, markup=False,
    )
    if result.name:
        console.print(f"  registered as {result.name}: try `selfhost chat {result.name}`", markup=False)


def _with_eval_progress(run):  # noqa: ANN001, ANN202
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from selfhost.quantize.compare import EvalStarted, WindowDone

    with Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
        console=err_console, transient=True,
    ) as progress:
        tasks: dict[str, int] = {}

        def on_event(event: object) -> None:
            if isinstance(event, EvalStarted):
                tasks[event.name] = progress.add_task(f"perplexity {event.name}", total=None)
            elif isinstance(event, WindowDone):
                progress.update(tasks[event.name], completed=event.done, total=event.total)

        return run(on_event)


def _print_report(report) -> None:  # noqa: ANN001
    from rich.table import Table

    from selfhost.atomic import human_bytes

    table = Table(
        title=f"perplexity over {report.n_windows} window(s) of {report.window} tokens "
        f"({report.n_scored} tokens scored)",
    )
    for column in ("model", "type", "size", "bpw", "ppl", "Δppl", "prompt tok/s", "gen tok/s"):
        table.add_column(column, justify="left" if column in ("model", "type") else "right")
    for row in report.rows:
        delta = "reference" if row.reference else f"{row.ppl_increase:+.4f}"
        table.add_row(
            plain(row.name), plain(row.quant), human_bytes(row.size), f"{row.bpw:.2f}",
            f"{row.ppl:.4f}", delta,
            f"{row.prompt_tok_s:.1f}", f"{row.gen_tok_s:.1f}",
        )
    console.print(table)


def _print_types() -> None:
    from rich.table import Table

    from selfhost.quantize.types import supported_types

    table = Table(title="quantization types of the installed llama.cpp")
    for column in ("type", "bpw", "ppl increase", "imatrix", "advice"):
        table.add_column(column, justify="right" if column in ("bpw", "ppl increase") else "left")
    for t in supported_types():
        table.add_row(
            f"[bold]{t.name}[/bold]" if t.name == "Q4_K_M" else t.name,
            f"{t.bpw:.2f}" if t.bpw else "?",
            f"+{t.ppl_increase:.4f}" if t.ppl_increase is not None else "",
            "required" if t.needs_imatrix else "",
            t.advice,
        )
    console.print(table)
    console.print(
        "bpw: bits per weight of Llama-3-8B at that type (nominal where no size is published); "
        "ppl increase: llama.cpp's published perplexity increase over F16 on Llama-3-8B.",
        highlight=False,
    )
