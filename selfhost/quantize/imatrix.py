"""Read an importance matrix made by llama.cpp's `llama-imatrix` (GGUF or legacy .dat format).

llama.cpp wants, per weight tensor, the mean squared activation of each input column. The GGUF
format stores sums (`<tensor>.in_sum2`) and per-expert counts (`<tensor>.counts`); the legacy
format stores values already scaled by the number of calls. Both become {tensor: float32 array},
exactly as llama-quantize's `load_imatrix` prepares them before `llama_model_quantize`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from selfhost.errors import GGUFError, NotFoundError


class ImatrixData(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: Path
    values: dict[str, Any]  # tensor name -> 1-D float32 numpy array
    datasets: list[str] = []
    chunk_count: int = 0


def load_imatrix(path: Path) -> ImatrixData:
    """Load and normalise an imatrix file. Raises NotFoundError / GGUFError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no such imatrix file: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    values = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    if not values.values:
        raise GGUFError(f"{path} holds no importance-matrix entries")
    return values


def _load_gguf(path: Path) -> ImatrixData:
    import numpy as np
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
        fields = reader.fields
    except Exception as exc:  # the gguf package raises assorted errors on malformed input
        raise GGUFError(f"{path} is not a readable imatrix file ({type(exc).__name__}: {exc})") from exc

    values: dict[str, Any] = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(base + ".counts")
        if counts is None or counts.size == 0 or sums.size % counts.size:
            raise GGUFError(f"{path}: entry '{base}' has no matching counts", hint="regenerate the imatrix")
        per_expert = sums.reshape(counts.size, -1)
        scale = np.where(counts > 0, counts, 1.0)[:, None]
        mean = np.where(counts[:, None] > 0, per_expert / scale, 1.0)
        values[base] = np.ascontiguousarray(mean.reshape(-1), dtype=np.float32)
    if not values and tensors:
        raise GGUFError(
            f"{path} is a GGUF file but not an importance matrix", hint="pass llama-imatrix's output"
        )
    return ImatrixData(
        path=path,
        values=values,
        datasets=_strings(fields.get("imatrix.datasets")),
        chunk_count=_int(fields.get("imatrix.chunk_count")),
    )


def _load_legacy(path: Path) -> ImatrixData:
    """Legacy imatrix.dat: n, then n x (len, name, ncall, nval, float[nval]), then optional trailer."""
    import numpy as np

    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise GGUFError(f"{path} is not an imatrix file (truncated or wrong format)")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise GGUFError(f"{path} is not an imatrix file (bad entry count {n_entries})")
    values: dict[str, Any] = {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        if not 0 < name_len < 4096:
            raise GGUFError(f"{path} is not an imatrix file (bad name length)")
        name = take(f"<{name_len}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval <= 0:
            raise GGUFError(f"{path} is not an imatrix file (bad value count for '{name}')")
        start = pos
        take(f"<{nval * 4}x")  # bounds check before reading
        raw = np.frombuffer(data, dtype="<f4", count=nval, offset=start).astype(np.float32)
        values[name] = raw / ncall if ncall > 0 else raw
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (ds_len,) = take("<i")
            if 0 < ds_len <= len(data) - pos:
                datasets = [take(f"<{ds_len}s")[0].decode("utf-8", "replace")]
    return ImatrixData(path=path, values=values, datasets=datasets, chunk_count=chunk_count)


def _strings(field: Any) -> list[str]:
    if field is None:
        return []
    return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]


def _int(field: Any) -> int:
    if field is None or not field.data:
        return 0
    return int(field.parts[field.data[0]][0])
