"""Training configuration: presets, a TOML file for repeatable runs, and per-flag overrides.

Precedence: preset < config file < explicit overrides (CLI flags). Every hyper-parameter is a field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from selfhost.errors import NotFoundError, UsageError
from selfhost.train.common import TrainSettings

TokenizerKind = Literal["char", "bpe"]
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Arch = Literal["gpt2", "llama"]
OptimizerKind = Literal["adamw", "muon"]
Schedule = Literal["cosine", "wsd"]


class TrainConfig(TrainSettings):
    """Everything that defines a run. Field names are the TOML keys and (with dashes) the CLI flags."""

    # data + tokenizer
    tokenizer: TokenizerKind = "char"
    vocab_size: int = Field(4096, ge=260, le=1 << 20)  # BPE only: 256 bytes + end-of-text + merges
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # model: gpt2 (nanoGPT) or llama (rotary, RMSNorm, SwiGLU, no biases; selfhost.train.gpt.llama)
    arch: Arch = "gpt2"
    n_kv_head: int = Field(0, ge=0)  # llama: key/value heads for grouped-query attention (0: n_head)
    n_ff: int = Field(0, ge=0)  # llama: SwiGLU width (0: 8/3 n_embd rounded up to 32)
    qk_norm: bool = False  # llama: RMSNorm of query/key heads (exported as GGUF qwen3)
    tie_embeddings: bool = True  # llama: output matrix = token embedding
    rope_theta: float = Field(10000.0, gt=0)
    n_layer: int = Field(6, ge=1)
    n_head: int = Field(6, ge=1)
    n_embd: int = Field(384, ge=1)
    block_size: int = Field(256, ge=2)
    dropout: float = Field(0.2, ge=0, lt=1)
    # optimisation
    batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_iters: int = Field(5000, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    decay_lr: bool = True
    warmup_iters: int = Field(100, ge=0)
    lr_decay_iters: int | None = Field(None, ge=1)  # None: max_iters
    min_lr: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.99, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0: off
    optimizer: OptimizerKind = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = Field(0.02, gt=0)
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    lr_schedule: Schedule = "cosine"  # wsd: warm-up, stable, then linear decay over the last cooldown share
    cooldown: float = Field(0.4, gt=0, le=1)
    # fine-tuning (--init)
    lora_rank: int = Field(0, ge=0)  # 0: every weight trains; r: rank-r adapters on the blocks' matrices
    lora_alpha: float = Field(16.0, gt=0)  # adapter scale: alpha / rank
    # evaluation + logging
    eval_interval: int = Field(500, ge=1)
    eval_iters: int = Field(200, ge=1)
    log_interval: int = Field(10, ge=1)
    sample_tokens: int = Field(200, ge=0)  # text sample at each eval (0: none)
    # system
    device: Device = "auto"
    dtype: DType = "auto"
    compile: bool = False
    threads: int = Field(0, ge=0)  # CPU threads per process (0: auto, the cores other programs leave free)
    seed: int = 1337

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        return self

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters

    @property
    def tokens_per_iter(self) -> int:
        """Tokens one optimizer step consumes in ONE process (x world size under DDP)."""
        return self.batch_size * self.block_size * self.grad_accum


_SHAKESPEARE_CHAR: dict[str, Any] = dict(
    n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
    batch_size=64, max_iters=5000, learning_rate=1e-3, lr_decay_iters=5000, min_lr=1e-4,
    warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
    eval_interval=250, eval_iters=200, log_interval=10,
)  # fmt: skip

_NANOGPT_CPU_TINY: dict[str, Any] = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
    batch_size=12, max_iters=2000, learning_rate=1e-3, lr_decay_iters=2000, min_lr=1e-4,
    warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
    eval_interval=250, eval_iters=20, log_interval=10, sample_tokens=100,
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # The seed material's configuration (constant lr, AdamW defaults, no clipping).
    "seed": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
        batch_size=64, max_iters=5000, learning_rate=3e-4, decay_lr=False, warmup_iters=0,
        min_lr=3e-4, beta2=0.999, weight_decay=0.01, grad_clip=0.0,
        eval_interval=500, eval_iters=200, log_interval=10,
    ),
    # nanoGPT's config/train_shakespeare_char.py
    "shakespeare-char": _SHAKESPEARE_CHAR,
    # nanoGPT's "baby GPT" CPU settings (gpt2, AdamW, cosine): minutes on 2 cores; the bench's reference.
    "nanogpt-cpu-tiny": _NANOGPT_CPU_TINY,
    # The same model size and batch, the modern recipe: llama-style model, Muon + AdamW, warm-up/stable/decay.
    # Reaches nanogpt-cpu-tiny's final val loss in fewer steps (bench/train_gpt.py; README benchmarks).
    "cpu-tiny": {**_NANOGPT_CPU_TINY, "arch": "llama", "optimizer": "muon", "lr_schedule": "wsd",
                 "cooldown": 0.4, "max_iters": 1000, "lr_decay_iters": 1000, "eval_interval": 200},
    # Fine-tuning a model (--init; the default preset there): LoRA adapters, a short constant-then-decay run.
    "finetune": dict(
        block_size=512, dropout=0.0, batch_size=8, max_iters=100, learning_rate=1e-3, min_lr=1e-4,
        warmup_iters=5, lr_schedule="wsd", cooldown=0.3, weight_decay=0.0, grad_clip=1.0, lora_rank=8,
        lora_alpha=16.0, log_interval=1,
    ),
}  # fmt: skip
DEFAULT_PRESET = "cpu-tiny"


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise NotFoundError(f"unknown preset '{name}'", hint=f"choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def read_toml(path: Path) -> dict[str, Any]:
    """A config file: top-level keys are TrainConfig fields (`preset = "..."` picks the base)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no such config file: {path}")
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(
    preset: str | None = None, config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """preset < config file < overrides (None values in overrides are ignored)."""
    file_values = read_toml(config_file) if config_file else {}
    preset = preset or file_values.pop("preset", None) or DEFAULT_PRESET
    file_values.pop("preset", None)
    values = preset_values(preset)
    values.update(file_values)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.validated(values)


def check_name(name: str) -> str:
    """The export name: a store name in the one model-name grammar (selfhost.models.names)."""
    from selfhost.models.names import check_store_name

    return check_store_name(name)
