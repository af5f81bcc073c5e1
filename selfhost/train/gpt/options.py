"""The vocabulary TrainConfig and `selfhost train gpt` share, in one place: the values each choice may
take (Literal types: pydantic checks them, the CLI offers them), the flag of each setting, and the
shipped presets. Pure typing and paths: the CLI imports this module at start-up (no pydantic, no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

TokenizerKind = Literal["char", "bpe"]
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Arch = Literal["gpt2", "llama"]
OptimizerKind = Literal["adamw", "muon"]
Schedule = Literal["cosine", "wsd"]
ExportType = Literal["f16", "f32"]

# The one alias map: settings whose flag is not `--` + the field name with dashes (nanoGPT's names).
# The CLI declares its options with it and error messages name flags with it.
ALIASES = {"max_iters": "--iters", "learning_rate": "--lr", "warmup_iters": "--warmup"}
# On/off settings: the flag that turns each one off.
OFF_FLAGS = {"decay_lr": "--constant-lr", "qk_norm": "--no-qk-norm", "tie_embeddings": "--untie-embeddings",
             "compile": "--no-compile"}  # fmt: skip
# TrainConfig fields that only a config file or a preset sets (no flag). None today: every field has one.
NO_FLAG: frozenset[str] = frozenset()

PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # <name>.toml, read like a --config file
DEFAULT_PRESET = "cpu-tiny"
FINETUNE_PRESET = "finetune"  # the default with --init


def flag(field: str) -> str:
    """The flag a user types to set `field`."""
    return ALIASES.get(field, "--" + field.replace("_", "-"))


def declaration(field: str) -> str:
    """The CLI's option declaration of `field`: its flag, or `--on/--off` for an on/off setting."""
    off = OFF_FLAGS.get(field)
    return f"{flag(field)}/{off}" if off else flag(field)


def preset_names() -> list[str]:
    """The shipped presets: the TOML files of PRESETS_DIR."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.toml"))
