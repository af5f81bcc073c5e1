"""Model-aware GGUF checks: what llama.cpp would abort on, or refuse, is refused here first.

`gguf_info.inspect` reads the tables; `check_model` then checks them the way llama.cpp's loader
will: the tensor table (unique names, 1-4 positive dimensions, known types, whole blocks per row,
aligned offsets), the hyper-parameters of the architecture (layer count within LLAMA_MAX_LAYERS
and equal to the blocks present, heads dividing the width, finite positive epsilons and rope
bases, a context length llama.cpp and memory can hold), a tokenizer llama.cpp has for that
architecture, and the tensors the architecture needs, once each, with the right shapes.
Each problem is one line: "<key or tensor>: <what is wrong>".
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

from selfhost.errors import GGUFError

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (src/llama-hparams.h): more aborts the process
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
# Longest trained context selfhost accepts: the longest real models train on ~10M tokens, and
# llama.cpp sizes some buffers by the trained context (2^31 of it took 8.75 GB for a 98 MB model).
MAX_CONTEXT = 1 << 24
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME
ROPE_SCALING_TYPES = {"none", "linear", "yarn", "longrope"}

# tokenizer.ggml.model -> the architectures it may go with (None: any language model)
TOKENIZERS: dict[str, set[str] | None] = {
    "llama": None,
    "gpt2": None,
    "t5": {"t5", "t5encoder"},
    "bert": {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "neo-bert",
             "modern-bert"},
    "rwkv": {"rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"},
    "plamo2": {"plamo2"},
    "gemma4": {"gemma4"},
}  # fmt: skip
RECURRENT = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"}  # no attention heads

# Architectures whose whole layout selfhost checks: tensors each block needs, and their shapes.
_LLAMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")
_DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")
REQUIRED_BLOCK: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_BLOCK,
    "qwen2": _LLAMA_BLOCK,
    "qwen3": _LLAMA_BLOCK + ("attn_q_norm", "attn_k_norm"),
    "gemma": _LLAMA_BLOCK + _DENSE_FFN,
    "gemma2": _LLAMA_BLOCK + _DENSE_FFN + ("post_attention_norm", "post_ffw_norm"),
    "gemma3": _LLAMA_BLOCK + _DENSE_FFN + ("post_attention_norm", "post_ffw_norm"),
    "gpt2": ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"),
}
DENSE_OR_MOE = {"llama", "qwen2", "qwen3"}
_RMS = ("attention.layer_norm_rms_epsilon",)
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "llama": _RMS, "qwen2": _RMS, "qwen3": _RMS, "gemma": _RMS, "gemma2": _RMS, "gemma3": _RMS,
    "gpt2": ("attention.layer_norm_epsilon",),
}  # fmt: skip
REQUIRED_GLOBAL: dict[str, tuple[str, ...]] = {
    "gpt2": ("token_embd", "position_embd", "output_norm"),
}
_DEFAULT_GLOBAL = ("token_embd", "output_norm")

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
Tensor = tuple[str, list[int], int, int]  # name, dims (ne0 first), ggml type, offset


def fail(reason: str) -> GGUFError:
    return GGUFError(reason)


def check_tensor_table(tensors: list[Tensor], alignment: int) -> None:
    """The checks gguf.cpp makes on the tensor table (it refuses the file, or worse, otherwise)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if alignment <= 0 or alignment & (alignment - 1):
        raise fail(f"general.alignment {alignment} is not a power of two")
    seen: set[str] = set()
    expected_offset = 0
    for name, dims, ggml_type, offset in tensors:
        if name in seen:
            raise fail(f"tensor '{name}' appears twice")
        seen.add(name)
        if not name or len(name.encode()) >= MAX_NAME:
            raise fail(f"tensor name '{name[:80]}' is empty or longer than {MAX_NAME - 1} bytes")
        if not 1 <= len(dims) <= MAX_DIMS or any(d < 1 for d in dims):
            raise fail(f"tensor '{name}' has an invalid shape {dims}")
        if math.prod(dims) >= 1 << 62:
            raise fail(f"tensor '{name}' has an implausible shape {dims}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise fail(f"tensor '{name}' has unknown type {ggml_type}") from None
        if dims[0] % block:
            raise fail(f"tensor '{name}': rows of {dims[0]} are not whole blocks of {block}")
        if offset != expected_offset:
            why = f"not aligned to {alignment}" if offset % alignment else f"expected {expected_offset}"
            raise fail(f"tensor '{name}' starts at data offset {offset}, {why}")
        n_bytes = math.prod(dims) // block * type_size
        expected_offset += -(-n_bytes // alignment) * alignment


def check_model(fields: dict[str, Any], tensors: list[Tensor]) -> None:
    """Hyper-parameters, tokenizer and tensors of a language model, as llama.cpp will use them."""
    if isinstance(fields.get("split.no"), int) and fields["split.no"] > 0:
        return  # a later shard of a split model: the metadata lives in the first one
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise fail("general.architecture is missing")
    if not _known_architecture(arch):
        raise fail(f"general.architecture '{arch[:60]}' is not one llama.cpp knows")
    _check_types(fields, arch)
    _check_floats(fields, arch)
    n_layer = _int(fields, f"{arch}.block_count", 1, MAX_LAYERS, required=True)
    _int(fields, f"{arch}.context_length", 1, MAX_CONTEXT, required=True)
    n_embd = _int(fields, f"{arch}.embedding_length", 1, 1 << 20, required=True)
    n_expert = _int(fields, f"{arch}.expert_count", 0, MAX_EXPERTS) or 0
    n_used = _int(fields, f"{arch}.expert_used_count", 0, MAX_EXPERTS) or 0
    per_layer = f"{arch}.expert_used_count#count" in fields  # an array: llama.cpp checks its maximum
    if not per_layer and (n_used > n_expert or (n_expert and not n_used)):
        raise fail(f"{arch}.expert_used_count {n_used} does not fit {arch}.expert_count {n_expert}")
    _int(fields, f"{arch}.feed_forward_length", 0, 1 << 24)
    for key in REQUIRED_KEYS.get(arch, ()):
        if f"{arch}.{key}" not in fields:
            raise fail(f"{arch}.{key} is missing")
    heads = _check_heads(fields, arch, n_embd)
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise fail(f"{arch}.rope.scaling.type '{scaling}' is not one llama.cpp knows")
    n_vocab = _check_tokenizer(fields, arch)
    _check_template_syntax(fields.get("tokenizer.chat_template"))
    if "split.count" in fields and _int(fields, "split.count", 1, 10_000) != 1:
        return  # one shard of a split model: its tensors are spread over the other files
    _check_tensors(fields, tensors, arch, n_layer, n_embd, n_vocab, heads)


def _known_architecture(arch: str) -> bool:
    """Asks the installed llama.cpp (its architecture names are string constants in libllama),
    else gguf-py's list; True when neither can tell."""
    if _llama_library_bytes() is not None:
        return _in_llama_library(arch)
    try:
        from gguf import MODEL_ARCH_NAMES
    except ImportError:  # pragma: no cover - gguf is a dependency
        return True
    return arch in MODEL_ARCH_NAMES.values()


_U32, _F32, _BOOL, _STR, _ARR = 4, 6, 7, 8, 9
_TYPE_NAMES = {_U32: "UINT32", _F32: "FLOAT32", _BOOL: "BOOL", _STR: "STRING", _ARR: "ARRAY"}
_PER_LAYER = ("feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count")
_ARRAYS = {  # array key -> element types llama.cpp accepts
    "tokenizer.ggml.tokens": {_STR}, "tokenizer.ggml.merges": {_STR},
    "tokenizer.ggml.scores": {5, _F32}, "tokenizer.ggml.token_type": {5},
}  # fmt: skip


def _check_types(fields: dict[str, Any], arch: str) -> None:
    """llama.cpp reads each key with one exact GGUF type and refuses the file on any other."""
    expected = {f"{arch}.{k}": _U32 for k in (
        "block_count", "context_length", "embedding_length", "attention.key_length",
        "attention.value_length", "rope.dimension_count", "expert_count", *_PER_LAYER)}  # fmt: skip
    expected |= {f"{arch}.{k}": _F32 for k in (
        "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
        "rope.scaling.factor")}  # fmt: skip
    expected |= {k: _STR for k in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                   f"{arch}.rope.scaling.type")}  # fmt: skip
    for key in fields:
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            expected[key] = _U32
        elif key.startswith("tokenizer.ggml.add_") and key.endswith("_token"):
            expected[key] = _BOOL
    for key, want in expected.items():
        kind = fields.get(f"{key}#type")
        per_layer = kind == _ARR and key.removeprefix(f"{arch}.") in _PER_LAYER
        if kind is not None and kind != want and not per_layer:
            raise fail(f"{key} has GGUF type {kind}; llama.cpp reads it as {_TYPE_NAMES[want]}")
    for key, element_types in _ARRAYS.items():
        kind = fields.get(f"{key}#type")
        if kind is not None and (kind != _ARR or fields.get(f"{key}#subtype") not in element_types):
            raise fail(f"{key} has the wrong GGUF type for llama.cpp")


def _check_template_syntax(template: Any) -> None:
    """llama-cpp-python compiles the chat template while loading (even for raw completion), reading it
    as a C string: a template that does not parse that way makes the file unloadable. Parsing runs
    nothing; the environment mirrors llama-cpp-python's (loop controls, {% generation %} tags)."""
    if template is None:
        return
    if not isinstance(template, str):
        raise fail("tokenizer.chat_template is not text")
    if "\0" in template:
        raise fail("tokenizer.chat_template holds a NUL byte")
    import jinja2

    try:
        _template_environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise fail(
            f"tokenizer.chat_template: the chat template is invalid (line {exc.lineno}: {exc.message})"
        ) from None
    except RecursionError:
        raise fail("tokenizer.chat_template nests too deeply to parse") from None


@functools.cache
def _template_environment() -> Any:
    import jinja2
    import jinja2.ext

    class GenerationTags(jinja2.ext.Extension):
        """HuggingFace's {% generation %}...{% endgeneration %}: a pass-through block."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[GenerationTags, jinja2.ext.loopcontrols])  # fmt: skip


def _in_llama_library(name: str) -> bool:
    """Whether `name` is one of llama.cpp's own string constants (its pre-tokenizer names are
    compared as literals in libllama). Unknown names make llama.cpp refuse the file; a fixed list
    here would refuse the pre-tokenizers of newer llama.cpp builds. True when it cannot tell."""
    library = _llama_library_bytes()
    if library is None:
        return True
    return name.isascii() and name.isprintable() and (name.encode() + b"\0") in library


@functools.cache
def _llama_library_bytes() -> bytes | None:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    candidates = sorted(folder.glob("libllama.so*")) + sorted(folder.glob("libllama*.dylib"))
    candidates += sorted(folder.glob("llama.dll"))
    files = [c for c in candidates if c.is_file() and not c.is_symlink()] or candidates
    try:
        return files[0].read_bytes() if files else None
    except OSError:
        return None


def _int(fields: dict[str, Any], key: str, low: int, high: int, required: bool = False) -> int | None:
    value = fields.get(key)
    if value is None:
        if f"{key}#count" in fields:
            return None  # a per-layer array: llama.cpp checks each entry's range itself
        if required:
            raise fail(f"{key} is missing")
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise fail(f"{key} is {value!r}, not an integer")
    if not low <= value <= high:
        raise fail(f"{key} is {value}, outside {low}..{high}")
    return value


def _check_floats(fields: dict[str, Any], arch: str) -> None:
    """Every float hyper-parameter finite; epsilons and rope bases/scales positive."""
    for key, value in fields.items():
        if not key.startswith(f"{arch}.") or not isinstance(value, float):
            continue
        if not math.isfinite(value):
            raise fail(f"{key} is {value}")
        positive = key.endswith("epsilon") or key.endswith("rope.freq_base")
        if positive and not (0 < value < (1 if key.endswith("epsilon") else 1e12)):
            raise fail(f"{key} is {value}, must be positive" + (" and below 1" if "eps" in key else ""))
        if "rope.scal" in key and value < 0:
            raise fail(f"{key} is {value}, must not be negative")
    for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
        if key in fields and not isinstance(fields[key], float):
            raise fail(f"{key} is {fields[key]!r}, not a number")


def _check_heads(fields: dict[str, Any], arch: str, n_embd: int) -> dict[str, int] | None:
    """head count, KV head count and head sizes when they are plain numbers (None: not checked)."""
    n_head = _int(fields, f"{arch}.attention.head_count", 0, 1 << 16)
    n_head_kv = _int(fields, f"{arch}.attention.head_count_kv", 0, 1 << 16)
    if n_head is None:
        if arch in REQUIRED_BLOCK and f"{arch}.attention.head_count#count" not in fields:
            raise fail(f"{arch}.attention.head_count is missing")
        return None
    if n_head == 0:
        if arch in RECURRENT:
            return None
        raise fail(f"{arch}.attention.head_count is 0")
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    if n_head_kv == 0 or n_head % n_head_kv:
        raise fail(f"{arch}.attention.head_count_kv {n_head_kv} does not divide head_count {n_head}")
    key_length = _int(fields, f"{arch}.attention.key_length", 1, 1 << 16)
    value_length = _int(fields, f"{arch}.attention.value_length", 1, 1 << 16)
    if (key_length is None or value_length is None) and n_embd % n_head:
        raise fail(f"{arch}.attention.head_count {n_head} does not divide embedding_length {n_embd}")
    head_k = key_length or n_embd // n_head
    rope_dims = _int(fields, f"{arch}.rope.dimension_count", 0, 1 << 16)
    if rope_dims is not None and (rope_dims > head_k or rope_dims % 2):
        raise fail(f"{arch}.rope.dimension_count {rope_dims} does not fit a head of {head_k}")
    return {"n_head": n_head, "n_head_kv": n_head_kv, "head_k": head_k,
            "head_v": value_length or n_embd // n_head}  # fmt: skip


def _check_tokenizer(fields: dict[str, Any], arch: str) -> int:
    """A tokenizer llama.cpp has for this architecture, with a vocabulary. Returns its size."""
    model = fields.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise fail("tokenizer.ggml.model is missing: the file has no tokenizer")
    if model not in TOKENIZERS:
        raise fail(f"tokenizer.ggml.model '{model}' is not one selfhost can run")
    archs = TOKENIZERS[model]
    if archs is not None and arch not in archs:
        raise fail(f"tokenizer.ggml.model '{model}' does not go with architecture '{arch}'")
    n_vocab = fields.get("tokenizer.ggml.tokens#count")
    if not isinstance(n_vocab, int) or not 1 <= n_vocab < 1 << 31:
        raise fail("tokenizer.ggml.tokens is missing or empty")
    pre = fields.get("tokenizer.ggml.pre")
    if isinstance(pre, str) and pre and not _in_llama_library(pre):
        raise fail(f"tokenizer.ggml.pre '{pre[:60]}' is not a pre-tokenizer this llama.cpp has")
    kinds = fields.get("tokenizer.ggml.token_type#values", set())
    allowed = set(range(7 if model == "llama" else 6))  # 6 = BYTE: only SentencePiece's <0xXX> tokens
    if not kinds <= allowed:
        raise fail(f"tokenizer.ggml.token_type holds {sorted(kinds - allowed)[0]}, not a token type "
                   f"for a '{model}' tokenizer")  # fmt: skip
    if "tokenizer.ggml.tokens#problem" in fields:
        raise fail(f"tokenizer.ggml.tokens {fields['tokenizer.ggml.tokens#problem']}")
    for key in ("tokenizer.ggml.scores#count", "tokenizer.ggml.token_type#count"):
        if key in fields and fields[key] != n_vocab:
            raise fail(f"{key.split('#')[0]} has {fields[key]} entries for {n_vocab} tokens")
    kimi = fields.get("tokenizer.ggml.pre") == "kimi-k2"  # the one BPE llama.cpp runs without merges
    if model == "gpt2" and "tokenizer.ggml.merges#count" not in fields and not kimi:  # empty is fine
        raise fail("tokenizer.ggml.merges is missing: a BPE tokenizer needs its merges")
    return n_vocab


def _check_tensors(
    fields: dict[str, Any],
    tensors: list[Tensor],
    arch: str,
    n_layer: int,
    n_embd: int,
    n_vocab: int,
    heads: dict[str, int] | None,
) -> None:
    """Blocks 0..n_layer-1 all present, the architecture's tensors there with the right shapes."""
    from gguf import GGMLQuantizationType

    by_name = {name: (dims, ggml_type) for name, dims, ggml_type, _ in tensors}
    blocks = {int(m.group(1)) for name in by_name if (m := _BLOCK_RE.match(name))}
    if blocks and blocks != set(range(n_layer)):
        extra = sorted(blocks - set(range(n_layer)))
        missing = sorted(set(range(n_layer)) - blocks)
        what = f"block {extra[0]} is present" if extra else f"block {missing[0]} is missing"
        raise fail(f"{arch}.block_count is {n_layer} but {what}")
    _check_names(by_name, arch, n_layer)
    not_weights = {GGMLQuantizationType[t] for t in ("I8", "I16", "I32", "I64", "F64")}
    for name, (dims, ggml_type) in by_name.items():
        if ggml_type in not_weights:
            kind = GGMLQuantizationType(ggml_type).name
            raise fail(f"tensor '{name}' is {kind}: llama.cpp cannot compute with it")
        if len(dims) == 1 and ggml_type != GGMLQuantizationType.F32:
            kind = GGMLQuantizationType(ggml_type).name
            raise fail(f"tensor '{name}' is {kind}: llama.cpp needs one-dimensional tensors in F32")
    for name in REQUIRED_GLOBAL.get(arch, _DEFAULT_GLOBAL):
        if f"{name}.weight" not in by_name:
            raise fail(f"tensor '{name}.weight' is missing")
    for i in range(n_layer):
        parts = REQUIRED_BLOCK.get(arch, ())
        if arch in DENSE_OR_MOE:  # a feed-forward block, or experts with their router
            moe = f"blk.{i}.ffn_gate_inp.weight" in by_name
            parts += ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") if moe else _DENSE_FFN
        for part in parts:
            if f"blk.{i}.{part}.weight" not in by_name:
                raise fail(f"tensor 'blk.{i}.{part}.weight' is missing")
    expected = _expected_shapes(fields, arch, n_embd, n_vocab, heads)
    for name, (dims, _) in by_name.items():
        base = _BLOCK_RE.sub(r"\2", name)
        want = expected.get(base)
        if want is not None and dims != want:
            raise fail(f"tensor '{name}' has shape {dims}, expected {want}")


def _check_names(by_name: dict[str, Any], arch: str, n_layer: int) -> None:
    """Every tensor is one llama.cpp loads for this architecture (an extra one makes it refuse the file)."""
    try:
        from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
    except ImportError:  # pragma: no cover
        return
    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None or arch_id not in MODEL_TENSORS:
        return
    allowed = {TENSOR_NAMES[t].replace("{bid}", "N") for t in MODEL_TENSORS[arch_id]}
    for name in by_name:
        stem, _, suffix = name.rpartition(".")
        generic = _BLOCK_RE.sub(r"blk.N.\2", stem)
        # gguf-py may lag behind llama.cpp: a name the library itself spells (blk.%d.X) is known too
        known = generic in allowed or _in_llama_library(generic.replace("blk.N.", "blk.%d."))
        if suffix not in ("weight", "bias", "scale") or not known:
            raise fail(f"tensor '{name}' is not one llama.cpp loads for architecture '{arch}'")


def _expected_shapes(
    fields: dict[str, Any], arch: str, n_embd: int, n_vocab: int, heads: dict[str, int] | None
) -> dict[str, list[int]]:
    """ggml shapes (ne0 first) of the tensors whose shape follows from the hyper-parameters."""
    if arch not in REQUIRED_BLOCK:
        return {"token_embd.weight": [n_embd, n_vocab]}
    shapes = {
        "token_embd.weight": [n_embd, n_vocab],
        "output.weight": [n_embd, n_vocab],
        "output_norm.weight": [n_embd],
        "attn_norm.weight": [n_embd],
        "ffn_norm.weight": [n_embd],
    }
    n_ff = fields.get(f"{arch}.feed_forward_length")
    if n_ff is None and f"{arch}.feed_forward_length#count" not in fields:
        n_ff = 0  # what llama.cpp assumes without the key
    if isinstance(n_ff, int):
        shapes.update({"ffn_up.weight": [n_embd, n_ff], "ffn_down.weight": [n_ff, n_embd]})
        if arch != "gpt2":
            shapes["ffn_gate.weight"] = [n_embd, n_ff]
    if heads is not None:
        q, k = heads["n_head"] * heads["head_k"], heads["n_head_kv"] * heads["head_k"]
        v, out = heads["n_head_kv"] * heads["head_v"], heads["n_head"] * heads["head_v"]
        shapes.update({
            "attn_q.weight": [n_embd, q], "attn_k.weight": [n_embd, k], "attn_v.weight": [n_embd, v],
            "attn_output.weight": [out, n_embd], "attn_qkv.weight": [n_embd, q + k + v],
        })  # fmt: skip
    if arch == "gpt2":
        n_ctx = fields.get(f"{arch}.context_length")
        shapes["position_embd.weight"] = [n_embd, n_ctx] if isinstance(n_ctx, int) else []
    return {k: v for k, v in shapes.items() if v}
