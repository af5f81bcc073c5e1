"""The shared event vocabulary and CLI output layer (selfhost.events, selfhost.cli.output)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from selfhost.cli import output
from selfhost.errors import UsageError
from selfhost.events import Notice, Progress, Result, run_to_end


def _operation(n: int):
    yield Notice("starting")
    for i in range(1, n + 1):
        yield Progress("work", i, n, unit="step")
    yield Result({"steps": n})


def test_run_to_end_returns_the_result_and_passes_every_event():
    seen = []
    assert run_to_end(_operation(3), seen.append) == {"steps": 3}
    assert [type(e).__name__ for e in seen] == ["Notice", "Progress", "Progress", "Progress", "Result"]


def test_run_to_end_refuses_an_operation_without_exactly_one_result():
    with pytest.raises(RuntimeError):
        run_to_end(iter([Notice("x")]))
    with pytest.raises(RuntimeError):
        run_to_end(iter([Result(1), Result(2)]))


def test_output_run_sends_progress_and_notices_to_stderr_only(capsys):
    value = output.Output().run(_operation(4))
    captured = capsys.readouterr()
    assert value == {"steps": 4}
    assert captured.out == ""
    assert "starting" in captured.err and "work: 4 step done" in captured.err
    assert "\x1b" not in captured.err and "\r" not in captured.err  # off a terminal: plain lines


def test_json_writer_handles_the_types_commands_return(capsys):
    @dataclasses.dataclass
    class Row:
        path: Path
        size: int

    output.Output(json_mode=True).result({"rows": [Row(Path("/a"), 3)], "tags": ("x",)}, human=print)
    assert json.loads(capsys.readouterr().out) == {"rows": [{"path": "/a", "size": 3}], "tags": ["x"]}


def test_confirm_refuses_without_a_terminal_and_passes_with_yes(monkeypatch):
    monkeypatch.setattr(output, "is_interactive", lambda: False)
    output.Output().confirm("remove x?", yes=True)
    with pytest.raises(UsageError, match="--yes"):
        output.Output().confirm("remove x?", yes=False)


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "?"), (4.26, "4.3 s"), (185, "3m 05s"), (7380, "2h 03m"), (90000, "1d 1h")]
)
def test_fmt_duration(seconds, text):
    assert output.fmt_duration(seconds) == text


def test_fmt_count_and_bytes():
    assert output.fmt_count(1_500_000) == "1.5M"
    assert output.fmt_count(1_500_000, exact=True) == "1.50M (1,500,000)"
    assert output.fmt_count(999) == "999"
    assert output.fmt_bytes(98_000_000) == "98.0 MB"


def test_output_run_holds_operations_to_exactly_one_result():
    with pytest.raises(RuntimeError, match="exactly one Result"):
        output.Output().run(iter([Notice("x")]))
    with pytest.raises(RuntimeError, match="exactly one Result"):
        output.Output().run(iter([Result(1), Result(2)]))


def test_output_run_keeps_the_result_when_a_hook_renders_it(capsys):
    assert output.Output().run(_operation(2), on_event=lambda event: True) == {"steps": 2}
    assert capsys.readouterr().err == ""  # the hook rendered everything (here: nothing)
