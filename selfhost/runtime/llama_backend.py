"""The one place that talks to llama-cpp-python directly about loading, logs and backends.

- `llama()` imports llama_cpp lazily (it is heavy) and routes llama.cpp's C log output into Python.
- `capture_logs(handler)` collects llama.cpp log lines (quantize progress, load reports) instead of
  letting them spill on the terminal; without a handler they are dropped (SELFHOST_DEBUG=1 echoes them).
- `load_model(...)` validates the GGUF, loads it with explicit n_ctx / n_gpu_layers (never the library's
  512 / 0 defaults) and reports what it got: backend and layers offloaded, read from llama.cpp's own log.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from selfhost import env
from selfhost.errors import DependencyError, ModelLoadError

LogHandler = Callable[[int, str], None]  # (ggml log level, text)

_handlers: list[LogHandler] = []
_lock = threading.Lock()
_callback: Any = None  # keeps the ctypes callback alive
_GPU_WORDS = ("CUDA", "Metal", "Vulkan", "SYCL", "HIP", "ROCm", "OpenCL", "MUSA", "CANN")


def llama() -> Any:
    """Import llama_cpp (lazily) and install selfhost's log router once."""
    global _callback
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - llama-cpp-python is a hard dependency
        raise DependencyError(
            "llama-cpp-python is not installed or failed to load",
            hint="see the README: build it with CMAKE_ARGS for your CPU/GPU",
        ) from exc
    if _callback is None:

        @llama_cpp.llama_log_callback
        def _route(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", "replace")
            with _lock:
                handlers = list(_handlers)
            for handler in handlers:
                handler(level, line)
            if not handlers and env.debug():
                sys.stderr.write(line)

        _callback = _route
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    return llama_cpp


@contextlib.contextmanager
def capture_logs(handler: LogHandler | None = None) -> Iterator[list[str]]:
    """Collect llama.cpp log text while the block runs; also forward each piece to `handler`."""
    lines: list[str] = []

    def collect(level: int, text: str) -> None:
        lines.append(text)
        if handler is not None:
            handler(level, text)

    llama()
    with _lock:
        _handlers.append(collect)
    try:
        yield lines
    finally:
        with _lock:
            _handlers.remove(collect)


class BackendInfo(BaseModel):
    name: str  # "CPU", "CUDA", "Metal", ...
    gpu_offload: bool
    system_info: str
    llama_cpp_version: str


def backend_info() -> BackendInfo:
    """Which compute backend this llama-cpp-python build has (measured from the library, not assumed)."""
    lib = llama()
    info = lib.llama_print_system_info().decode("utf-8", "replace")
    gpu = bool(lib.llama_supports_gpu_offload())
    name = next((w for w in _GPU_WORDS if re.search(rf"\b{w}\b", info, re.IGNORECASE)), None)
    return BackendInfo(
        name=name if gpu and name else ("GPU" if gpu else "CPU"),
        gpu_offload=gpu,
        system_info=info.strip(),
        llama_cpp_version=getattr(lib, "__version__", "unknown"),
    )


class LoadReport(BaseModel):
    path: Path
    n_ctx: int
    n_ctx_train: int
    n_layers: int
    layers_offloaded: int
    backend: str  # backend the weights actually run on: "CPU" when nothing was offloaded
    devices: list[str]  # e.g. ["CUDA0 (NVIDIA H100 80GB HBM3)"]
    n_threads: int


_OFFLOAD_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_DEVICE_RE = re.compile(r"using device (\S+) \(([^)]*)\)")
_N_LAYER_RE = re.compile(r"print_info: n_layer\s*=\s*(\d+)")


def load_model(
    path: Path,
    *,
    n_ctx: int,
    n_gpu_layers: int = 0,
    n_threads: int | None = None,
    n_batch: int = 512,
    logits_all: bool = False,
    seed: int | None = None,
    vocab_only: bool = False,
    info: Any = None,
    **kwargs: Any,
) -> tuple[Any, LoadReport]:
    """Load a validated GGUF with llama-cpp-python; return (Llama, LoadReport). Raises ModelLoadError.

    `info`: the caller's GGUFInfo of `path` when it has validated the file already (not read again)."""
    from selfhost.runtime import gguf_info

    if info is None:
        gguf_info.inspect(path)  # llama.cpp aborts the process on some bad files: refuse them first
    lib = llama()
    threads = n_threads or default_threads()
    extra: dict[str, Any] = dict(kwargs)
    if seed is not None:
        extra["seed"] = seed
    sink = io.StringIO()
    with capture_logs() as log, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        try:
            # verbose=True keeps llama-cpp-python from dup2()-ing fds 1/2 (breaks under test runners);
            # the C log goes to our router and Python prints to `sink`.
            model = lib.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_batch, n_ctx),
                n_gpu_layers=n_gpu_layers,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                vocab_only=vocab_only,
                verbose=True,
                **extra,
            )
        except (ValueError, RuntimeError, OSError, _template_error()) as exc:  # the template compiles at load
            tail = "".join(log)[-300:].strip().replace("\n", " | ")
            raise ModelLoadError(f"llama.cpp could not load {path}: {exc}", hint=tail or None) from exc
    text = "".join(log)
    found = _OFFLOAD_RE.search(text)
    offloaded, n_layers = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    if not found and (layers := _N_LAYER_RE.search(text)):
        n_layers = int(layers.group(1))  # CPU-only builds do not log an offload line
    devices = [f"{m.group(1)} ({m.group(2)})" for m in _DEVICE_RE.finditer(text)]
    gpu_name = backend_info().name if offloaded else "CPU"
    report = LoadReport(
        path=Path(path),
        n_ctx=n_ctx if vocab_only else model.n_ctx(),
        n_ctx_train=lib.llama_model_n_ctx_train(model.model),
        n_layers=n_layers,
        layers_offloaded=offloaded,
        backend=gpu_name,
        devices=devices,
        n_threads=threads,
    )
    return model, report


def default_gpu_layers() -> int:
    """The one default for every model selfhost loads: all layers on the GPU when this build can
    offload, none otherwise."""
    return -1 if backend_info().gpu_offload else 0


def _template_error() -> type[Exception]:
    import jinja2

    return jinja2.TemplateError


def default_threads() -> int:
    """Physical-ish core count: llama.cpp runs best with one thread per core."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        count = os.cpu_count() or 1
    return max(1, count)
