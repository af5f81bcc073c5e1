"""Validate GGUF files before llama.cpp touches them, and read their metadata.

llama.cpp aborts (or worse) on malformed files; every entry point that hands a file to it
calls `inspect()` first, which checks the magic, version, tensor table and that every
tensor's data lies inside the file, then (gguf_checks) that the model is one llama.cpp can load:
hyper-parameters, tokenizer and the tensors its architecture needs.
"""

from __future__ import annotations

import array
import mmap
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from selfhost.errors import GGUFError, NotFoundError
from selfhost.runtime import gguf_checks

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
    head_count: int | None = None
    head_count_kv: int | None = None  # < head_count with grouped-query attention
    key_length: int | None = None  # per-head K size when it is not n_embd / n_head (Gemma)
    value_length: int | None = None
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


def architecture(path: Path) -> str | None:
    """`general.architecture` of a readable GGUF, without the model checks (None if unreadable).
    Reads only up to that key (the first one in files llama.cpp's tools write)."""
    try:
        check_header(Path(path))
        fields, _, _ = _read_tables(Path(path), until="general.architecture")
    except (GGUFError, struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError):
        return None
    return _opt_str(fields.get("general.architecture"))


def inspect(path: Path) -> GGUFInfo:
    """Fully validate `path` as a GGUF model and return its metadata. Raises GGUFError."""
    path = Path(path)
    check_header(path)
    size = path.stat().st_size
    try:
        fields, tensors, data_start = _read_tables(path)
    except GGUFError as exc:
        raise GGUFError(f"{path} is corrupt or truncated ({exc.message})") from exc
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as exc:
        raise GGUFError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc

    if not tensors and int(fields.get("split.count") or 0) < 2:  # a split's first part may be metadata only
        raise GGUFError(f"{path} holds no tensors")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    type_counts: Counter[str] = Counter()
    n_params = 0
    for name, dims, ggml_type, offset in tensors:
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as exc:
            raise GGUFError(f"{path}: tensor '{name}' has unknown type {ggml_type}") from exc
        n_elements = 1
        for d in dims:
            n_elements *= d
        end = data_start + offset + n_elements // block * type_size
        if end > size:
            raise GGUFError(f"{path} is truncated: tensor '{name}' ends at byte {end}, file has {size}")
        type_counts[qtype.name] += 1
        n_params += n_elements

    try:
        gguf_checks.check_model(fields, tensors)
    except GGUFError as exc:
        raise GGUFError(f"{path} would not load: {exc.message}") from exc
    arch = str(fields.get("general.architecture") or "unknown")
    return GGUFInfo(
        path=path,
        size=size,
        version=int(fields["GGUF.version"]),
        architecture=arch,
        name=_opt_str(fields.get("general.name")),
        n_tensors=len(tensors),
        n_params=n_params,
        context_length=_opt_int(fields.get(f"{arch}.context_length")),
        n_layers=_opt_int(fields.get(f"{arch}.block_count")),
        embedding_length=_opt_int(fields.get(f"{arch}.embedding_length")),
        head_count=_opt_int(fields.get(f"{arch}.attention.head_count")),
        head_count_kv=_opt_int(fields.get(f"{arch}.attention.head_count_kv")),
        key_length=_opt_int(fields.get(f"{arch}.attention.key_length")),
        value_length=_opt_int(fields.get(f"{arch}.attention.value_length")),
        vocab_size=_opt_int(fields.get("tokenizer.ggml.tokens#count")),
        file_type=_file_type_name(fields.get("general.file_type")),
        tensor_types=dict(type_counts),
        chat_template=_opt_str(fields.get("tokenizer.chat_template")),
        bos_token_id=_opt_int(fields.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_opt_int(fields.get("tokenizer.ggml.eos_token_id")),
        tokenizer_model=_opt_str(fields.get("tokenizer.ggml.model")),
    )


# GGUF value types -> struct format of one scalar (8 = string, 9 = array)
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_MAX_STRING = 64 * 1024 * 1024


_U64 = struct.Struct("<Q")


class _Cursor:
    """Little-endian reads from a memory-mapped file, failing cleanly at the end of the file."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise GGUFError(f"unexpected end of file at byte {self.size}")
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise GGUFError(f"implausible string length {n}")
        return self.take(n).decode("utf-8")

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise GGUFError("a value runs past the end of the file")
        self.pos += n

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings (a vocabulary: ~100k of them) in one tight loop."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise GGUFError("a string array runs past the end of the file")
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise GGUFError("a string array runs past the end of the file")
        self.pos = pos

    def vocabulary_problem(self, count: int) -> str | None:
        """Read past a vocabulary of `count` tokens; say what llama.cpp would choke on: a token seen
        twice (it aborts) or one that is not UTF-8 (llama-cpp-python fails). None when it is sound."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        seen: set[bytes] = set()
        problem = None
        for index in range(count):
            if pos + 8 > size:
                raise GGUFError("a string array runs past the end of the file")
            n = unpack(buf, pos)[0]
            text = buf[pos + 8 : pos + 8 + n]
            if problem is None:
                if text in seen:
                    problem = f"holds {text.decode('utf-8', 'replace')!r} twice"
                seen.add(text)
                try:
                    text.decode("utf-8")
                except UnicodeDecodeError:
                    problem = f"token {index} is not UTF-8 text"
            pos += 8 + n
        if pos > size:
            raise GGUFError("a string array runs past the end of the file")
        self.pos = pos
        return problem


def _read_tables(
    path: Path, until: str | None = None
) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
    """Read the key/value table and the tensor table (memory-mapped) without touching tensor data.

    Arrays are skipped (49k-token vocabularies would take seconds to decode); only their length is
    kept, as 'key#count'. Returns (fields, [(name, dims, ggml type, offset)], data start offset).
    `until`: stop once that key is read (fields so far, no tensors).
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        cur.take(4)
        version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
        fields: dict[str, Any] = {"GGUF.version": version}
        for _ in range(n_kv):
            key = cur.string()
            if not key or f"{key}#type" in fields:
                raise GGUFError(f"key '{key}' is empty or appears twice")
            kind = cur.scalar("<I")
            fields[f"{key}#type"] = kind
            if kind == 8:
                fields[key] = cur.string()
            elif kind == 9:
                sub, count = cur.scalar("<I"), cur.scalar("<Q")
                fields[f"{key}#count"], fields[f"{key}#subtype"] = count, sub
                if sub == 8 and key == "tokenizer.ggml.tokens":
                    if (problem := cur.vocabulary_problem(count)) is not None:
                        fields[f"{key}#problem"] = problem
                elif sub == 8:
                    cur.skip_strings(count)
                elif key == "tokenizer.ggml.token_type" and sub == 5:  # int32: which kinds occur
                    kinds = array.array("i")
                    kinds.frombytes(cur.take(4 * count))
                    fields[f"{key}#values"] = set(kinds)
                elif sub in _SCALARS:
                    cur.skip(count * struct.calcsize(_SCALARS[sub]))
                else:
                    raise GGUFError(f"key '{key}' is an array of unsupported type {sub}")
            elif kind in _SCALARS:
                fields[key] = cur.scalar(_SCALARS[kind])
            else:
                raise GGUFError(f"key '{key}' has unknown value type {kind}")
            if key == until:
                return fields, [], 0
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 8:
                raise GGUFError(f"tensor '{name}' has {n_dims} dimensions")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            tensors.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or fields.get("general.alignment#type", 4) != 4:
            raise GGUFError("general.alignment is not a UINT32")
        gguf_checks.check_tensor_table(tensors, alignment)
        data_start = -(-cur.pos // alignment) * alignment
    return fields, tensors, data_start


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
