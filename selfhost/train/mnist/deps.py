"""Optional dependencies of the MNIST trainer, imported on first use with a one-line error if missing."""

from __future__ import annotations

import os
import sys
from types import ModuleType

from selfhost.errors import DependencyError

INSTALL_HINT = "install selfhost[train]: pip install 'selfhost[train]'"


def torch() -> ModuleType:
    if "torch" not in sys.modules:
        # OpenMP threads that spin while waiting make a CPU shared with other work crawl (measured on
        # 2 cores with a second job: >5x slower); sleeping waiters cost nothing measurable when idle.
        # Read once when OpenMP loads, so it only helps if torch was not imported yet.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
