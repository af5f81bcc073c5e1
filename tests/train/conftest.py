"""Fixtures of the training tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    """Two torch threads in every test that has torch loaded: no oversubscription of the 2-core CI."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(2)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small English text to train a character model on."""
    path = tmp_path / "text.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 60, "utf-8")
    return path
