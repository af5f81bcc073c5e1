"""Where selfhost keeps its files. Everything lives under SELFHOST_HOME."""

from __future__ import annotations

from pathlib import Path

from selfhost import env


def home() -> Path:
    """SELFHOST_HOME, else the platform's per-user data directory (platformdirs: ~/.local/share/selfhost
    or $XDG_DATA_HOME/selfhost on Linux, ~/Library/Application Support/selfhost on macOS,
    %LOCALAPPDATA%\\selfhost on Windows)."""
    root = env.home()
    if root is None:
        from platformdirs import user_data_dir

        root = Path(user_data_dir("selfhost", appauthor=False))
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
