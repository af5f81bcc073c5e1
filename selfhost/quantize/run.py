"""Quantize a GGUF model in-process with llama.cpp (`llama_model_quantize`), safely.

`quantize(model, options)` validates everything first (type, input file, imatrix, output path,
free disk and RAM), then runs llama.cpp on a worker thread while this generator yields
selfhost.events parsed from llama.cpp's own log: one `Progress` per tensor, then a `Result` with
the summary (`QuantizeResult`). The output is written to a temp file beside the destination and
renamed only when llama.cpp succeeded and the result reads back as the requested file type. With a
calibration text the importance matrix is computed first (selfhost.quantize.calibrate; its events
come first).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from selfhost import atomic, paths
from selfhost.errors import DiskSpaceError, IntegrityError, ModelLoadError, SelfhostError, UsageError
from selfhost.events import Event, Events, Notice, Progress, Result, nested, run_to_end
from selfhost.quantize.types import FLOAT_TYPES, QuantType, get_type, ggml_type_id
from selfhost.runtime import gguf_info
from selfhost.runtime.memory import available_memory

if TYPE_CHECKING:
    from selfhost.models.resolve import ResolvedModel


class QuantizeOptions(BaseModel):
    """Everything `selfhost quantize` accepts; flags map 1:1 onto these fields."""

    type: str = "Q4_K_M"
    out: Path | None = None  # file or directory; default: models_dir()/<base>-<TYPE>.gguf
    threads: int | None = None
    allow_requantize: bool = False
    imatrix: Path | None = None
    calibration: str | None = None  # text file (or "default") to compute an imatrix from in-process
    imatrix_out: Path | None = None  # keep the computed imatrix here
    chunk_size: int = 512  # calibration tokens per chunk (llama-imatrix's default context)
    calibration_chunks: int | None = None  # at most this many chunks of the calibration text
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    leave_output_tensor: bool = False
    force: bool = False
    add_to_store: bool = True  # add the output to the local store as <base>:<TYPE>


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


# -- llama.cpp log parsing -----------------------------------------------------------------
_TENSOR_RE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+),")
_CONVERT_RE = re.compile(r"converting to (\S+) \.\.")
_FALLBACK_RE = re.compile(r"warning: (\S+)\s+- ncols.*-> falling back to\s+(\S+)")
_FALLBACK_TOTAL_RE = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


class LogParser:
    """Turns llama.cpp's quantize log (arriving in fragments) into one Progress of `task` per tensor
    (detail: the tensor, and the type it was converted to)."""

    def __init__(self, emit: Callable[[Progress], None], task: str) -> None:
        self.emit = emit
        self.task = task
        self.pending = ""
        self.lines: list[str] = []
        self.fallbacks: dict[str, str] = {}
        self.fallback_total: int | None = None
        self.n_quantized = 0

    def feed(self, _level: int, text: str) -> None:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self.lines.append(line)
            self._line(line)

    def _line(self, line: str) -> None:
        if found := _TENSOR_RE.search(line):
            convert = _CONVERT_RE.search(line)
            self.n_quantized += bool(convert)
            index, total, name, _from_type = found.groups()
            detail = f"{name} -> {convert.group(1).upper()}" if convert else name
            self.emit(Progress(self.task, int(index), int(total), unit="tensors", detail=detail))
        elif found := _FALLBACK_RE.search(line):
            self.fallbacks[found.group(1)] = found.group(2).upper()
        elif found := _FALLBACK_TOTAL_RE.search(line):
            self.fallback_total = int(found.group(1))

    def error_line(self) -> str | None:
        """The most telling line of a failed run (llama.cpp logs the exception last)."""
        for line in reversed(self.lines + [self.pending]):
            text = line.strip()
            if "failed to quantize:" in text:
                return text.split("failed to quantize:", 1)[1].strip()
        for line in reversed(self.lines):
            if line.strip() and not line.startswith("="):
                return line.strip()
        return None


# -- validation ----------------------------------------------------------------------------
def default_output(base: str, qtype: QuantType) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", base.replace("/", "--")).strip("-") or "model"
    return paths.models_dir() / f"{safe}-{qtype.name}.gguf"


def is_quantized(info: gguf_info.GGUFInfo) -> bool:
    return any(t not in FLOAT_TYPES for t in info.tensor_types)


def ram_needed(info: gguf_info.GGUFInfo) -> int:
    """Peak RAM of llama_model_quantize: the input is memory-mapped; per tensor it holds an F32
    copy, a work buffer and the quantized rows. Estimated from the largest tensor, usually
    the token embedding (vocab x n_embd)."""
    largest = (info.vocab_size or 0) * (info.embedding_length or 0)
    if not largest:
        largest = info.n_params // max(1, (info.n_layers or 1))
    return 3 * 4 * largest + 64 * 2**20


def _check_ram(info: gguf_info.GGUFInfo) -> None:
    free, need = available_memory(), ram_needed(info)
    if free is not None and free < need:
        raise SelfhostError(
            f"not enough memory to quantize {info.path.name}: need about {atomic.human_bytes(need)}, "
            f"{atomic.human_bytes(free)} available",
            hint="close other programs or quantize on a machine with more RAM",
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


# -- the core ------------------------------------------------------------------------------
def quantize(model: str | ResolvedModel, options: QuantizeOptions) -> Events:
    """Quantize `model` (a store name or a .gguf path).

    Yields Notices (what runs, requantizing, fallbacks), with --calibration first the importance
    matrix computation's events, then Progress of task <TYPE> per tensor; ends with Result(QuantizeResult).
    """
    job = _plan(model, options)
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
    parser, out_info = yield from _run_llama(job, imatrix, options)
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


@dataclass(frozen=True)
class _Job:
    """A validated quantization: what llama.cpp reads and writes, and how."""

    source: Path  # the input GGUF (the first part of a split one)
    input_name: str
    info: gguf_info.GGUFInfo
    qtype: QuantType
    out: Path
    name: str  # store name the output gets
    threads: int
    requantize: bool
    imatrix: Any  # a loaded --imatrix (ImatrixData), or None
    calibration: tuple[str, str] | None  # (text, dataset name) to compute the imatrix from
    output_tensor_type: int | None
    embedding_type: int | None


def _plan(model: str | ResolvedModel, options: QuantizeOptions) -> _Job:
    """Validate everything before any work: options, the input, the output path, free disk and RAM."""
    from selfhost.models.names import split_tag
    from selfhost.models.resolve import resolve_model
    from selfhost.runtime.llama_backend import default_threads

    qtype = get_type(options.type)
    output_type = options.output_tensor_type
    output_tensor_type = ggml_type_id(output_type, "--output-tensor-type") if output_type else None
    embd_type = options.token_embedding_type
    embedding_type = ggml_type_id(embd_type, "--token-embedding-type") if embd_type else None
    calibration = _check_imatrix_options(qtype, options)
    if options.threads is not None and options.threads < 1:
        raise UsageError("--threads must be at least 1")

    # resolved once: by the CLI (handed down), or here for a name; a split GGUF: llama.cpp reads every part
    resolved = resolve_model(model, purpose="load") if isinstance(model, str) else model
    info = gguf_info.inspect(resolved.path)  # full validation before llama.cpp touches the file
    if info.vocab_size is None or not info.tensor_types:
        raise IntegrityError(f"{resolved.path} is not a language model GGUF (no tokenizer)")
    requantize = is_quantized(info)
    if requantize and not options.allow_requantize:
        raise UsageError(
            f"{resolved.name} is already quantized ({info.quant}); quantizing it again loses more quality "
            "than quantizing from F16/F32",
            hint="pass --allow-requantize to do it anyway, or start from an F16/BF16/F32 file",
        )
    imatrix = None
    if options.imatrix is not None:
        from selfhost.quantize.imatrix import load_imatrix

        imatrix = load_imatrix(options.imatrix)

    base = resolved.record.base if resolved.record else split_tag(resolved.name)[0]
    out = _output_path(resolved.path, base, qtype, options)
    input_size = sum(p.stat().st_size for p in resolved.parts) or info.size
    atomic.ensure_free_space(out.parent, input_size, "the quantized model")
    _check_ram(info)
    return _Job(
        source=resolved.path, input_name=resolved.name, info=info, qtype=qtype, out=out,
        name=f"{base}:{qtype.name}", threads=options.threads or default_threads(), requantize=requantize,
        imatrix=imatrix, calibration=calibration, output_tensor_type=output_tensor_type,
        embedding_type=embedding_type,
    )


def _check_imatrix_options(qtype: QuantType, options: QuantizeOptions) -> tuple[str, str] | None:
    """Check --imatrix / --calibration / --imatrix-out together; read the calibration text, if any."""
    if options.imatrix is not None and options.calibration is not None:
        raise UsageError("pass either --imatrix or --calibration, not both")
    if options.imatrix_out is not None and options.calibration is None:
        raise UsageError("--imatrix-out needs --calibration (the text to compute the imatrix from)")
    if qtype.needs_imatrix and options.imatrix is None and options.calibration is None:
        raise UsageError(
            f"{qtype.name} needs an importance matrix: at so few bits per weight llama.cpp keeps a model "
            "usable only by weighting each weight by how much it matters",
            hint="pass --calibration default (or a text file), or --imatrix FILE, or choose Q2_K / IQ3_XXS "
            "or larger",
        )
    if options.calibration is None:
        return None
    from selfhost.quantize.calibrate import calibration_text

    return calibration_text(options.calibration)  # a bad file fails before any work


def _output_path(source: Path, base: str, qtype: QuantType, options: QuantizeOptions) -> Path:
    """The checked output file (its folder made, partial files of killed runs swept)."""
    out = Path(options.out).expanduser() if options.out else default_output(base, qtype)
    if out.is_dir():
        out = out / default_output(base, qtype).name
    if out.suffix != ".gguf":
        raise UsageError(f"output {out} must end in .gguf")
    if _same_file(source, out):
        raise UsageError(f"output {out} is the input file", hint="choose another --out")
    if out.exists() and not options.force:
        raise UsageError(f"{out} already exists", hint="pass --force to overwrite it, or --out another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(out.parent)
    return out


def _run_llama(
    job: _Job, imatrix: Any, options: QuantizeOptions
) -> Generator[Event, None, tuple[LogParser, gguf_info.GGUFInfo]]:
    """Run llama_model_quantize into a temp file beside the output, yielding per-tensor Progress; the
    file is renamed only when llama.cpp succeeded and it reads back as the requested type.
    Returns (the log parser, the output's GGUFInfo)."""
    from selfhost.runtime.llama_backend import llama

    lib = llama()
    params, keep_alive = _llama_params(lib, job, imatrix, options)
    events: queue.Queue[Any] = queue.Queue()
    parser = LogParser(events.put, job.qtype.name)
    yield Progress(job.qtype.name, 0, job.info.n_tensors, unit="tensors")
    with atomic.atomic_path(job.out, suffix=".partial") as tmp:
        source, target = str(job.source).encode(), str(tmp).encode()
        rc = yield from _on_worker_thread(
            lambda: lib.llama_model_quantize(source, target, ctypes.byref(params)), events, parser, tmp
        )
        if rc != 0:
            raise _failure(parser, job)
        out_info = gguf_info.inspect(tmp)
        _make_readable(tmp)
        if out_info.quant != job.qtype.name:
            raise IntegrityError(f"llama.cpp wrote file type {out_info.quant}, expected {job.qtype.name}")
    del keep_alive  # the C arrays llama.cpp read lived until here
    return parser, out_info


def _llama_params(lib: Any, job: _Job, imatrix: Any, options: QuantizeOptions) -> tuple[Any, list[Any]]:
    """llama_model_quantize_params for `job`, and the C arrays it points to (they must outlive the call)."""
    params = lib.llama_model_quantize_default_params()
    params.ftype = job.qtype.ftype
    params.nthread = job.threads
    params.allow_requantize = options.allow_requantize
    params.quantize_output_tensor = not options.leave_output_tensor
    params.pure = options.pure
    if job.output_tensor_type is not None:
        params.output_tensor_type = job.output_tensor_type
    if job.embedding_type is not None:
        params.token_embedding_type = job.embedding_type
    keep_alive: list[Any] = []
    if imatrix is not None:
        keep_alive += _attach_imatrix(lib, params, imatrix)
    return params, keep_alive


def _on_worker_thread(
    call: Callable[[], int], events: queue.Queue[Any], parser: LogParser, tmp: Path
) -> Generator[Event, None, int]:
    """Run llama.cpp's `call` on a thread, yielding the events its log turns into; return its code.
    Ctrl-C cannot stop llama.cpp: then its file is removed when the process exits."""
    from selfhost.runtime.llama_backend import capture_logs

    outcome: dict[str, Any] = {}
    done = object()

    def work() -> None:
        try:
            outcome["rc"] = call()
        except BaseException as exc:  # noqa: BLE001 - reported on the main thread
            outcome["error"] = exc
        finally:
            events.put(done)

    worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
    try:
        with capture_logs(parser.feed):
            worker.start()
            while (item := _next(events)) is not done:
                yield item
            worker.join()
    except BaseException:
        if worker.is_alive():  # Ctrl-C: llama.cpp cannot be stopped; make sure its file goes away
            atexit.register(_unlink, tmp)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["rc"]


def _failure(parser: LogParser, job: _Job) -> SelfhostError:
    """The error of a failed llama_model_quantize: a full disk, or llama.cpp's own reason."""
    reason = parser.error_line() or "unknown error"
    if _disk_full(job.out.parent, reason):
        return DiskSpaceError(
            f"the disk is full: llama.cpp could not write {job.out.name} in {job.out.parent}",
            hint="free some space or choose another --out; nothing was registered",
        )
    return ModelLoadError(f"llama.cpp could not quantize {job.source.name} to {job.qtype.name}: {reason}")


def _next(events: queue.Queue[Any]) -> Any:
    while True:  # a timeout keeps the main thread responsive to Ctrl-C
        with contextlib.suppress(queue.Empty):
            return events.get(timeout=0.2)


def _sweep_orphans(folder: Path) -> None:
    """Partial outputs of quantize runs that were killed (kill -9, power loss) go before writing."""
    from selfhost.models.store import Store

    Store().sweep_temp_files()
    atomic.sweep_stale(folder)


def _disk_full(folder: Path, reason: str) -> bool:
    """llama.cpp reports a full disk as an 'iostream error'; the free space says what it was."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    return "no space" in reason.lower() or free < DISK_FULL_MARGIN


DISK_FULL_MARGIN = 4 * 1024 * 1024  # less free than this after a failed write: the disk filled up


def _make_readable(path: Path) -> None:
    """mkstemp creates 0600 files; a model file gets the usual permissions (0666 minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        Path(path).unlink()


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
            _unlink(target)
    return data if keep else data.model_copy(update={"path": Path(dataset)})


def _attach_imatrix(lib: Any, params: Any, imatrix: Any) -> list[Any]:
    """Point params.imatrix at a NULL-terminated C array of (name, data, size), as llama-quantize does,
    and record the imatrix in the output's metadata (quantize.imatrix.*). Returns what must stay alive."""
    import numpy as np

    entries = (lib.llama_model_imatrix_data * (len(imatrix.values) + 1))()
    alive: list[Any] = [entries]
    for i, (tensor, values) in enumerate(imatrix.values.items()):
        arr = np.ascontiguousarray(values, dtype=np.float32)
        key = tensor.encode()
        alive += [arr, key]
        entries[i].name = key
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    params.imatrix = entries

    overrides: list[tuple[str, str | int]] = [
        ("quantize.imatrix.file", imatrix.path.name),
        ("quantize.imatrix.entries_count", len(imatrix.values)),
    ]
    if imatrix.datasets:
        overrides.append(("quantize.imatrix.dataset", imatrix.datasets[0]))
    if imatrix.chunk_count > 0:
        overrides.append(("quantize.imatrix.chunks_count", imatrix.chunk_count))
    kv = (lib.llama_model_kv_override * (len(overrides) + 1))()  # zeroed last entry terminates
    for i, (key, value) in enumerate(overrides):
        kv[i].key = key.encode()
        if isinstance(value, int):
            kv[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_INT
            kv[i].value.val_i64 = value
        else:
            kv[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_STR
            kv[i].value.val_str = value.encode()[:127]
    params.kv_overrides = kv
    alive.append(kv)
    return alive
