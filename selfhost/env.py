"""Every SELFHOST_* environment variable, read in this one place and typed.

Each accessor reads the environment when called (tests and child processes change it), so a value is
never cached stale; but no other module reads a SELFHOST_* variable itself (tests/test_architecture.py
checks that). Booleans share one rule: unset, "", "0", "false", "no" and "off" are off; anything else on.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME = "SELFHOST_HOME"  # where selfhost keeps its files (default: the platform's data directory)
DEBUG = "SELFHOST_DEBUG"  # tracebacks and llama.cpp's log on stderr
API_KEY = "SELFHOST_API_KEY"  # `selfhost serve`'s key when --api-key is not given
CONVERT_PYTHON = "SELFHOST_CONVERT_PYTHON"  # an interpreter that has llama.cpp's converter
MNIST_MIRRORS = "SELFHOST_MNIST_MIRRORS"  # comma-separated base URLs used instead of the defaults

ALL = (HOME, DEBUG, API_KEY, CONVERT_PYTHON, MNIST_MIRRORS)
_OFF = ("", "0", "false", "no", "off")


def flag(name: str) -> bool:
    """The one boolean rule for every SELFHOST_* switch."""
    return os.environ.get(name, "").strip().lower() not in _OFF


def text(name: str) -> str | None:
    """A string variable; unset or empty is None."""
    value = os.environ.get(name, "")
    return value or None


def home() -> Path | None:
    value = text(HOME)
    return Path(value).expanduser() if value else None


def debug() -> bool:
    return flag(DEBUG)


def api_key() -> str | None:
    return text(API_KEY)


def convert_python() -> str | None:
    return text(CONVERT_PYTHON)


def mnist_mirrors() -> list[str]:
    return [m.strip() for m in (text(MNIST_MIRRORS) or "").split(",") if m.strip()]
