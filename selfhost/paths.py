"""Where selfhost keeps its files. Everything lives under SELFHOST_HOME."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from selfhost import env


def home() -> Path:
    """SELFHOST_HOME, else the platform's per-user data directory."""
    configured = env.home()
    if configured:
        root = configured
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Application Support" / "selfhost"
    elif sys.platform == "win32":
        root = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "selfhost"
    else:
        root = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "selfhost"
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Files selfhost creates itself (quantized, trained, imported copies)."""
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Downloaded datasets (MNIST, ...)."""
    path = home() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Training runs: checkpoints, tokenizers, logs."""
    path = home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_file() -> Path:
    return home() / "store.json"


def history_db() -> Path:
    return home() / "history.db"


def user_registry() -> Path:
    """Optional user registry that extends/overrides the shipped models.toml."""
    return home() / "models.toml"
