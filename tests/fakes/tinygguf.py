"""Write tiny random llama-architecture GGUF models for tests (no downloads).

The vocabulary is GPT-2 byte-level BPE: the 256 byte symbols, a few merges, and ChatML
special tokens, so llama.cpp can tokenize any text. Weights are random: the model loads,
evaluates and samples like a real one, but says nothing useful.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from selfhost.train.gpt.tokenizer import byte_to_unicode

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode mapping, in byte order."""
    mapping = byte_to_unicode()
    return [mapping[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    tokens = byte_symbols() + [m.replace(" ", "") for m in MERGES] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 normal, 3 control
    return tokens, types


def write_tiny_llama(
    path: Path,
    *,
    n_ctx: int = 128,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    chat_template: str | None = CHATML_TEMPLATE,
    dtype: str = "f32",
    seed: int = 0,
    name: str = "tiny-llama",
    split_max_tensors: int = 0,
    small_first_shard: bool = False,
    kv_overrides: dict[str, Any] | None = None,
    edit_tensors: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> Path:
    """Write a random llama GGUF to `path`. dtype: 'f32' or 'f16'. Returns `path`.

    With `split_max_tensors`, the gguf package writes a split GGUF like llama.cpp's gguf-split:
    `<stem>-00001-of-0000N.gguf`, ... beside `path` (each part holds at most that many tensors);
    the first part's path is returned. `small_first_shard`: the first part holds only the metadata.
    For hostile-file tests: `kv_overrides` maps a key to (value, gguf.GGUFValueType), or to None to
    drop the key; `edit_tensors` gets {name: array} in file order and returns the tensors to write."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    np_dtype = np.float32 if dtype == "f32" else np.float16
    tokens, types = vocabulary()
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(
        str(path), "llama", split_max_tensors=split_max_tensors, small_first_shard=small_first_shard
    )
    w.add_name(name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    for key, new in (kv_overrides or {}).items():
        kv = w.kv_data[0]
        kv.pop(key, None)
        if new is not None:
            w.add_key_value(key, new[0], new[1])

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np_dtype)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)  # norms stay F32, as llama.cpp expects

    tensors = {"token_embd.weight": mat(n_vocab, n_embd)}
    for i in range(n_layer):
        tensors[f"blk.{i}.attn_norm.weight"] = norm()
        for part in ("q", "k", "v", "output"):
            tensors[f"blk.{i}.attn_{part}.weight"] = mat(n_embd, n_embd)
        tensors[f"blk.{i}.ffn_norm.weight"] = norm()
        tensors[f"blk.{i}.ffn_gate.weight"] = mat(n_ff, n_embd)
        tensors[f"blk.{i}.ffn_up.weight"] = mat(n_ff, n_embd)
        tensors[f"blk.{i}.ffn_down.weight"] = mat(n_embd, n_ff)
    tensors["output_norm.weight"] = norm()
    tensors["output.weight"] = mat(n_vocab, n_embd)
    if edit_tensors is not None:
        tensors = edit_tensors(tensors)
    for tensor_name, array in tensors.items():
        w.add_tensor(tensor_name, array)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0]
    return path


def write_tiny_reranker(path: Path) -> Path:
    """A one-layer llama reranker (rank pooling) built by hand so its score means something: attention
    is uniform (q = k = 0), so the last token reads the share of digit tokens in the query/document
    pair, and that share is the score: a document with a number (a year, a count) outranks one without.
    """
    import gguf

    tokens, _ = vocabulary()
    mapping = byte_to_unicode()
    digits = [tokens.index(mapping[ord(c)]) for c in "0123456789"]

    def edit(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_vocab, n_embd = tensors["token_embd.weight"].shape
        embd = np.zeros((n_vocab, n_embd), np.float32)
        embd[:, 1] = 1.0  # every token: a constant, so RMS norm keeps the digit feature comparable
        embd[digits, 2] = 1.0  # the feature: "this token is a digit"
        tensors["token_embd.weight"] = embd
        for part in ("attn_q", "attn_k", "ffn_gate", "ffn_up", "ffn_down"):
            tensors[f"blk.0.{part}.weight"] = np.zeros_like(tensors[f"blk.0.{part}.weight"])
        value = np.zeros((n_embd, n_embd), np.float32)
        value[0, 2] = 1.0  # V carries the digit feature into dimension 0 ...
        out = np.zeros((n_embd, n_embd), np.float32)
        out[0, 0] = 1.0  # ... which the residual stream keeps: rank pooling reads dimension 0
        tensors["blk.0.attn_v.weight"], tensors["blk.0.attn_output.weight"] = value, out
        return tensors

    pooling = {"llama.pooling_type": (4, gguf.GGUFValueType.UINT32)}  # LLAMA_POOLING_TYPE_RANK
    return write_tiny_llama(
        path, n_layer=1, n_ctx=256, chat_template=None, name="tiny-reranker", kv_overrides=pooling,
        edit_tensors=edit,
    )  # fmt: skip


@functools.cache
def gguf_bytes(dtype: str = "f32", n_embd: int = 64, n_ff: int = 128) -> bytes:
    """The bytes of a tiny llama GGUF (made once per process): what the fake Hub serves."""
    path = Path(tempfile.mkdtemp()) / f"tiny-{dtype}-{n_embd}.gguf"
    write_tiny_llama(path, dtype=dtype, n_embd=n_embd, n_ff=n_ff)
    return path.read_bytes()
