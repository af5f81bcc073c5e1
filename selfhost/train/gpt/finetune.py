"""Fine-tuning (`selfhost train gpt --init MODEL --chat FILE`): continue a model you have (a llama / qwen3
GGUF from the store, or a run of ours) on chat conversations, fully or with LoRA adapters, then export a
GGUF that `selfhost chat` / `serve` use as is.

Conversations are rendered with the model's own chat template and tokenized by its own tokenizer; the loss
is taken on the assistant turns only (every other target is -1). LoRA adapters (rank r, scale alpha / r,
B zero-initialised so training starts from the model itself) sit on every matrix of the blocks and are
merged into the weights at export. A GGUF's export copies every metadata key of the original file
(tokenizer, chat template, ...) and replaces the weights. `train(request)` yields selfhost.events.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from selfhost import atomic, paths
from selfhost.errors import UsageError
from selfhost.events import Events, Notice, Progress, Result
from selfhost.train.gpt.base import BaseModel, load_base
from selfhost.train.gpt.config import TrainConfig
from selfhost.train.gpt.model import CausalLM, GPTConfig, build_model
from selfhost.train.gpt.options import ExportType

ROLES = ("system", "user", "assistant", "tool")


# -- data ---------------------------------------------------------------------------------------
def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """One OpenAI `{"messages": [{"role", "content"}, ...]}` per line; an error names its line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such chat file: {path}")
    out = []
    with path.open(encoding="utf-8", errors="strict") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            out.append(_conversation(line, f"{path.name} line {n}"))
    if not out:
        raise UsageError(f"{path} holds no conversations", hint='one {"messages": [...]} per line')
    return out


def _conversation(line: str, where: str) -> list[dict[str, str]]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg})") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not messages:
        raise UsageError(f'{where}: expected {{"messages": [...]}} with at least one message')
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: each message needs a role and a text content")
        if m.get("role") not in ROLES:
            raise UsageError(f"{where}: unknown role {m.get('role')!r} (use {', '.join(ROLES)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise UsageError(f"{where}: no assistant turn (the loss is taken on assistant turns)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass
class Example:
    ids: list[int]
    targets: list[int]  # next token where it is an assistant token, else -1


def chat_examples(convs: list[list[dict[str, str]]], base: BaseModel, block_size: int) -> list[Example]:
    """Render each conversation with the model's template; targets on the assistant turns' tokens."""
    from selfhost.runtime.template import ChatTemplate

    if not base.chat_template:
        raise UsageError(f"{base.name} has no chat template", hint="fine-tune a chat model (or its GGUF)")
    tpl = ChatTemplate(base.chat_template, bos_token=base.bos, eos_token=base.eos)
    out = []
    for conv in convs:
        ids = base.encode(tpl.render(conv, add_generation_prompt=False))
        scored = np.zeros(len(ids), dtype=bool)
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            start = len(base.encode(tpl.render(conv[:i], add_generation_prompt=True)))
            end = len(base.encode(tpl.render(conv[: i + 1], add_generation_prompt=False)))
            scored[start:end] = True  # the reply and its end-of-turn token
        ids = ids[: block_size + 1]
        targets = [t if scored[k + 1] else -1 for k, t in enumerate(ids[1:])]
        if any(t >= 0 for t in targets):  # a reply cut off by --block-size teaches nothing
            out.append(Example(ids[:-1], targets))
    if not out:
        raise UsageError(f"no assistant reply fits in --block-size {block_size}", hint="raise --block-size")
    return out


def text_examples(path: Path | None, base: BaseModel, block_size: int) -> list[Example]:
    """Plain text (a file or a folder of documents): consecutive windows of block_size tokens, all scored."""
    from selfhost.train.gpt import data

    if path is None:
        raise UsageError("no training data given", hint="pass --chat FILE.jsonl or --data TEXT")
    ids: list[int] = []
    for text in data.stream_text(path):
        ids.extend(base.encode(text))
    if len(ids) < 2:
        raise UsageError(f"{path} holds no text to train on")
    spans = [(k, min(block_size, len(ids) - 1 - k)) for k in range(0, len(ids) - 1, block_size)]
    return [Example(ids[k : k + n], ids[k + 1 : k + 1 + n]) for k, n in spans]


def batches(examples: list[Example], batch_size: int, seed: int) -> Any:
    """Shuffled batches, padded to their longest example (padding has target -1); endless."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples))
        for k in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[k : k + batch_size]]
            width = max(len(e.ids) for e in chunk)
            x = torch.zeros((len(chunk), width), dtype=torch.long)
            y = torch.full((len(chunk), width), -1, dtype=torch.long)
            for row, e in enumerate(chunk):
                x[row, : len(e.ids)] = torch.tensor(e.ids)
                y[row, : len(e.targets)] = torch.tensor(e.targets)
            yield x, y


# -- LoRA ---------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """base(x) + (alpha / r) B A x, with the base weight frozen and B zero at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * (self.b @ self.a)
        self.base.weight.requires_grad_(True)
        return self.base


def add_lora(model: CausalLM, rank: int, alpha: float) -> None:
    """Freeze the model; put adapters on every Linear inside the blocks."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:  # type: ignore[attr-defined]
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))


def merge_lora(model: CausalLM) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())


# -- the run ------------------------------------------------------------------------------------
@dataclass
class FinetuneRequest:
    config: TrainConfig
    init: str
    chat: Path | None
    name: str
    run_dir: Path
    export_type: ExportType = "f16"
    data: Path | None = None  # plain text instead of conversations
    register: bool = True


@dataclass
class FinetuneResult:
    run_dir: Path
    step: int
    train_loss: float
    elapsed_s: float
    trainable: int  # parameters trained
    gguf: Path
    name: str | None
    size: int
    peak_rss: int  # bytes


def train(req: FinetuneRequest) -> Events:
    from selfhost.train.common import resolve_threads

    cfg = req.config
    resolve_threads(cfg.threads, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    convs = read_conversations(req.chat) if req.chat is not None else None  # bad data fails first
    base = load_base(req.init, chat=convs is not None)
    if convs is not None:
        examples = chat_examples(convs, base, cfg.block_size)
    else:
        examples = text_examples(req.data, base, cfg.block_size)
    model = build_model(GPTConfig(**base.model_args))
    model.load_state_dict(base.state)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    model.score_only_targets = True  # type: ignore[assignment]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    how = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "every weight"
    yield Notice(f"fine-tuning {base.name} ({how}: {trainable:,} parameters) on {len(examples)} "
                 f"conversations for {cfg.max_iters} steps")  # fmt: skip
    loss, elapsed = yield from _loop(model, params, examples, cfg)
    if cfg.lora_rank:
        merge_lora(model)
    dest = paths.models_dir() / f"{req.name}.{req.export_type.upper()}.gguf"
    if base.gguf_path is None:  # a run of ours: keep a checkpoint too (gpt sample / export read it)
        _save_run(req, base, model)
    yield Notice(f"writing {dest}")
    write_finetuned(dest, base, model, req.name, req.export_type)
    registered = _register(dest, req.name, req.export_type) if req.register else None
    yield Result(FinetuneResult(req.run_dir, cfg.max_iters, loss, elapsed, trainable, dest, registered,
                                dest.stat().st_size, _peak_rss()))  # fmt: skip


def _loop(model: CausalLM, params: list[nn.Parameter], examples: list[Example], cfg: TrainConfig) -> Any:
    """AdamW over the trainable parameters with the run's schedule; a Progress per logged step."""
    from selfhost.train.gpt.optim import lr_factor

    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    stream = batches(examples, cfg.batch_size, cfg.seed)
    t0, tokens, loss_value = time.perf_counter(), 0, math.nan
    for it in range(1, cfg.max_iters + 1):
        x, y = next(stream)
        _, loss = model(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        tokens += x.numel()
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            loss_value, elapsed = float(loss.detach()), time.perf_counter() - t0
            yield Progress("train", it, cfg.max_iters, "steps",
                           metrics={"loss": loss_value, "lr": sched.get_last_lr()[0],
                                    "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
                                    "eta_s": elapsed / it * (cfg.max_iters - it)})  # fmt: skip
    return loss_value, time.perf_counter() - t0


def write_finetuned(dest: Path, base: BaseModel, model: CausalLM, name: str, dtype: str) -> Path:
    """The fine-tuned weights as a GGUF: a GGUF base's metadata (tokenizer, template...) copied, weights
    replaced; a run's model through the usual export."""
    from selfhost.train.gpt.export import write_gguf

    state = model.state_dict()
    if base.gguf_path is None:
        from selfhost.train.gpt import tokenizer

        tok = tokenizer.from_json(base.tokenizer_json or "")
        return write_gguf(dest, state, base.model_args, tok, name=name, dtype=dtype)  # type: ignore[arg-type]
    return copy_gguf_with(base.gguf_path, dest, state, base.model_args, dtype)


def copy_gguf_with(
    src: Path, dest: Path, state: dict[str, Any], model_args: dict[str, Any], dtype: str
) -> Path:
    import gguf

    from selfhost.runtime import gguf_info
    from selfhost.train.gpt.export import gguf_arch, llama_tensors

    reader = gguf.GGUFReader(src)
    arch = gguf_arch(model_args)
    tensors = llama_tensors(state, model_args)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(Path(dest)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or not field.types:
                continue
            if key == "general.file_type":
                w.add_file_type(file_type)
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
        for tname, data in tensors.items():
            data = data.astype(np.float16) if dtype == "f16" and data.ndim == 2 else data.astype(np.float32)
            w.add_tensor(tname, np.ascontiguousarray(data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    gguf_info.inspect(Path(dest))
    return Path(dest)


def _save_run(req: FinetuneRequest, base: BaseModel, model: CausalLM) -> None:
    from selfhost.train.gpt import checkpoint

    req.run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(req.run_dir / "tokenizer.json", base.tokenizer_json or "")
    checkpoint.save(req.run_dir / checkpoint.BEST_NAME, {
        "model_args": base.model_args, "config": req.config.model_dump(mode="json"),
        "tokenizer": base.tokenizer_json, "model": model.state_dict(), "iter_num": req.config.max_iters,
        "best_val_loss": None, "val_loss": None})  # fmt: skip


def _register(dest: Path, name: str, dtype: str) -> str:
    from selfhost.models.store import ModelRecord, Store, sha256_file

    Store().add(ModelRecord(name=name, path=dest.resolve(), size=dest.stat().st_size,
                            sha256=sha256_file(dest),
                            source="trained", quant=dtype.upper(), file=dest.name))  # fmt: skip
    return name


def _peak_rss() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
