"""Checkpoints: written atomically (temp + rename), read back with `torch.load(weights_only=True)`.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only, so loading it never
unpickles arbitrary objects: model + optimizer + scheduler state, every RNG (torch, cuda, numpy,
python, the batch sampler's) and the step to continue from, plus the config and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
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
from selfhost.train.gpt.model import CausalLM, GPTConfig, build_model

FORMAT = "selfhost-gpt"
VERSION = 1
CKPT_NAME = "ckpt.pt"  # the latest state: model, optimizer, RNG... (what --resume reads)
BEST_NAME = "best.pt"  # the weights with the lowest val loss so far (what export and sample read)


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically: a crash or Ctrl-C leaves the previous checkpoint intact."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic.sweep_stale(Path(path).parent)  # temp files of a run killed while it saved
    with atomic.atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    return Path(path)


def load(path: Path, map_location: str | torch.device = "cpu", resume: bool = False) -> dict[str, Any]:
    """Read a checkpoint (weights only) and check it field by field (`resume`: also the optimizer,
    scheduler, step and RNG state a resumed run needs). Raises NotFoundError / IntegrityError
    with one clear line."""
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
    required = ("model_args", "config", "tokenizer", "model") + (RESUME_KEYS if resume else ())
    for key in required:
        if key not in data:
            raise IntegrityError(f"checkpoint {path} is incomplete (no '{key}')")
    try:
        validate(data)
    except IntegrityError as exc:
        raise IntegrityError(f"checkpoint {path} is damaged: {exc.message}",
                             hint="resume from an earlier run or train again") from None  # fmt: skip
    return data


RESUME_KEYS = ("optimizer", "scheduler", "iter_num", "best_val_loss", "rng")
_MODEL_ARG_BOUNDS = {
    "vocab_size": (1, 10_000_000),
    "block_size": (1, 1 << 20),
    "n_layer": (1, 512),
    "n_head": (1, 4096),
    "n_embd": (1, 1 << 16),
}


def validate(data: dict[str, Any]) -> None:
    """Every field a loader reads, checked for type, range, shape and finite values (IntegrityError)."""
    args = _model_args(data["model_args"])
    _check(isinstance(data["config"], dict), "config is not a table")
    _check(isinstance(data["tokenizer"], str), "tokenizer is not a saved tokenizer (JSON text)")
    _state_dict(data["model"], args)
    if "iter_num" in data:
        it = data["iter_num"]
        _check(isinstance(it, int) and not isinstance(it, bool) and it >= 0, f"iter_num is {it!r}")
    for key in ("best_val_loss", "val_loss"):
        value = data.get(key)
        _check(
            value is None or (isinstance(value, (int, float)) and not math.isnan(value)),
            f"{key} is {value!r}",
        )
    if "optimizer" in data:
        _optimizer(data["optimizer"])
    if "scheduler" in data:
        _check(isinstance(data["scheduler"], dict), "scheduler is not a table")
    if "rng" in data:
        _rng(data["rng"])


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise IntegrityError(message)


def _model_args(args: Any) -> dict[str, Any]:
    _check(isinstance(args, dict), "model_args is not a table")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(args) - fields
    _check(not unknown, f"model_args has unknown field {sorted(map(str, unknown))[:1]}")
    for key, (low, high) in _MODEL_ARG_BOUNDS.items():
        value = args.get(key)
        _check(
            isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
            f"model_args.{key} is {value!r}, expected an integer in {low}..{high}",
        )
    _check(args["n_embd"] % args["n_head"] == 0, "model_args.n_head does not divide n_embd")
    _check(args.get("arch", "gpt2") in ("gpt2", "llama"), f"model_args.arch is {args.get('arch')!r}")
    kv = args.get("n_kv_head", 0)
    _check(isinstance(kv, int) and kv >= 0 and (kv == 0 or args["n_head"] % kv == 0),
           f"model_args.n_kv_head is {kv!r}")  # fmt: skip
    dropout = args.get("dropout", 0.0)
    _check(isinstance(dropout, (int, float)) and 0 <= dropout < 1, f"model_args.dropout is {dropout!r}")
    return args


def _state_dict(state: Any, args: dict[str, Any]) -> None:
    """The weights: exactly the tensors of GPT(model_args), same shapes, finite floats."""
    _check(isinstance(state, dict), "model is not a table of tensors")
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: tuple(v.shape) for k, v in build_model(GPTConfig(**args)).state_dict().items()}
    for key, tensor in state.items():
        _check(isinstance(tensor, torch.Tensor), f"model.{key} is not a tensor")
        _check(key in expected, f"model has an unexpected tensor '{key}'")
        _check(
            tuple(tensor.shape) == expected[key],
            f"model.{key} has shape {tuple(tensor.shape)}, expected {expected[key]}",
        )
        _check(tensor.is_floating_point(), f"model.{key} is {tensor.dtype}, not floating point")
        _check(bool(torch.isfinite(tensor).all()), f"model.{key} holds NaN or infinite values")
    missing = sorted(set(expected) - set(state))
    _check(not missing, f"model has no tensor '{missing[0] if missing else ''}'")


def _optimizer(opt: Any) -> None:
    _check(
        isinstance(opt, dict)
        and isinstance(opt.get("state"), dict)
        and isinstance(opt.get("param_groups"), list),
        "optimizer state is malformed",
    )
    for group in opt["param_groups"]:
        _check(
            isinstance(group, dict)
            and isinstance(group.get("params"), list)
            and all(isinstance(p, int) for p in group["params"]),
            "optimizer param_groups are malformed",
        )
    for key, entry in opt["state"].items():
        _check(isinstance(entry, dict), f"optimizer state {key!r} is malformed")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                _check(bool(torch.isfinite(value).all()), f"optimizer state {key}.{name} is not finite")


def _rng(rng: Any) -> None:
    _check(isinstance(rng, dict), "rng is not a table")
    t = rng.get("torch")
    _check(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == torch.get_rng_state().shape,
        "rng.torch is not a torch RNG state",
    )
    npst = rng.get("numpy")
    _check(
        isinstance(npst, dict)
        and isinstance(npst.get("keys"), torch.Tensor)
        and tuple(npst["keys"].shape) == (624,)
        and isinstance(npst.get("pos"), int)
        and 0 <= npst["pos"] <= 624
        and isinstance(npst.get("has_gauss"), int)
        and isinstance(npst.get("cached"), (int, float)),
        "rng.numpy is not a numpy RNG state",
    )
    py = rng.get("python")
    _check(
        isinstance(py, (tuple, list))
        and len(py) == 3
        and isinstance(py[1], (tuple, list))
        and len(py[1]) == 625
        and all(isinstance(x, int) for x in py[1]),
        "rng.python is not a python RNG state",
    )
    sampler = rng.get("sampler")
    _check(
        sampler is None or (isinstance(sampler, dict) and isinstance(sampler.get("state"), dict)),
        "rng.sampler is not a numpy generator state",
    )
    _check(isinstance(rng.get("ranks", []), list), "rng.ranks is not a list")


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


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device) -> CausalLM:
    """A checkpoint's model in eval mode."""
    model = build_model(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
