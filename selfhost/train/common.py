"""What the GPT and MNIST trainers share: the optional-dependency guard, the device picker, the CPU
thread count and the settings base class. Importing this module does not import torch.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfhost.errors import DependencyError, UsageError

INSTALL_HINT = "install selfhost[train]"


# -- optional dependencies ----------------------------------------------------------------------
def require(module: str, what: str) -> ModuleType:
    """Import `module` or raise a one-line DependencyError naming `what` and the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DependencyError(f"{what} is not installed", hint=INSTALL_HINT) from None


def require_torch(passive_openmp: bool = False) -> ModuleType:
    """Import torch (the `train` extra) or raise a one-line DependencyError.

    `passive_openmp`: OpenMP threads that spin while waiting make a CPU shared with other work crawl
    (measured for MNIST on 2 cores with a second job: >5x slower); sleeping waiters cost nothing
    measurable when idle. Read once when OpenMP loads, so it only helps if torch was not imported yet."""
    if passive_openmp and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return require("torch", "PyTorch")


# -- devices and CPU threads ----------------------------------------------------------------------
def pick_device(name: str = "auto", local_rank: int = 0) -> Any:
    """'auto' -> cuda > mps > cpu; an explicit device (cpu, cuda, cuda:N, mps) must exist.
    A bare 'cuda' is this process's GPU (`local_rank` under torchrun)."""
    torch = require_torch()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available to PyTorch", hint="use --device cpu")
        return torch.device("cuda", local_rank if device.index is None else device.index)
    if device.type == "mps" and not has_mps:
        raise UsageError("--device mps: Metal is not available to PyTorch", hint="use --device cpu")
    if device.type not in ("cpu", "mps"):
        raise UsageError(f"unsupported device {name!r}", hint="use auto, cpu, cuda or mps")
    return device


def device_name(device: Any) -> str:
    """The GPU's model name, or CPU / MPS."""
    if device.type == "cuda":
        return require_torch().cuda.get_device_name(device)
    return device.type.upper()


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cores() -> float:
    """Cores other programs keep busy now: on Linux the median of a few samples of the runnable tasks in
    /proc/loadavg (not the 1-minute average, which still counts a run that just ended), else the load."""
    try:
        samples = []
        for _ in range(5):
            with open("/proc/loadavg") as fh:
                samples.append(int(fh.read().split()[3].split("/")[0]) - 1)  # minus this process
            time.sleep(0.02)
        return float(max(0, sorted(samples)[2]))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def resolve_threads(
    requested: int, device: Any, processes: int = 1, free_cores_only: bool = True
) -> int | None:
    """Set and return the CPU threads of this process; None: PyTorch's choice is kept (a GPU run, or
    OMP_NUM_THREADS given, as torchrun does). Auto (0) is this process's share of the cores and, with
    `free_cores_only`, only of those other programs leave free: on a busy machine two OpenMP threads spin
    in barriers while their partner waits for a core, and a GPT step took 5x longer than with one thread
    (bench/train_gpt.py --before measures a whole run)."""
    if requested == 0 and (device.type != "cpu" or "OMP_NUM_THREADS" in os.environ):
        return None
    n = requested
    if n == 0:
        share = max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
        n = max(1, min(share, round(cpu_cores() - busy_cores()))) if free_cores_only else share
    require_torch().set_num_threads(n)
    return n


# -- settings -----------------------------------------------------------------------------------
class TrainSettings(BaseModel):
    """Base of a trainer's settings: unknown keys are errors, assignments are checked, and
    `validated()` turns a bad value into one line naming the setting."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, mps
    threads: int = Field(0, ge=0)  # CPU threads per process (0: auto)
    seed: int = 0

    @classmethod
    def validated(cls, values: dict[str, Any], origins: Mapping[str, str] | None = None) -> Self:
        """The settings, or one line naming the bad one where the user gave it: `origins` maps a field
        to its flag or its config file's key (default: `--` + the field with dashes)."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            msg = first["msg"].removeprefix("Value error, ")
            if not first["loc"]:  # a rule across settings (a model validator)
                raise UsageError(f"invalid training settings: {msg}") from exc
            field = str(first["loc"][0])
            where = (origins or {}).get(field) or "--" + field.replace("_", "-")
            if first["type"] == "extra_forbidden":
                raise UsageError(f"unknown training setting {where}") from exc
            raise UsageError(f"invalid {where}: {msg} (got {first['input']!r})") from exc
