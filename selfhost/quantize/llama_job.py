"""llama.cpp's `llama_model_quantize` for a planned job: its parameters (with an imatrix), the call on a
worker thread, and its log turned into one Progress per tensor. The output is written to a temp file beside
the destination and renamed only when llama.cpp succeeded and it reads back as the requested type."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from selfhost import atomic
from selfhost.errors import DiskSpaceError, IntegrityError, ModelLoadError, SelfhostError
from selfhost.events import Event, Progress
from selfhost.quantize.plan import QuantizeJob, QuantizeOptions
from selfhost.runtime import gguf_info

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


def run_llama(
    job: QuantizeJob, imatrix: Any, options: QuantizeOptions
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


def _llama_params(
    lib: Any, job: QuantizeJob, imatrix: Any, options: QuantizeOptions
) -> tuple[Any, list[Any]]:
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
            atexit.register(unlink_quietly, tmp)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["rc"]


def _failure(parser: LogParser, job: QuantizeJob) -> SelfhostError:
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


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        Path(path).unlink()


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
