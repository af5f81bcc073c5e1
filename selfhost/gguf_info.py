"""Validate GGUF files before llama.cpp touches them, and read their metadata.

llama.cpp aborts (or worse) on malformed files; every entry point that hands a file to it
calls `inspect()` first, which checks the magic, version, tensor table and that every
tensor's data lies inside the file.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from selfhost.errors import GGUFError, NotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)


class GGUFInfo(BaseModel):
    path: Path
    size: int
    version: int
    architecture: str
    name: str | None = None
    n_tensors: int
    n_params: int
    context_length: int | None = None
    n_layers: int | None = None
    embedding_length: int | None = None
    vocab_size: int | None = None
    file_type: str | None = None  # from general.file_type, e.g. "MOSTLY_Q4_K_M"
    tensor_types: dict[str, int]  # ggml type name -> tensor count
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tokenizer_model: str | None = None

    @property
    def quant(self) -> str:
        """Best short name for the quantization: 'Q4_K_M', 'F16', ... (dominant tensor type if unknown)."""
        if self.file_type:
            return self.file_type.removeprefix("MOSTLY_").removeprefix("ALL_")
        if self.tensor_types:
            return max(self.tensor_types.items(), key=lambda kv: kv[1])[0]
        return "unknown"

    @property
    def bits_per_weight(self) -> float:
        return self.size * 8 / self.n_params if self.n_params else 0.0


def check_header(path: Path) -> None:
    """Cheap check: the file exists, is big enough and starts with a GGUF header we understand."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise GGUFError(f"{path} is a directory, not a .gguf file")
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (bad magic)", hint="pass a .gguf model file")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path} has unsupported GGUF version {version}")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise GGUFError(f"{path} has an implausible header ({n_tensors} tensors, {n_kv} keys)")


def inspect(path: Path) -> GGUFInfo:
    """Fully validate `path` as a GGUF model and return its metadata. Raises GGUFError."""
    path = Path(path)
    check_header(path)
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        fields = {name: _field_value(f) for name, f in reader.fields.items()}
        tensors = list(reader.tensors)
    except GGUFError:
        raise
    except Exception as exc:  # the gguf package raises assorted errors on malformed input
        raise GGUFError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc

    if not tensors:
        raise GGUFError(f"{path} holds no tensors")
    for t in tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(f"{path} is truncated: tensor '{t.name}' ends at byte {end}, file has {size}")

    arch = str(fields.get("general.architecture") or "unknown")
    type_counts = Counter(t.tensor_type.name for t in tensors)
    tokens = fields.get("tokenizer.ggml.tokens")
    return GGUFInfo(
        path=path,
        size=size,
        version=int(fields.get("GGUF.version", 3) or 3),
        architecture=arch,
        name=_opt_str(fields.get("general.name")),
        n_tensors=len(tensors),
        n_params=sum(int(t.n_elements) for t in tensors),
        context_length=_opt_int(fields.get(f"{arch}.context_length")),
        n_layers=_opt_int(fields.get(f"{arch}.block_count")),
        embedding_length=_opt_int(fields.get(f"{arch}.embedding_length")),
        vocab_size=len(tokens) if isinstance(tokens, list) else None,
        file_type=_file_type_name(fields.get("general.file_type")),
        tensor_types=dict(type_counts),
        chat_template=_opt_str(fields.get("tokenizer.chat_template")),
        bos_token_id=_opt_int(fields.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_opt_int(fields.get("tokenizer.ggml.eos_token_id")),
        tokenizer_model=_opt_str(fields.get("tokenizer.ggml.model")),
    )


def _field_value(field: Any) -> Any:
    """Decode a ReaderField into a Python value (str, int, float, bool or list of those)."""
    from gguf import GGUFValueType

    if not field.types:
        return None
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]].tolist()[0]


def _file_type_name(value: Any) -> str | None:
    if value is None:
        return None
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(value)).name
    except ValueError:
        return f"type {value}"


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
