"""Compute an importance matrix in-process, as llama.cpp's `llama-imatrix` does, and write it as GGUF.

The text is tokenized and cut into chunks of `chunk_size` tokens; each chunk is evaluated from an
empty KV cache (BOS first when the model wants one). llama.cpp's scheduler calls back
(`cb_eval` in the context parameters) before and after each graph node: for every matrix
multiplication whose weight is a `blk.*` tensor we read the input activations (src1) and add,
per input column, the sum of squared activations and the number of rows (tokens). Mixture-of-experts
multiplications (MUL_MAT_ID) are counted per expert. The result is written in llama.cpp's GGUF
imatrix format (`<tensor>.in_sum2`, `<tensor>.counts`, `imatrix.*` metadata), which
`selfhost.quantize.imatrix.load_imatrix` and llama.cpp's own tools read.
"""

from __future__ import annotations

import ctypes
import time
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from selfhost import atomic
from selfhost.errors import DependencyError, ModelLoadError, UsageError
from selfhost.events import Events, Notice, Progress, Result
from selfhost.runtime import gguf_info

DEFAULT_CALIBRATION = "default"  # `--calibration default`: the text shipped with selfhost
MIN_CHUNK = 16  # llama-imatrix ignores multiplications over fewer rows (tokens)
_GGML_MAX_DIMS, _GGML_MAX_SRC, _GGML_MAX_OP_PARAMS, _GGML_MAX_NAME = 4, 10, 64, 64
_GGML_TYPE_F32 = 0


class ImatrixResult(BaseModel):
    """The value of `compute_imatrix`: what was written, from how much text, in how long."""

    path: Path
    n_entries: int
    n_chunks: int
    n_tokens: int
    seconds: float


IMATRIX_TASK = "imatrix chunks"


def default_calibration_text() -> str:
    """The small, licence-clean calibration text shipped with selfhost (written for it)."""
    return resources.files("selfhost.quantize").joinpath("calibration.txt").read_text("utf-8")


def calibration_text(source: str | Path) -> tuple[str, str]:
    """(text, dataset name) for `--calibration FILE|default`."""
    if str(source) == DEFAULT_CALIBRATION:
        return default_calibration_text(), "selfhost:calibration.txt"
    from selfhost.quantize.perplexity import read_text

    return read_text(Path(source)), Path(source).name


# -- ggml's tensor, as ggml.h lays it out -----------------------------------------------------
class _Tensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * _GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * _GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (_GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * _GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * _GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type, padding[4]


class _Ggml:
    """The few libggml functions the collector needs, with the op ids of this build."""

    def __init__(self) -> None:
        from selfhost.runtime.llama_private import ggml_library

        lib = ggml_library()
        lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.ggml_tensor_overhead.restype, lib.ggml_tensor_overhead.argtypes = ctypes.c_size_t, []
        lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                ctypes.c_size_t]
        self.lib = lib
        if lib.ggml_tensor_overhead() != _GGML_OBJECT_SIZE + ctypes.sizeof(_Tensor):
            raise DependencyError(
                "this llama-cpp-python build lays out ggml tensors differently than selfhost expects",
                hint="use --imatrix with a file made by llama-imatrix instead of --calibration",
            )
        ops: dict[str, int] = {}
        for op in range(128):  # MUL_MAT / MUL_MAT_ID come early in enum ggml_op
            ops[(lib.ggml_op_name(op) or b"").decode()] = op
            if "MUL_MAT" in ops and "MUL_MAT_ID" in ops:
                break
        self.mul_mat, self.mul_mat_id = ops.get("MUL_MAT"), ops.get("MUL_MAT_ID")
        if self.mul_mat is None:
            raise DependencyError("cannot find ggml's MUL_MAT operation in this llama-cpp-python build")

    def host_array(self, t: _Tensor, ptr: int, dtype: Any) -> Any:
        """The tensor's bytes as a strided numpy view (copied from a device buffer when needed)."""
        import numpy as np

        shape = tuple(int(n) for n in reversed(t.ne[:4]))
        strides = tuple(int(n) for n in reversed(t.nb[:4]))
        if t.nb[0] != np.dtype(dtype).itemsize:
            raise ModelLoadError(f"unexpected activation layout in {t.name.decode(errors='replace')}")
        nbytes = t.nb[0] + sum((t.ne[i] - 1) * t.nb[i] for i in range(4))  # as ggml_nbytes
        if self.lib.ggml_backend_buffer_is_host(t.buffer):
            base: Any = (ctypes.c_char * nbytes).from_address(t.data)
        else:
            base = np.empty(nbytes, dtype=np.uint8)
            self.lib.ggml_backend_tensor_get(ptr, base.ctypes.data, 0, nbytes)
        return np.ndarray(shape, dtype=dtype, buffer=base, strides=strides)


class Collector:
    """The eval callback: sums of squared activations and counts per weight matrix (per expert)."""

    def __init__(self, ggml: _Ggml) -> None:
        self.ggml = ggml
        self.sums: dict[str, Any] = {}  # name -> float64 [n_mat, n_cols]
        self.counts: dict[str, Any] = {}  # name -> float64 [n_mat]
        self.error: BaseException | None = None

    def __call__(self, t_ptr: int, ask: bool, _user: Any) -> bool:
        try:
            return self._collect(t_ptr, ask)
        except BaseException as exc:  # noqa: BLE001 - a C callback must not raise; reported after decode
            self.error = self.error or exc
            return False

    def _weight(self, t: _Tensor) -> tuple[_Tensor, _Tensor, str] | None:
        if t.op not in (self.ggml.mul_mat, self.ggml.mul_mat_id) or not t.src[0] or not t.src[1]:
            return None
        src0, src1 = _Tensor.from_address(t.src[0]), _Tensor.from_address(t.src[1])
        name = _weight_name(src0.name.decode("utf-8", "replace"))
        if not name.startswith("blk.") or src1.type != _GGML_TYPE_F32:
            return None
        if t.op == self.ggml.mul_mat and src1.ne[1] < MIN_CHUNK:
            return None
        return src0, src1, name

    def _collect(self, t_ptr: int, ask: bool) -> bool:
        import numpy as np

        t = _Tensor.from_address(t_ptr)
        found = self._weight(t)
        if found is None:
            return False
        if ask:
            return True
        src0, src1, name = found
        x = self.ggml.host_array(src1, t.src[1], np.float32)  # [ne3, ne2, ne1, ne0]
        n_cols = src1.ne[0]
        if t.op == self.ggml.mul_mat_id:
            n_experts = src0.ne[2]
            ids_t = _Tensor.from_address(t.src[2])
            ids = self.ggml.host_array(ids_t, t.src[2], np.int32)[0, 0]  # [n_tokens, n_used]
            rows = x[0][:, np.arange(ids.shape[1]) % src1.ne[1], :]  # [n_tokens, n_used, n_cols]
            sums, counts = self._entry(name, n_experts, n_cols)
            flat_ids = ids.reshape(-1).astype(np.int64)
            np.add.at(sums, flat_ids, np.square(rows.reshape(-1, n_cols), dtype=np.float64))
            counts += np.bincount(flat_ids, minlength=n_experts)
        else:
            n_mat = src0.ne[2] * src0.ne[3]
            sums, counts = self._entry(name, n_mat, n_cols)
            squares = np.square(x, dtype=np.float64).sum(axis=2)  # [ne3, ne2, n_cols]
            for i3 in range(src1.ne[3]):
                for i2 in range(src1.ne[2]):
                    mat = (i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])
                    sums[mat] += squares[i3, i2]
            counts += src1.ne[1] * src1.ne[2] * src1.ne[3] // n_mat
        return True

    def _entry(self, name: str, n_mat: int, n_cols: int) -> tuple[Any, Any]:
        import numpy as np

        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, n_cols), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.float64)
        if self.sums[name].shape != (n_mat, n_cols):
            raise ModelLoadError(f"inconsistent activation shape for {name}")
        return self.sums[name], self.counts[name]


def _weight_name(name: str) -> str:
    """'CUDA0#blk.0.attn_k.weight#0' -> 'blk.0.attn_k.weight' (as llama-imatrix filters names)."""
    if "#" in name:
        name = name.split("#")[1]
    return name


# -- the computation ---------------------------------------------------------------------------
def compute_imatrix(
    model: Path,
    text: str,
    out: Path,
    *,
    dataset: str = "calibration",
    chunk_size: int = 512,
    max_chunks: int | None = None,
    threads: int | None = None,
) -> Events:
    """Evaluate `text` with the model at `model`, collect activations, write the imatrix to `out`.

    Yields a Notice, one Progress per chunk (metrics: seconds, eta_seconds), a Notice with the summary,
    and ends with Result(ImatrixResult)."""
    from selfhost.runtime.llama_backend import default_threads, llama
    from selfhost.runtime.llama_context import model_and_context

    if chunk_size < MIN_CHUNK:
        raise UsageError(f"--chunk-size must be at least {MIN_CHUNK} tokens")
    if max_chunks is not None and max_chunks < 1:
        raise UsageError("--calibration-chunks must be at least 1")
    info = gguf_info.inspect(model)
    if info.context_length and chunk_size > info.context_length:
        chunk_size = info.context_length  # past the trained context llama.cpp may abort
    lib = llama()
    ggml = _Ggml()
    collector = Collector(ggml)
    callback = lib.ggml_backend_sched_eval_callback(collector)
    threads = threads or default_threads()

    # one chunk is one graph (n_batch = n_ctx), evaluated on the CPU; the callback sees every node
    opened = model_and_context(model, n_ctx=chunk_size, threads=threads, eval_callback=callback)
    with opened as (llm_model, ctx):
        vocab = lib.llama_model_get_vocab(llm_model)
        tokens = _tokenize(lib, vocab, text)
        n_chunks = len(tokens) // chunk_size
        if max_chunks is not None:
            n_chunks = min(n_chunks, max_chunks)
        if n_chunks < 1:
            raise UsageError(
                f"the calibration text is too short: {len(tokens)} tokens, need at least {chunk_size}",
                hint="use a longer text or a smaller --chunk-size",
            )
        yield Notice(f"computing the importance matrix: {n_chunks} chunks of {chunk_size} tokens")
        bos = lib.llama_vocab_bos(vocab) if lib.llama_vocab_get_add_bos(vocab) else -1
        started = time.perf_counter()
        for i in range(n_chunks):
            chunk = list(tokens[i * chunk_size : (i + 1) * chunk_size])
            if bos >= 0:
                chunk[0] = bos
            _eval_chunk(lib, ctx, chunk)
            if collector.error is not None:
                raise collector.error
            seconds = time.perf_counter() - started
            eta = seconds / (i + 1) * (n_chunks - i - 1)
            yield Progress(IMATRIX_TASK, i + 1, n_chunks, unit="chunks",
                           metrics={"seconds": seconds, "eta_seconds": eta})
    if not collector.sums:
        raise ModelLoadError(f"no weight matrix of {model.name} reported activations: no imatrix to write")
    write_imatrix(out, collector.sums, collector.counts, datasets=[dataset], chunk_count=n_chunks,
                  chunk_size=chunk_size)
    result = ImatrixResult(path=out, n_entries=len(collector.sums), n_chunks=n_chunks,
                           n_tokens=n_chunks * chunk_size, seconds=time.perf_counter() - started)
    per_1k = result.seconds / result.n_tokens * 1000 if result.n_tokens else 0.0
    yield Notice(
        f"importance matrix: {result.n_entries} weight matrices, {result.n_tokens} tokens in "
        f"{result.seconds:.1f} s ({per_1k:.1f} s per 1k tokens)"
    )
    yield Result(result)


def _tokenize(lib: Any, vocab: Any, text: str) -> list[int]:
    data = text.encode("utf-8")
    size = len(data) + 16
    buf = (lib.llama_token * size)()
    n = lib.llama_tokenize(vocab, data, len(data), buf, size, False, False)
    if n < 0:
        buf = (lib.llama_token * -n)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, -n, False, False)
    return list(buf[:n])


def _eval_chunk(lib: Any, ctx: Any, chunk: list[int]) -> None:
    """Evaluate one chunk from an empty cache. Every position is an output, as in llama-imatrix: otherwise
    llama.cpp prunes the last layer's rows to the last token and its matrices see too few rows."""
    from selfhost.runtime.llama_context import fill_sequence

    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
    batch = lib.llama_batch_init(len(chunk), 0, 1)
    try:
        fill_sequence(batch, chunk, all_logits=True)
        rc = lib.llama_decode(ctx, batch)
    finally:
        lib.llama_batch_free(batch)
    if rc != 0:
        raise ModelLoadError(f"llama.cpp failed to evaluate a calibration chunk (llama_decode returned {rc})")


# -- the GGUF imatrix format -------------------------------------------------------------------
def write_imatrix(
    out: Path,
    sums: dict[str, Any],
    counts: dict[str, Any],
    *,
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write llama.cpp's GGUF imatrix: per tensor `.in_sum2` [n_mat x n_cols] and `.counts` [n_mat x 1]."""
    import gguf
    import numpy as np

    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="imatrix")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", datasets)
        writer.add_uint32("imatrix.chunk_count", chunk_count)
        writer.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(sums):
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums[name], dtype=np.float32))
            writer.add_tensor(f"{name}.counts",
                              np.ascontiguousarray(counts[name].reshape(-1, 1), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
