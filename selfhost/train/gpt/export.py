"""Export a trained GPT to GGUF (llama.cpp architecture `gpt2`, or `llama` / `qwen3` for the llama-style
model) and register it in the store.

nanoGPT's Linear weights are (out, in) in PyTorch, which the gguf package writes as ggml's
(in, out): exactly what llama.cpp expects, so no tensor is transposed. qkv stays fused
(`attn_qkv`), every bias is kept, and the tied output matrix is omitted (llama.cpp reuses
`token_embd`). The tokenizer, bos/eos ids and a chat template travel inside the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfhost import atomic, paths
from selfhost.errors import UsageError
from selfhost.events import Events, Notice, Result
from selfhost.models.store import ModelRecord, Store, sha256_file
from selfhost.runtime import gguf_info
from selfhost.train.gpt.model import LAYER_NORM_EPS
from selfhost.train.gpt.options import ExportType
from selfhost.train.gpt.tokenizer import CHAT_TEMPLATE, Tokenizer

# A base model has no roles: the prompt is the messages' text, one per line.
BASE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}\n{% endif %}{% endfor %}"
)

_BLOCK_TENSORS = {  # our state-dict name -> llama.cpp gpt2 tensor name
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


_LLAMA_TENSORS = {  # our llama-style state-dict name -> llama.cpp llama / qwen3 tensor name
    "attn_norm": "attn_norm",
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output",
    "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm",
    "ffn_norm": "ffn_norm",
    "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}


def gguf_arch(model_args: dict[str, Any]) -> str:
    """The llama.cpp architecture a model exports as."""
    if model_args.get("arch", "gpt2") == "gpt2":
        return "gpt2"
    return "qwen3" if model_args.get("qk_norm") else "llama"


def interleave_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    """Query/key rows of each head from the half-split rotary layout to llama.cpp llama's interleaved pairs
    (what convert_hf_to_gguf's permute does)."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def split_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of interleave_heads (a llama GGUF's query/key rows -> our layout)."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, hs // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(state: dict[str, Any], model_args: dict[str, Any]) -> dict[str, np.ndarray]:
    """The llama-style state dict -> llama.cpp `llama` (rotary rows interleaved) or `qwen3` tensors."""
    arch = gguf_arch(model_args)
    n_head = int(model_args["n_head"])
    n_kv = int(model_args.get("n_kv_head") or n_head)

    def arr(key: str) -> np.ndarray:
        return state[key].detach().float().cpu().numpy()

    out = {"token_embd.weight": arr("wte.weight"), "output_norm.weight": arr("norm.weight")}
    if not model_args.get("tie_embeddings", True):
        out["output.weight"] = arr("lm_head.weight")
    for i in range(int(model_args["n_layer"])):
        for ours, theirs in _LLAMA_TENSORS.items():
            key = f"blocks.{i}.{ours}.weight"
            if key not in state:
                continue  # no QK-norm
            value = arr(key)
            if arch == "llama" and theirs in ("attn_q", "attn_k"):
                value = interleave_heads(value, n_head if theirs == "attn_q" else n_kv)
            out[f"blk.{i}.{theirs}.weight"] = value
    return out


def gguf_tensors(state: dict[str, Any], n_layer: int) -> dict[str, np.ndarray]:
    """Our gpt2 state dict (torch tensors) -> llama.cpp tensor names (float32 numpy arrays)."""

    def arr(key: str) -> np.ndarray:
        return state[key].detach().float().cpu().numpy()

    out = {
        "token_embd.weight": arr("wte.weight"),
        "position_embd.weight": arr("wpe.weight"),
        "output_norm.weight": arr("ln_f.weight"),
        "output_norm.bias": arr("ln_f.bias"),
    }
    for i in range(n_layer):
        for ours, theirs in _BLOCK_TENSORS.items():
            for part in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{part}"] = arr(f"blocks.{i}.{ours}.{part}")
    return out


def write_gguf(
    dest: Path,
    state: dict[str, Any],
    model_args: dict[str, Any],
    tokenizer: Tokenizer,
    *,
    name: str,
    dtype: ExportType = "f16",
    chat_template: str | None = None,
) -> Path:
    """Write the GGUF atomically to `dest`."""
    import gguf

    if dtype not in ("f32", "f16"):
        raise UsageError(f"unknown export type '{dtype}'", hint="use f32 or f16")
    vocab = tokenizer.gguf_vocab()
    n_layer = int(model_args["n_layer"])
    if len(vocab.tokens) != int(model_args["vocab_size"]):
        raise UsageError(f"tokenizer has {len(vocab.tokens)} tokens, model {model_args['vocab_size']}")
    arch = gguf_arch(model_args)
    tensors = gguf_tensors(state, n_layer) if arch == "gpt2" else llama_tensors(state, model_args)
    size = sum(a.size for a in tensors.values()) * (4 if dtype == "f32" else 2)
    atomic.ensure_free_space(Path(dest).parent, size, "the GGUF export")

    with atomic.atomic_path(Path(dest)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        _add_shape(w, arch, model_args)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        w.add_bos_token_id(vocab.eot_id)
        w.add_eos_token_id(vocab.eot_id if vocab.eos_id is None else vocab.eos_id)
        w.add_add_bos_token(True)  # documents start after <|endoftext|>, as in training
        w.add_add_eos_token(False)
        default = CHAT_TEMPLATE if tokenizer.kind == "chat" else BASE_CHAT_TEMPLATE
        w.add_chat_template(chat_template or default)
        for tname, data in tensors.items():
            if dtype == "f16" and data.ndim == 2:
                data = data.astype(np.float16)  # matrices in F16, norms and biases stay F32
            w.add_tensor(tname, np.ascontiguousarray(data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    gguf_info.inspect(Path(dest))  # raises GGUFError if anything is off
    return Path(dest)


def _add_shape(w: Any, arch: str, model_args: dict[str, Any]) -> None:
    """The hyper-parameters llama.cpp reads for `arch`."""
    from selfhost.train.gpt.model import GPTConfig

    cfg = GPTConfig(**model_args)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_width)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(LAYER_NORM_EPS)
        return
    w.add_head_count_kv(cfg.kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)


@dataclass
class Exported:
    path: Path  # the GGUF
    name: str | None  # its store name (None: not registered)
    quant: str  # F16 or F32
    size: int  # bytes
    checkpoint: Path


def export_checkpoint(
    ckpt_path: Path, name: str, *, dtype: ExportType = "f16", dest: Path | None = None, register: bool = True
) -> Events:
    """Checkpoint -> GGUF in the models folder (or `dest`) -> store record `name` (source "trained");
    the run folder's run.json remembers the export. Ends with Result(Exported)."""
    from selfhost.train.gpt import checkpoint, config, tokenizer
    from selfhost.train.runs import note_export

    config.check_name(name)
    ckpt = checkpoint.load(ckpt_path)
    tok = tokenizer.from_json(ckpt["tokenizer"])
    quant = dtype.upper()
    dest = Path(dest) if dest else paths.models_dir() / f"{name}.{quant}.gguf"
    yield Notice(f"writing {dest} ({quant})")
    write_gguf(dest, ckpt["model"], ckpt["model_args"], tok, name=name, dtype=dtype)
    if register:
        record = ModelRecord(
            name=name, path=dest.resolve(), size=dest.stat().st_size, sha256=sha256_file(dest),
            source="trained", quant=quant, file=dest.name,
        )  # fmt: skip
        Store().add(record)
    ckpt_path = Path(ckpt_path)
    note_export(ckpt_path if ckpt_path.is_dir() else ckpt_path.parent, name if register else None, dest)
    yield Result(Exported(dest, name if register else None, quant, dest.stat().st_size, ckpt_path))
