"""`pull` and `models` through the output layer: progress on stderr, results on stdout, `--json` that
parses, and no progress-bar bytes in a redirected stdout."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from selfhost.cli.app import app
from selfhost.models.store import Store
from tests.conftest import TINY_REPO, checkout_env, selfhost_command
from tests.fakes.tinygguf import gguf_bytes


@pytest.mark.parametrize("force_terminal", [False, True])
def test_pull_redirected_to_a_file_keeps_the_bar_out_of_it(tiny_hub, tmp_path, force_terminal):  # noqa: F811
    """`selfhost pull X > out.txt`: the file gets the result, the bar (even a live one) goes to stderr."""
    tiny_hub.throttle_bps = 400_000  # a second or so: the bar redraws a few times
    env = checkout_env(
        HF_ENDPOINT=tiny_hub.url, **({"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"} if force_terminal else {})
    )
    env.pop("NO_COLOR", None)
    out_file = tmp_path / "out.txt"
    with open(out_file, "wb") as stdout:
        done = subprocess.run(
            selfhost_command("pull", f"{TINY_REPO}:F32"),
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr.decode()
    text = out_file.read_bytes()
    if force_terminal:  # FORCE_COLOR may colour the result (SGR codes), never draw a bar into it
        text = re.sub(rb"\x1b\[[0-9;]*m", b"", text)
    assert b"\r" not in text and b"\x1b" not in text and "━".encode() not in text, text
    lines = text.decode().splitlines()
    assert lines[0].startswith(f"{TINY_REPO}:F32: downloaded and verified (sha256 ") and len(lines) == 2
    assert Path(lines[1].strip()) == Store().get(f"{TINY_REPO}:F32").path
    stderr = done.stderr.decode()
    assert f"{TINY_REPO}:F32: tiny-F32.gguf (" in stderr  # what NAME turned out to be
    if force_terminal:
        assert "\x1b" in stderr  # the live bar really was drawn, on stderr


def test_pull_json_and_dry_run_json(tiny_hub, runner):  # noqa: F811
    plan = runner.invoke(app, ["pull", "tiny:F32", "--dry-run", "--json"])
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.stdout)
    assert data["dry_run"] is True and data["name"] == "tiny:F32" and data["repo"] == TINY_REPO
    assert data["to_download"] == len(gguf_bytes("f32")) and data["files"][0]["file"] == "tiny-F32.gguf"
    assert Store().list() == []

    pulled = runner.invoke(app, ["pull", "tiny:F32", "--json"])
    assert pulled.exit_code == 0, pulled.output
    data = json.loads(pulled.stdout)
    assert data["downloaded"] is True and data["record"]["name"] == "tiny:F32"
    assert data["record"]["path"] == str(Store().get("tiny:F32").path)
    again = json.loads(runner.invoke(app, ["pull", "tiny:F32", "--json"]).stdout)
    assert again["downloaded"] is False


def test_models_list_show_rm_json(tiny_hub, runner):  # noqa: F811
    assert runner.invoke(app, ["pull", "tiny:F32"]).exit_code == 0
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [r["name"] for r in json.loads(listed.stdout)] == ["tiny:F32"]
    available = json.loads(runner.invoke(app, ["models", "list", "--available", "--json"]).stdout)
    assert {"alias": "tiny", "pulled": True}.items() <= next(
        r for r in available if r["alias"] == "tiny"
    ).items()
    shown = runner.invoke(app, ["models", "show", "tiny:f32", "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["name"] == "tiny:F32" and data["source"] == "hub" and data["quant"] == "F32"
    path = Store().get("tiny:F32").path
    removed = runner.invoke(app, ["models", "rm", "tiny:f32", "--yes", "--json"])
    assert removed.exit_code == 0, removed.output
    data = json.loads(removed.stdout)
    assert data == {
        "name": "tiny:F32",
        "path": str(path),
        "outcome": "removed",
        "freed_bytes": data["freed_bytes"],
    }
    assert data["freed_bytes"] == len(gguf_bytes("f32")) and not path.exists()
    assert json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout) == []


def test_rm_without_yes_off_a_terminal_refuses_through_the_one_rule(tiny_hub, runner):  # noqa: F811
    assert runner.invoke(app, ["pull", "tiny:F32"]).exit_code == 0
    refused = runner.invoke(app, ["models", "rm", "tiny:F32", "--json"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert "refusing without a terminal (pass --yes)" in refused.stderr
    assert Store().get("tiny:F32") is not None
