"""Quantize a GGUF model in-process with llama.cpp (`llama_model_quantize`), safely.

`quantize(model, options)` validates everything first (type, input file, imatrix, output path,
free disk and RAM), then runs llama.cpp on a worker thread while this generator yields typed
events parsed from llama.cpp's own log: one `TensorDone` per tensor, then `Finished` with the
summary. The output is written to a temp file beside the destination and renamed only when
llama.cpp succeeded and the result reads back as the requested file type. With a calibration text
the importance matrix is computed first (selfhost.quantize.calibrate; its events come first).
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from selfhost import atomic, gguf_info, paths
from selfhost.errors import DiskSpaceError, IntegrityError, ModelLoadError, SelfhostError, UsageError
from selfhost.quantize.calibrate import ChunkDone, ImatrixStarted, ImatrixWritten
from selfhost.quantize.types import FLOAT_TYPES, QuantType, get_type, ggml_type_id
from selfhost.system_info import available_memory


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


# -- events --------------------------------------------------------------------------------
class Planned(BaseModel):
    """Validation passed; llama.cpp is about to run."""

    input: Path
    input_name: str
    input_quant: str
    input_size: int
    output: Path
    name: str  # store name the output gets
    type: str
    n_tensors: int
    threads: int


class Notice(BaseModel):
    """Something the user should know (requantizing, fallbacks)."""

    message: str


class TensorDone(BaseModel):
    index: int  # 1-based
    total: int
    name: str
    from_type: str
    to_type: str | None  # None: copied unchanged (norms, 1-D tensors)


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


class Finished(BaseModel):
    result: QuantizeResult


QuantizeEvent = Planned | Notice | TensorDone | Finished | ImatrixStarted | ChunkDone | ImatrixWritten


# -- llama.cpp log parsing -----------------------------------------------------------------
_TENSOR_RE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+),")
_CONVERT_RE = re.compile(r"converting to (\S+) \.\.")
_FALLBACK_RE = re.compile(r"warning: (\S+)\s+- ncols.*-> falling back to\s+(\S+)")
_FALLBACK_TOTAL_RE = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


class LogParser:
    """Turns llama.cpp's quantize log (arriving in fragments) into TensorDone events."""

    def __init__(self, emit: Callable[[TensorDone], None]) -> None:
        self.emit = emit
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
            index, total, name, from_type = found.groups()
            to_type = convert.group(1).upper() if convert else None
            self.emit(TensorDone(index=int(index), total=int(total), name=name, from_type=from_type.upper(),
                                 to_type=to_type))
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
def quantize(model: str, options: QuantizeOptions) -> Iterator[QuantizeEvent]:
    """Quantize `model` (a store name or a .gguf path); yield progress events, end with Finished."""
    from selfhost.llama_backend import capture_logs, default_threads, llama
    from selfhost.models.names import split_tag
    from selfhost.models.resolve import resolve_model

    qtype = get_type(options.type)
    output_type = options.output_tensor_type
    output_tensor_type = ggml_type_id(output_type, "--output-tensor-type") if output_type else None
    embd_type = options.token_embedding_type
    embedding_type = ggml_type_id(embd_type, "--token-embedding-type") if embd_type else None
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
    calibration = None
    if options.calibration is not None:
        from selfhost.quantize.calibrate import calibration_text

        calibration = calibration_text(options.calibration)  # a bad file fails before any work
    if options.threads is not None and options.threads < 1:
        raise UsageError("--threads must be at least 1")

    resolved = resolve_model(model, purpose="load")  # a split GGUF: llama.cpp reads every part from the first
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
    out = Path(options.out).expanduser() if options.out else default_output(base, qtype)
    if out.is_dir():
        out = out / default_output(base, qtype).name
    if out.suffix != ".gguf":
        raise UsageError(f"output {out} must end in .gguf")
    if _same_file(resolved.path, out):
        raise UsageError(f"output {out} is the input file", hint="choose another --out")
    if out.exists() and not options.force:
        raise UsageError(f"{out} already exists", hint="pass --force to overwrite it, or --out another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(out.parent)
    input_size = sum(p.stat().st_size for p in resolved.parts) or info.size
    atomic.ensure_free_space(out.parent, input_size, "the quantized model")
    _check_ram(info)
    if calibration is not None:
        imatrix = yield from _calibrate(resolved.path, out, calibration, options)

    lib = llama()
    threads = options.threads or default_threads()
    params = lib.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = threads
    params.allow_requantize = options.allow_requantize
    params.quantize_output_tensor = not options.leave_output_tensor
    params.pure = options.pure
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if embedding_type is not None:
        params.token_embedding_type = embedding_type
    keep_alive: list[Any] = []  # C arrays llama.cpp reads; must outlive the call
    if imatrix is not None:
        keep_alive += _attach_imatrix(lib, params, imatrix)

    name = f"{base}:{qtype.name}"
    yield Planned(
        input=resolved.path, input_name=resolved.name, input_quant=info.quant, input_size=info.size,
        output=out, name=name, type=qtype.name, n_tensors=info.n_tensors, threads=threads,
    )
    if requantize:
        yield Notice(
            message=f"requantizing {info.quant} -> {qtype.name}: expect more quality loss than from F16"
        )

    started = time.perf_counter()
    events: queue.Queue[Any] = queue.Queue()
    parser = LogParser(events.put)
    done = object()
    with atomic.atomic_path(out, suffix=".partial") as tmp:
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["rc"] = lib.llama_model_quantize(
                    str(resolved.path).encode(), str(tmp).encode(), ctypes.byref(params)
                )
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
        if outcome.get("rc") != 0:
            reason = parser.error_line() or "unknown error"
            if _disk_full(out.parent, reason):
                raise DiskSpaceError(
                    f"the disk is full: llama.cpp could not write {out.name} in {out.parent}",
                    hint="free some space or choose another --out; nothing was registered",
                )
            raise ModelLoadError(
                f"llama.cpp could not quantize {resolved.path.name} to {qtype.name}: {reason}"
            )
        out_info = gguf_info.inspect(tmp)
        _make_readable(tmp)
        if out_info.quant != qtype.name:
            raise IntegrityError(f"llama.cpp wrote file type {out_info.quant}, expected {qtype.name}")
    seconds = time.perf_counter() - started

    registered = None
    if options.add_to_store:
        registered = _register(name, out, out_info, resolved.name, qtype)

    n_fallback = parser.fallback_total if parser.fallback_total is not None else len(parser.fallbacks)
    if n_fallback:
        yield Notice(
            message=f"{n_fallback} of {info.n_tensors} tensors fell back to another type: their row size "
            f"does not fit {qtype.name}'s block size"
        )
    yield Finished(
        result=QuantizeResult(
            input=resolved.path, output=out, name=registered, type=qtype.name,
            input_size=info.size, output_size=out_info.size,
            input_bpw=round(info.bits_per_weight, 3), output_bpw=round(out_info.bits_per_weight, 3),
            seconds=round(seconds, 3), n_tensors=info.n_tensors, n_quantized=parser.n_quantized,
            n_fallback=n_fallback, fallbacks=parser.fallbacks, tensor_types=out_info.tensor_types,
            imatrix=options.imatrix or options.imatrix_out,
        )
    )


def run_quantize(
    model: str, options: QuantizeOptions, on_event: Callable[[Any], None] | None = None
) -> QuantizeResult:
    """Convenience: drive `quantize` to the end and return its result."""
    result = None
    for event in quantize(model, options):  # moves to selfhost.events.run_to_end with the shared vocabulary
        if on_event is not None:
            on_event(event)
        if isinstance(event, Finished):
            result = event.result
    assert result is not None
    return result


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
) -> Iterator[Any]:
    """Compute the imatrix of `model` over the calibration text (events), then load it like a file.
    Without --imatrix-out it is written beside the output and removed once loaded."""
    from selfhost.quantize.calibrate import compute_imatrix
    from selfhost.quantize.imatrix import load_imatrix

    text, dataset = calibration
    keep = options.imatrix_out is not None
    target = Path(options.imatrix_out).expanduser() if keep else out.with_name(f".{out.stem}.imatrix.gguf")
    try:
        yield from compute_imatrix(
            model, text, target, dataset=dataset, chunk_size=options.chunk_size,
            max_chunks=options.calibration_chunks, threads=options.threads,
        )
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
