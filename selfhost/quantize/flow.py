"""Quantize a GGUF model in-process with llama.cpp, safely: the flow.

`quantize(model, options)` plans (selfhost.quantize.plan: every check before work), computes the
importance matrix first when given a calibration text (selfhost.quantize.calibrate; its events come first),
runs llama.cpp (selfhost.quantize.llama_job: one `Progress` per tensor) and registers the output; it ends
with a `Result` holding the summary (`QuantizeResult`).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from selfhost.events import Event, Events, Notice, Result, nested, run_to_end
from selfhost.quantize.llama_job import run_llama, unlink_quietly
from selfhost.quantize.plan import QuantizeOptions, plan
from selfhost.quantize.types import QuantType
from selfhost.runtime import gguf_info

if TYPE_CHECKING:
    from selfhost.models.resolve import ResolvedModel


class QuantizeResult(BaseModel):
    input: Path
    output: Path
    name: str | None  # store name, None when not registered
    type: str
    input_size: int
    output_size: int
    input_bpw: float
    output_bpw: float
    seconds: float
    n_tensors: int
    n_quantized: int
    n_fallback: int  # tensors whose row size does not fit the requested type's block
    fallbacks: dict[str, str]  # tensor name -> type it fell back to
    tensor_types: dict[str, int]  # output ggml type -> count
    imatrix: Path | None = None  # the imatrix used, when it was kept (--imatrix / --imatrix-out)


def quantize(model: str | ResolvedModel, options: QuantizeOptions) -> Events:
    """Quantize `model` (a store name or a .gguf path).

    Yields Notices (what runs, requantizing, fallbacks), with --calibration first the importance
    matrix computation's events, then Progress of task <TYPE> per tensor; ends with Result(QuantizeResult).
    """
    job = plan(model, options)
    imatrix = job.imatrix
    if job.calibration is not None:
        imatrix = yield from _calibrate(job.source, job.out, job.calibration, options)
    yield Notice(
        f"quantizing {job.input_name} ({job.info.quant}) -> {job.qtype.name} with {job.threads} threads"
    )
    if job.requantize:
        yield Notice(
            f"requantizing {job.info.quant} -> {job.qtype.name}: expect more quality loss than from F16",
            "warning",
        )
    started = time.perf_counter()
    parser, out_info = yield from run_llama(job, imatrix, options)
    seconds = time.perf_counter() - started

    registered = None
    if options.add_to_store:
        registered = _register(job.name, job.out, out_info, job.input_name, job.qtype)
    n_fallback = parser.fallback_total if parser.fallback_total is not None else len(parser.fallbacks)
    if n_fallback:
        yield Notice(
            f"{n_fallback} of {job.info.n_tensors} tensors fell back to another type: their row size "
            f"does not fit {job.qtype.name}'s block size", "warning",
        )
    yield Result(QuantizeResult(
        input=job.source, output=job.out, name=registered, type=job.qtype.name,
        input_size=job.info.size, output_size=out_info.size,
        input_bpw=round(job.info.bits_per_weight, 3), output_bpw=round(out_info.bits_per_weight, 3),
        seconds=round(seconds, 3), n_tensors=job.info.n_tensors, n_quantized=parser.n_quantized,
        n_fallback=n_fallback, fallbacks=parser.fallbacks, tensor_types=out_info.tensor_types,
        imatrix=options.imatrix or options.imatrix_out,
    ))


def run_quantize(model: str | ResolvedModel, options: QuantizeOptions) -> QuantizeResult:
    """Convenience: drive `quantize` to the end and return its result."""
    return run_to_end(quantize(model, options))


def _register(name: str, out: Path, out_info: gguf_info.GGUFInfo, parent: str, qtype: QuantType) -> str:
    from selfhost.models.store import ModelRecord, Store

    Store().add(  # sha256 left for `models show` to compute (Store.ensure_sha256): it costs ~30% here
        ModelRecord(
            name=name, path=out.resolve(), size=out_info.size, sha256=None,
            source="quantized", quant=qtype.name, parent=parent,
        )
    )
    return name


def _calibrate(
    model: Path, out: Path, calibration: tuple[str, str], options: QuantizeOptions
) -> Generator[Event, None, Any]:
    """Compute the imatrix of `model` over the calibration text (its events), then load it like a file.
    Without --imatrix-out it is written beside the output and removed once loaded."""
    from selfhost.quantize.calibrate import compute_imatrix
    from selfhost.quantize.imatrix import load_imatrix

    text, dataset = calibration
    keep = options.imatrix_out is not None
    target = Path(options.imatrix_out).expanduser() if keep else out.with_name(f".{out.stem}.imatrix.gguf")
    try:
        yield from nested(compute_imatrix(
            model, text, target, dataset=dataset, chunk_size=options.chunk_size,
            max_chunks=options.calibration_chunks, threads=options.threads,
        ))
        data = load_imatrix(target)
    finally:
        if not keep:
            unlink_quietly(target)
    return data if keep else data.model_copy(update={"path": Path(dataset)})
