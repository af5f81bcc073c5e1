"""Checkpoints: written atomically (temp + rename), read back with `torch.load(weights_only=True)`.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only, so loading it never
unpickles arbitrary objects: model + optimizer + scheduler state, every RNG (torch, cuda, numpy,
python, the batch sampler's) and the step to continue from, plus the config and the tokenizer.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfhost import atomic
from selfhost.errors import IntegrityError, NotFoundError

FORMAT = "selfhost-gpt"
VERSION = 1
CKPT_NAME = "ckpt.pt"  # the latest state: model, optimizer, RNG... (what --resume reads)
BEST_NAME = "best.pt"  # the weights with the lowest val loss so far (what export and sample read)


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically: a crash or Ctrl-C leaves the previous checkpoint intact."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic.atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    return Path(path)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (weights only). Raises NotFoundError / IntegrityError with one clear line."""
    path = resolve(path)
    if not path.is_file():
        raise NotFoundError(f"no checkpoint at {path}", hint="train first with `selfhost train gpt`")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise IntegrityError(
            f"checkpoint {path} is corrupt or not a selfhost checkpoint ({type(exc).__name__})",
            hint="resume from an earlier run or train again",
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IntegrityError(f"{path} is not a selfhost GPT checkpoint")
    if data.get("version") != VERSION:
        raise IntegrityError(f"checkpoint {path} has unsupported version {data.get('version')}")
    for key in ("model_args", "config", "tokenizer", "model"):
        if key not in data:
            raise IntegrityError(f"checkpoint {path} is incomplete (no '{key}')")
    return data


def resolve(path: Path) -> Path:
    """A run folder means its best weights (best.pt) if it has them, else its last checkpoint."""
    path = Path(path)
    if path.is_dir():
        best = path / BEST_NAME
        return best if best.is_file() else path / CKPT_NAME
    return path


def rng_state() -> dict[str, Any]:
    """Every global RNG, as weights-only-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npst["pos"], npst["has_gauss"], npst["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
