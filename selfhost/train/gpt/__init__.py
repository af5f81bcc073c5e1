"""Train your own GPT (GPT-2 architecture, nanoGPT-style), estimate its cost, export it to GGUF.

Modules: `config` (presets, TOML), `tokenizer` (char + byte-level BPE), `data` (documents -> token
arrays), `model` (the network), `estimate` (params, FLOPs, ETA), `trainer` (the loop, yields events),
`checkpoint` (atomic, weights-only), `export` (GGUF `gpt2` + store), `sample` (generation).
Only `model`, `trainer`, `checkpoint`, `estimate`, `export` and `sample` import torch.
"""

from __future__ import annotations

from typing import Any

from selfhost.errors import DependencyError


def require_torch() -> Any:
    """Import torch or raise a one-line DependencyError."""
    try:
        import torch
    except ImportError as exc:
        raise DependencyError("PyTorch is not installed", hint="install selfhost[train]") from exc
    return torch


def require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise DependencyError("`tokenizers` is not installed", hint="install selfhost[train]") from exc
    return tokenizers
