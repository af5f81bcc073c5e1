"""`--resume`: the settings a resumed run keeps or may change, and the checkpoint's state put back
(model, optimizer, schedule, loss scaler, every RNG and each rank's data position)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from selfhost.errors import IntegrityError, UsageError
from selfhost.train.gpt import checkpoint, options
from selfhost.train.gpt.config import TrainConfig
from selfhost.train.gpt.devices import Dist
from selfhost.train.gpt.optim import Stepper

# Settings a resumed run may change; everything else comes from the checkpoint.
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "sample_tokens", "device", "dtype",
             "compile", "threads"}  # fmt: skip


def resume_config(saved: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The checkpoint's settings, with the flags a resumed run may change (RESUMABLE: e.g. more --iters);
    any other flag must repeat the checkpoint's value (a smaller --block-size is allowed)."""
    values = dict(saved)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in RESUMABLE:
            values[key] = value
        elif key == "block_size" and value > saved["block_size"]:
            raise UsageError(
                f"block size {value} is larger than the model's context of {saved['block_size']}",
                hint="a resumed run keeps its model; train a new one for a longer context",
            )
        elif value != saved.get(key):
            flag = options.flag(key)
            raise UsageError(f"{flag} {value} differs from the checkpoint's {saved.get(key)}",
                             hint="a resumed run keeps its model, data and optimiser settings")  # fmt: skip
    return TrainConfig.validated(values, {key: options.flag(key) for key in overrides})


def restore(ckpt: dict[str, Any], path: Path, raw_model: Any, stepper: Stepper, sampler: Any,
            dist: Dist) -> tuple[int, float]:  # fmt: skip
    """Put a checkpoint's state back (checked by checkpoint.load; what torch still refuses is
    reported as a damaged checkpoint, not an internal error). Returns (step, best val loss)."""
    try:
        raw_model.load_state_dict(ckpt["model"])
        stepper.load_optimizer_state(ckpt["optimizer"])
        stepper.load_scheduler_state(ckpt["scheduler"])
        if ckpt.get("scaler"):
            stepper.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        checkpoint.set_rng_state(rng)
        ranks = rng.get("ranks", [])
        mine = ranks[dist.rank] if dist.rank < len(ranks) else None
        if mine is not None:
            torch.set_rng_state(mine["torch"])
            sampler.set_state(mine["sampler"])
        elif dist.rank == 0:
            sampler.set_state(rng["sampler"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise IntegrityError(f"checkpoint {path} is damaged: {type(exc).__name__}: {str(exc)[:200]}",
                             hint="resume from an earlier run or train again") from None  # fmt: skip
    return int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
