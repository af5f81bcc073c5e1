"""Training configuration: presets (the TOML files of presets/), a TOML file for repeatable runs, and
per-flag overrides. Precedence: preset < config file < explicit overrides (CLI flags). Every
hyper-parameter is a field; options.py holds each field's flag and each choice's values.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from selfhost.errors import NotFoundError, UsageError
from selfhost.train.common import TrainSettings
from selfhost.train.gpt import options
from selfhost.train.gpt.options import Arch, Device, DType, OptimizerKind, Schedule, TokenizerKind


class TrainConfig(TrainSettings):
    """Everything that defines a run. Field names are the TOML keys; options.flag(field) is the CLI flag."""

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


def read_toml(path: Path) -> dict[str, Any]:
    """A config file (or a preset): top-level keys are TrainConfig fields, dashes or underscores
    (`preset = "..."` names the preset it builds on)."""
    return {key.replace("-", "_"): value for key, value in _toml_table(path).items()}


def _toml_table(path: Path) -> dict[str, Any]:
    """A TOML file's top-level table, keys as written (what config files and presets share)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no such config file: {path}")
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc


def preset_path(name: Any) -> Path:
    """The TOML file of a shipped preset (an unknown name: one line listing the shipped ones)."""
    names = options.preset_names()
    if name not in names:
        raise NotFoundError(f"unknown preset '{name}'", hint=f"choose one of: {', '.join(names)}")
    return options.PRESETS_DIR / f"{name}.toml"


def preset_layers(name: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, settings) of preset `name` and of each preset it builds on (`preset = "..."`), base first."""
    chain: list[tuple[str, dict[str, Any]]] = []
    while name is not None:
        if any(name == seen for seen, _ in chain):
            cycle = " -> ".join([*(seen for seen, _ in chain), name])
            raise UsageError(f"presets build on each other in a circle: {cycle}")
        values = read_toml(preset_path(name))
        chain.append((name, values))
        name = values.pop("preset", None)
    return chain[::-1]


def build_config(
    preset: str | None = None, config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """preset (and its bases) < config file < overrides (the flags; None values are ignored).
    The config file's `preset` key picks the preset when `preset` is None; the default is cpu-tiny.
    A bad value is one line naming where it came from: the flag, the file's key, or the preset."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # field -> where its value came from (for error messages)
    file_table = _toml_table(config_file) if config_file else {}
    file_values = {key.replace("-", "_"): (key, value) for key, value in file_table.items()}
    _, base = file_values.pop("preset", (None, None))
    for name, layer in preset_layers(preset or base or options.DEFAULT_PRESET):
        values.update(layer)
        origins.update({field: f"{field} in preset {name}" for field in layer})
    for field, (key, value) in file_values.items():
        values[field], origins[field] = value, f"{key} in {config_file}"
    for field, value in (overrides or {}).items():
        if value is not None:
            values[field], origins[field] = value, options.flag(field)
    return TrainConfig.validated(values, origins)


def check_name(name: str) -> str:
    """The export name: a store name in the one model-name grammar (selfhost.models.names)."""
    from selfhost.models.names import check_store_name

    return check_store_name(name)
