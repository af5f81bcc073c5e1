"""What `selfhost models list --available` shows: the registry's entries, filtered by kind and by whether
they fit this machine's free memory (GPU memory when an NVIDIA GPU reports it, else RAM).

The fit is a rough rule, not a promise: the file's size plus 10 % and 0.5 GB for the KV cache of a few
thousand tokens of context and llama.cpp's buffers. Longer contexts need more.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Literal

from pydantic import BaseModel

from selfhost.models.registry import Kind, RegistryEntry, load_registry
from selfhost.runtime.memory import available_memory

Fit = Literal["gpu", "ram", "no", "?"]
OVERHEAD_BYTES = 500_000_000
OVERHEAD_FRACTION = 0.10


class MemoryBudget(BaseModel):
    ram: int | None  # bytes available now
    vram: int | None  # free bytes on the GPU with the most free memory (NVIDIA only), None if none
    gpu: str | None = None


class AvailableModel(BaseModel):
    alias: str
    entry: RegistryEntry
    size: int | None  # bytes of the default quant
    need: int | None  # rough bytes to run it
    fit: Fit
    pulled: bool


def gpu_free_memory() -> tuple[int, str] | None:
    """(free bytes, name) of the NVIDIA GPU with the most free memory, from nvidia-smi; None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.free,name", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    best: tuple[int, str] | None = None
    for line in out.splitlines():
        free, _, name = line.partition(",")
        if free.strip().isdigit():
            candidate = (int(free.strip()) * 2**20, name.strip())
            best = candidate if best is None or candidate[0] > best[0] else best
    return best


def memory_budget() -> MemoryBudget:
    gpu = gpu_free_memory()
    return MemoryBudget(ram=available_memory(), vram=gpu[0] if gpu else None, gpu=gpu[1] if gpu else None)


def bytes_needed(size: int | None) -> int | None:
    return None if size is None else int(size * (1 + OVERHEAD_FRACTION)) + OVERHEAD_BYTES


def fit_of(need: int | None, budget: MemoryBudget) -> Fit:
    if need is None:
        return "?"
    if budget.vram is not None and need <= budget.vram:
        return "gpu"
    if budget.ram is not None and need <= budget.ram:
        return "ram"
    return "no" if budget.ram is not None or budget.vram is not None else "?"


def available_models(
    *, kind: Kind | None = None, fits: bool = False, budget: MemoryBudget | None = None,
    pulled: set[str] | None = None,
) -> list[AvailableModel]:  # fmt: skip
    """Registry entries (of `kind`; only those that fit when `fits`), grouped by kind, smallest first."""
    budget = budget or memory_budget()
    rows = []
    for alias, entry in load_registry().models.items():
        if kind is not None and entry.kind != kind:
            continue
        size = entry.size_bytes()
        need = bytes_needed(size)
        fit = fit_of(need, budget)
        if fits and fit not in ("gpu", "ram"):
            continue
        rows.append(AvailableModel(alias=alias, entry=entry, size=size, need=need, fit=fit,
                                   pulled=alias in (pulled or set())))  # fmt: skip
    order = {"chat": 0, "base": 1, "embedding": 2, "rerank": 3}
    return sorted(rows, key=lambda r: (order[r.entry.kind], r.size or 0, r.alias))
