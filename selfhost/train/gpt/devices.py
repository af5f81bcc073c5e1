"""Where a run computes: its process in a DDP job (torchrun's RANK/WORLD_SIZE), the training dtype
and autocast, and batches moved to the device."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selfhost.errors import UsageError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype != torch.float32 and device.type != "cuda":
        raise UsageError(f"--dtype {name} needs a CUDA GPU", hint="use --dtype float32 on CPU/MPS")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(x: np.ndarray, y: np.ndarray, device: torch.device) -> Batch:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if device.type == "cuda":
        return xt.pin_memory().to(device, non_blocking=True), yt.pin_memory().to(device, non_blocking=True)
    return xt.to(device), yt.to(device)
