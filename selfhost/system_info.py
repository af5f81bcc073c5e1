"""What this installation can do: versions, where files live, llama.cpp backend, PyTorch device."""

from __future__ import annotations

import importlib.util
import platform

from pydantic import BaseModel

from selfhost import __version__, paths


class TorchInfo(BaseModel):
    installed: bool
    version: str | None = None
    device: str | None = None  # "cuda (NVIDIA H100 80GB HBM3)", "mps", "cpu"


class SystemInfo(BaseModel):
    selfhost_version: str
    python: str
    platform: str
    home: str
    llama_backend: str
    llama_gpu_offload: bool
    llama_cpp_version: str
    llama_system_info: str
    torch: TorchInfo
    embedded_model: str | None


def torch_info() -> TorchInfo:
    if importlib.util.find_spec("torch") is None:
        return TorchInfo(installed=False)
    import torch

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    return TorchInfo(installed=True, version=torch.__version__, device=device)


def collect() -> SystemInfo:
    from selfhost.models.embedded import DEFAULT_MODEL, embedded_path
    from selfhost.runtime.llama_backend import backend_info

    backend = backend_info()
    embedded = embedded_path(DEFAULT_MODEL)
    return SystemInfo(
        selfhost_version=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        home=str(paths.home()),
        llama_backend=backend.name,
        llama_gpu_offload=backend.gpu_offload,
        llama_cpp_version=backend.llama_cpp_version,
        llama_system_info=backend.system_info,
        torch=torch_info(),
        embedded_model=str(embedded) if embedded else None,
    )
