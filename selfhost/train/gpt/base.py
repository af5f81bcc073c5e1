"""The model a fine-tuning run starts from (`--init`): a run of `selfhost train gpt`, or any llama-
architecture GGUF the store resolves (dequantized to float with the `gguf` package), with its tokenizer
and chat template.

A GGUF's tokenizer stays llama.cpp's own (loaded vocabulary-only), so training tokenizes exactly as
`selfhost chat` will; its chat template renders the conversations. Export copies every metadata key of the
original file and replaces the weights (selfhost.train.gpt.finetune.write_finetuned).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selfhost.errors import UsageError

GGUF_ARCHS = ("llama", "qwen3")


@dataclass
class BaseModel:
    """Weights (our state-dict names, float32 tensors), model_args, and how to tokenize and render chats."""

    name: str
    model_args: dict[str, Any]
    state: dict[str, Any]
    encode: Callable[[str], list[int]]  # text (special tokens recognised) -> ids
    decode: Callable[[list[int]], str]
    chat_template: str | None
    bos: str = ""
    eos: str = ""
    eos_id: int | None = None
    gguf_path: Path | None = None  # the original file (export copies its metadata)
    tokenizer_json: str | None = None  # a run's saved tokenizer
    extra: dict[str, Any] = field(default_factory=dict)


def load_base(ref: str, chat: bool = False) -> BaseModel:
    """`ref`: a run folder or run name (its best weights), else a model the store resolves (a GGUF).
    `chat`: a run's tokenizer gets the chat special tokens (and its embedding their rows)."""
    from selfhost import paths

    run = Path(ref)
    if not run.exists() and len(run.parts) == 1 and (paths.runs_dir() / ref).exists():
        run = paths.runs_dir() / ref
    if run.is_dir():
        return load_run(run, chat)
    from selfhost.models.resolve import resolve_model

    return load_gguf(resolve_model(ref).path)


def load_run(run: Path, chat: bool = False) -> BaseModel:
    from selfhost.train.gpt import checkpoint, tokenizer

    ckpt = checkpoint.load(run)
    tok = tokenizer.from_json(ckpt["tokenizer"])
    args, state = dict(ckpt["model_args"]), dict(ckpt["model"])
    template = None
    if chat and not isinstance(tok, tokenizer.ChatTokenizer):
        tok = tokenizer.ChatTokenizer(tok)
        grow_vocab(args, state, tok.vocab_size)
    if isinstance(tok, tokenizer.ChatTokenizer):
        template = tokenizer.CHAT_TEMPLATE
    return BaseModel(name=run.name, model_args=args, state=state, encode=tok.encode, decode=tok.decode,
                     chat_template=template, bos=tokenizer.EOT, eos=tokenizer.IM_END, eos_id=tok.eot_id,
                     tokenizer_json=tok.to_json())  # fmt: skip


def grow_vocab(args: dict[str, Any], state: dict[str, Any], vocab_size: int) -> None:
    """New token rows (the mean of the existing embeddings) for tokens added to the vocabulary."""
    import torch

    wte = state["wte.weight"]
    extra = wte.mean(0, keepdim=True).expand(vocab_size - wte.size(0), -1)
    tied = (
        state.get("lm_head.weight") is None
        or state["lm_head.weight"] is wte
        or args.get("tie_embeddings", True)
    )
    state["wte.weight"] = torch.cat([wte, extra])
    if tied:
        state["lm_head.weight"] = state["wte.weight"]
    else:
        head = state["lm_head.weight"]
        state["lm_head.weight"] = torch.cat([head, head.mean(0, keepdim=True).expand_as(extra)])
    args["vocab_size"] = vocab_size


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None or not f.types:
        return default
    return f.contents()


def gguf_model_args(reader: Any, arch: str, vocab: int, tied: bool) -> dict[str, Any]:
    """Our GPTConfig of a llama / qwen3 GGUF's hyper-parameters."""
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    if head_dim * n_head != n_embd:
        raise UsageError(
            f"this {arch} GGUF's head size {head_dim} x {n_head} heads is not its width {n_embd}"
        )
    return {"vocab_size": vocab, "block_size": int(_field(reader, f"{arch}.context_length", 2048)),
            "n_layer": int(_field(reader, f"{arch}.block_count")), "n_head": n_head, "n_embd": n_embd,
            "dropout": 0.0, "arch": "llama",
            "n_kv_head": int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
            "n_ff": int(_field(reader, f"{arch}.feed_forward_length")), "qk_norm": arch == "qwen3",
            "tie_embeddings": tied, "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            "norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))}  # fmt: skip


def gguf_state(reader: Any, args: dict[str, Any], arch: str) -> dict[str, Any]:
    """The GGUF's tensors, dequantized, under our names (llama's interleaved query/key rows undone)."""
    import gguf
    import torch

    from selfhost.train.gpt.export import _LLAMA_TENSORS, split_heads

    theirs_to_ours = {v: k for k, v in _LLAMA_TENSORS.items()}
    state: dict[str, Any] = {}
    for t in reader.tensors:
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # writable copy
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            key = "wte.weight"
        elif name == "output_norm":
            key = "norm.weight"
        elif name == "output":
            key = "lm_head.weight"
        elif name.startswith("blk.") and name.split(".", 2)[2] in theirs_to_ours:
            i, kind = name.split(".", 2)[1:]
            key = f"blocks.{i}.{theirs_to_ours[kind]}.weight"
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                values = split_heads(values, args["n_head"] if kind == "attn_q" else args["n_kv_head"])
        else:
            raise UsageError(f"the GGUF has a tensor '{t.name}' a {arch} model does not use")
        state[key] = torch.from_numpy(
            np.ascontiguousarray(values.reshape(tuple(int(d) for d in t.shape[::-1])))
        )
    if args["tie_embeddings"]:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def load_gguf(path: Path) -> BaseModel:
    """A llama / qwen3 GGUF as a BaseModel; its tokenizer is llama.cpp's (vocabulary only)."""
    import gguf

    from selfhost.runtime import gguf_info, llama_backend

    info = gguf_info.inspect(path)
    if info.architecture not in GGUF_ARCHS:
        raise UsageError(
            f"{path.name} is a '{info.architecture}' model; fine-tuning reads llama or qwen3 GGUFs"
        )
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    args = gguf_model_args(reader, info.architecture, int(embd.shape[1]), "output.weight" not in names)
    state = gguf_state(reader, args, info.architecture)
    llm, _ = llama_backend.load_model(path, n_ctx=64, vocab_only=True)

    def encode(text: str) -> list[int]:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def decode(ids: list[int]) -> str:
        return bytes(llm.detokenize(ids)).decode("utf-8", errors="replace")

    def piece(token_id: int | None) -> str:
        return "" if token_id is None or token_id < 0 else decode([token_id])

    return BaseModel(name=path.stem, model_args=args, state=state, encode=encode, decode=decode,
                     chat_template=info.chat_template, bos=piece(info.bos_token_id),
                     eos=piece(info.eos_token_id), eos_id=info.eos_token_id, gguf_path=path,
                     extra={"llm": llm})  # fmt: skip
