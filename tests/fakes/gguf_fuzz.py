"""A corpus of hostile variants of the tiny test model (tests/tinygguf.py), for the GGUF fuzz test.

Each variant is a file plus what is known about it: `bad=True` when llama.cpp must not get it
(it would abort, refuse it, or run garbage), `bad=False` when the change is harmless (bytes of
tensor data, a model name), `bad=None` when it depends on where a random byte flip landed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.fakes.tinygguf import write_tiny_llama

ARCH = "llama"


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    bad: bool | None


def _vt() -> Any:
    from gguf import GGUFValueType

    return GGUFValueType


def _layout(path: Path) -> tuple[int, int, list[tuple[str, int]]]:
    """(end of the key/value table, start of tensor data, [(tensor name, file position of its offset)])."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    kv_end = max(f.offset + sum(p.nbytes for p in f.parts) for f in reader.fields.values())
    offsets = []
    for t in reader.tensors:
        field = t.field
        offsets.append((t.name, field.offset + sum(p.nbytes for p in field.parts[:-1])))
    return kv_end, reader.data_offset, offsets


def hyperparameter_variants(folder: Path) -> list[Variant]:
    """Each hyper-parameter llama.cpp uses set to 0, negative, NaN, huge or nonsense."""
    vt = _vt()
    u32, i32, f32, s = vt.UINT32, vt.INT32, vt.FLOAT32, vt.STRING
    cases: dict[str, list[tuple[Any, Any]]] = {
        "block_count": [(0, u32), (-1, i32), (1000, u32), (2**31, u32), (3, u32), (1, u32), (2, i32)],
        "context_length": [(0, u32), (-1, i32), (2**32 - 1, u32), (2**31 - 1, u32), (float("nan"), f32)],
        "embedding_length": [(0, u32), (-64, i32), (2**31, u32), (65, u32), (32, u32)],
        "feed_forward_length": [(0, u32), (-1, i32), (2**31, u32), (64, u32)],
        "attention.head_count": [(0, u32), (-4, i32), (2**31, u32), (3, u32), (5, u32)],
        "attention.head_count_kv": [(0, u32), (3, u32), (2**31, u32), (8, u32)],
        "attention.layer_norm_rms_epsilon": [
            (float("nan"), f32), (-1.0, f32), (0.0, f32), (float("inf"), f32), (1, u32), (5.0, f32),
        ],
        "rope.dimension_count": [(2**31, u32), (17, u32), (-1, i32)],
        "rope.freq_base": [(float("nan"), f32), (0.0, f32), (-10000.0, f32), (float("inf"), f32)],
        "rope.scaling.type": [("bogus", s)],
        "rope.scaling.factor": [(float("nan"), f32), (-2.0, f32)],
        "expert_count": [(2**31, u32), (4, u32)],
    }  # fmt: skip
    variants = []
    for key, values in cases.items():
        for i, (value, vtype) in enumerate(values):
            path = folder / f"hp-{key}-{i}.gguf"
            write_tiny_llama(path, kv_overrides={f"{ARCH}.{key}": (value, vtype)})
            variants.append(Variant(f"{key}={value!r} ({vtype.name})", path, True))
    drops = ["block_count", "context_length", "embedding_length", "attention.head_count"]
    for key in drops:
        path = folder / f"hp-drop-{key}.gguf"
        write_tiny_llama(path, kv_overrides={f"{ARCH}.{key}": None})
        variants.append(Variant(f"no {key}", path, True))
    return variants


def tokenizer_variants(folder: Path) -> list[Variant]:
    vt = _vt()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("tokenizer bert", {"tokenizer.ggml.model": ("bert", vt.STRING)}),
        ("tokenizer rwkv", {"tokenizer.ggml.model": ("rwkv", vt.STRING)}),
        ("tokenizer t5", {"tokenizer.ggml.model": ("t5", vt.STRING)}),
        ("tokenizer none", {"tokenizer.ggml.model": ("none", vt.STRING)}),
        ("tokenizer made up", {"tokenizer.ggml.model": ("sentencepiece-9", vt.STRING)}),
        ("no tokenizer model", {"tokenizer.ggml.model": None}),
        ("no tokens", {"tokenizer.ggml.tokens": None}),
        ("no merges", {"tokenizer.ggml.merges": None}),
        ("short token types", {"tokenizer.ggml.token_type": ([1] * 10, vt.ARRAY)}),
        ("bos id as string", {"tokenizer.ggml.bos_token_id": ("1", vt.STRING)}),
        ("architecture made up", {"general.architecture": ("llama9000", vt.STRING)}),
        ("alignment 3", {"general.alignment": (3, vt.UINT32)}),
    ]
    variants = []
    for i, (label, overrides) in enumerate(cases):
        path = folder / f"tok-{i}.gguf"
        write_tiny_llama(path, kv_overrides=overrides)
        variants.append(Variant(label, path, True))
    return variants


def _without(name: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return lambda t: {k: v for k, v in t.items() if k != name}


def _replace(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[..., dict[str, np.ndarray]]:
    return lambda t: {k: (make(v) if k == name else v) for k, v in t.items()}


def tensor_variants(folder: Path) -> list[Variant]:
    """Missing, extra, duplicated, reshaped or retyped tensors."""
    cases: list[tuple[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]] = [
        ("no token_embd", _without("token_embd.weight")),
        ("no output_norm", _without("output_norm.weight")),
        ("no blk.1.attn_k", _without("blk.1.attn_k.weight")),
        ("no blk.0.ffn_down", _without("blk.0.ffn_down.weight")),
        ("no blk.0.attn_norm", _without("blk.0.attn_norm.weight")),
        ("attn_q transposed", _replace("blk.0.attn_q.weight", lambda a: np.ascontiguousarray(a[:32]))),
        ("ffn_up transposed", _replace("blk.1.ffn_up.weight", lambda a: np.ascontiguousarray(a.T))),
        ("token_embd short", _replace("token_embd.weight", lambda a: np.ascontiguousarray(a[:200]))),
        ("output wrong width", _replace("output.weight", lambda a: np.ascontiguousarray(a[:, :32]))),
        ("norm as F16", _replace("blk.0.ffn_norm.weight", lambda a: a.astype(np.float16))),
        ("weight as I32", _replace("blk.0.attn_v.weight", lambda a: (a * 1000).astype(np.int32))),
        ("weight as F64", _replace("blk.1.attn_v.weight", lambda a: a.astype(np.float64))),
        ("norm as 2-D", _replace("output_norm.weight", lambda a: np.ones((2, 32), np.float32))),
        ("extra tensor", lambda t: {**t, "blk.0.attn_bogus.weight": np.ones(64, np.float32)}),
        ("block 2 of 2", lambda t: {**t, "blk.2.attn_norm.weight": np.ones(64, np.float32)}),
        ("no block 1", lambda t: {k: v for k, v in t.items() if not k.startswith("blk.1.")}),
    ]
    variants = []
    for i, (label, edit) in enumerate(cases):
        path = folder / f"tensor-{i}.gguf"
        write_tiny_llama(path, edit_tensors=edit)
        variants.append(Variant(label, path, True))
    # A duplicated tensor: the writer refuses to write one, so rename in place (same length).
    path = folder / "tensor-duplicate.gguf"
    write_tiny_llama(path)
    raw = path.read_bytes()
    at = raw.index(b"blk.1.attn_q.weight")
    path.write_bytes(raw[:at] + b"blk.0.attn_q.weight" + raw[at + len(b"blk.1.attn_q.weight") :])
    variants.append(Variant("duplicate tensor", path, True))
    return variants


def byte_variants(folder: Path, base: Path, n_flips: int = 70, seed: int = 12) -> list[Variant]:
    """Truncations, random byte flips in the header/KV/tensor table, moved offsets, flips in the data."""
    raw = base.read_bytes()
    kv_end, data_start, offsets = _layout(base)
    variants = []
    cuts = [0, 3, 4, 8, 16, 23, 24, 40, 100, kv_end // 3, kv_end // 2, kv_end - 1, kv_end + 5,
            (kv_end + data_start) // 2, data_start - 1, data_start, data_start + 1000, len(raw) // 2,
            len(raw) - 4096, len(raw) - 1]  # fmt: skip
    for cut in cuts:
        path = folder / f"cut-{cut}.gguf"
        path.write_bytes(raw[:cut])
        variants.append(Variant(f"truncated at {cut}", path, True))
    rng = random.Random(seed)
    for i in range(n_flips):
        at = rng.randrange(4, data_start)  # header, key/value table, tensor table, padding
        data = bytearray(raw)
        data[at] ^= 1 << rng.randrange(8) if i % 2 else rng.randrange(1, 256)
        path = folder / f"flip-{i}-{at}.gguf"
        path.write_bytes(bytes(data))
        variants.append(Variant(f"byte {at} flipped", path, None))
    for name, pos in offsets[1::7]:
        for delta in (1, 32, -32):
            value = struct.unpack_from("<Q", raw, pos)[0] + delta
            data = bytearray(raw)
            struct.pack_into("<Q", data, pos, value % 2**64)
            path = folder / f"offset-{name}-{delta}.gguf"
            path.write_bytes(bytes(data))
            variants.append(Variant(f"{name} offset {delta:+}", path, True))
    for i in range(4):  # tensor data only: harmless to the loader
        at = rng.randrange(data_start, len(raw))
        data = bytearray(raw)
        data[at] ^= 0x10
        path = folder / f"data-flip-{i}.gguf"
        path.write_bytes(bytes(data))
        variants.append(Variant(f"data byte {at} flipped", path, False))
    return variants


def corpus(folder: Path) -> list[Variant]:
    folder.mkdir(parents=True, exist_ok=True)
    base = write_tiny_llama(folder / "base.gguf")
    return (
        [Variant("unchanged", base, False)]
        + hyperparameter_variants(folder)
        + tokenizer_variants(folder)
        + tensor_variants(folder)
        + byte_variants(folder, base)
    )
