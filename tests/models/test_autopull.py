"""Auto-pull, like `ollama run`: `chat`, `serve` and `quantize` on an alias or owner/repo that is not
downloaded yet pull it with `--pull`, ask on a terminal, and without either say the fix in one line
and download nothing."""

from __future__ import annotations

import json

import pytest

from selfhost.cli import output
from selfhost.cli.app import app
from selfhost.models.store import Store
from tests.conftest import TINY_REPO, one_error_line
from tests.models.test_pull import state

FAST = ["--threads", "1"]
ONE_SHOT = ["-p", "hi", "-n", "4", "--seed", "1", "--no-log", *FAST]


@pytest.mark.needs_model
def test_chat_alias_with_pull_downloads_registers_and_answers(tiny_hub, runner):  # noqa: F811
    result = runner.invoke(app, ["chat", "tiny", "--pull", "--json", *ONE_SHOT])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["usage"]["generated_tokens"] > 0  # stdout: only the answer
    assert "tiny:F16: tiny-F16.gguf" in result.stderr  # what was pulled, on stderr
    record = Store().get("tiny:F16")
    assert record is not None and record.source == "hub" and record.path.exists()
    tiny_hub.reset_counters()
    again = runner.invoke(app, ["chat", "tiny", "--pull", *ONE_SHOT])  # here now: no second download
    assert again.exit_code == 0, again.output
    assert tiny_hub.requests == []


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "tiny", *ONE_SHOT],
        ["chat", f"{TINY_REPO}:F32", *ONE_SHOT],
        ["chat", f"{TINY_REPO}:tiny-F32.gguf", *ONE_SHOT],
        ["quantize", "tiny:f32", "--type", "Q8_0"],
        ["serve", "tiny", "--port", "0"],
    ],
)
def test_without_pull_and_without_a_terminal_one_line_and_nothing_downloaded(tiny_hub, runner, args):  # noqa: F811
    before = state()
    result = runner.invoke(app, args)  # CliRunner: stdin is no terminal
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "is not downloaded" in line and "pass --pull" in line and "`selfhost pull " in line
    assert result.stdout == ""
    assert state() == before and tiny_hub.bytes_served == 0  # neither the store nor the cache changed


@pytest.mark.needs_model
def test_on_a_terminal_it_asks(tiny_hub, runner, monkeypatch):  # noqa: F811
    monkeypatch.setattr(output, "is_interactive", lambda: True)
    before = state()
    declined = runner.invoke(app, ["chat", "tiny:F32", *ONE_SHOT], input="n\n")
    assert declined.exit_code == 1 and "tiny:F32 is not downloaded. Pull it now?" in declined.output
    assert state() == before and tiny_hub.bytes_served == 0
    accepted = runner.invoke(app, ["chat", "tiny:F32", *ONE_SHOT], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert Store().get("tiny:F32") is not None


@pytest.mark.needs_model
def test_quantize_with_pull(tiny_hub, runner):  # noqa: F811
    result = runner.invoke(app, ["quantize", f"{TINY_REPO}:F32", "--pull", "--type", "Q8_0", *FAST])
    assert result.exit_code == 0, result.output
    assert Store().get(f"{TINY_REPO}:F32") is not None and Store().get(f"{TINY_REPO}:Q8_0") is not None


def test_what_a_pull_cannot_fix_is_not_pulled(tiny_hub, runner):  # noqa: F811
    """An embedding model is refused for chat before anything is fetched, --pull or not; an unknown
    name is unknown; a bad quant of an alias is named by the pull."""
    before = state()
    embed = runner.invoke(app, ["chat", "nomic-embed-text-v1.5", "--pull", *ONE_SHOT])
    assert embed.exit_code != 0 and "is an embedding model" in one_error_line(embed)
    unknown = runner.invoke(app, ["chat", "no-such-model", "--pull", *ONE_SHOT])
    assert unknown.exit_code != 0 and "unknown model 'no-such-model'" in one_error_line(unknown)
    bad_quant = runner.invoke(app, ["chat", "tiny:Q9_X", "--pull", *ONE_SHOT])
    assert bad_quant.exit_code != 0 and "tiny has no quant Q9_X" in one_error_line(bad_quant)
    assert state() == before and tiny_hub.bytes_served == 0
