"""A reply the history cannot store (full disk, locked database) is shown and kept, and the user is told.

On the fake engine (tests/fakes/engine.py): what the model says does not matter here."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfhost.chat.history import ChatLog
from selfhost.cli.app import app
from selfhost.errors import HistoryDiskFullError


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, *args, **kwargs) -> None:  # noqa: ANN001
        raise HistoryDiskFullError("the disk is full: the last turn was not saved to the history")

    monkeypatch.setattr(ChatLog, "save", refuse)


def test_one_shot_prints_the_reply_then_says_it_was_not_saved(
    runner, tiny_gguf: Path, full_disk, fake_model
) -> None:
    result = runner.invoke(app, ["chat", str(tiny_gguf), "-p", "hello", "-n", "8", "--seed", "1"])
    assert result.exit_code == 1
    reply_line, error_line = result.stdout.strip().splitlines()[-1], result.stderr.strip().splitlines()[-1]
    assert reply_line == "Reply 1 from the fake model."  # the reply was printed before the error
    assert error_line == "error: the disk is full: the last turn was not saved to the history"


def test_repl_keeps_the_reply_and_goes_on(runner, tiny_gguf: Path, full_disk, fake_model) -> None:
    result = runner.invoke(
        app, ["chat", str(tiny_gguf), "-n", "4", "--seed", "1"], input="hi\n/history\n/exit\n"
    )
    assert result.exit_code == 0
    assert result.stderr.count("was not saved") == 1
    assert "\nassistant (4 tok, length): Reply 1 from the" in result.stdout  # kept in the conversation
