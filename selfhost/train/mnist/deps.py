"""Optional dependencies of the MNIST trainer, imported on first use with a one-line error if missing."""

from __future__ import annotations

from types import ModuleType

from selfhost.errors import DependencyError

INSTALL_HINT = "install selfhost[train]: pip install 'selfhost[train]'"


def torch() -> ModuleType:
    try:
        import torch as module
    except ImportError:
        raise DependencyError("PyTorch is not installed", hint=INSTALL_HINT) from None
    return module


def safetensors_torch() -> ModuleType:
    try:
        import safetensors.torch as module
    except ImportError:
        raise DependencyError("safetensors is not installed", hint=INSTALL_HINT) from None
    return module


def pil_image() -> ModuleType:
    try:
        from PIL import Image as module
    except ImportError:
        raise DependencyError("Pillow is not installed (needed to read images)", hint=INSTALL_HINT) from None
    return module
