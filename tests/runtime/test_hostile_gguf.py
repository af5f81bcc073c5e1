"""Hostile GGUF files (issue 12, items 1-2): refused with one line before llama.cpp sees them;
what is accepted loads and runs. No signal, no hang, no internal error, nothing registered that
would not load."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from selfhost.errors import GGUFError
from selfhost.runtime import gguf_info
from tests.conftest import REPO
from tests.fakes.gguf_fuzz import Variant, corpus

# Loads each file given on the command line in llama.cpp and evaluates a few tokens; an abort
# kills this child, never pytest. "start" before each file tells which one did it.
LOADER = """
import sys
from pathlib import Path
from selfhost.runtime.llama_backend import load_model
for name in sys.argv[1:]:
    print("start", name, flush=True)
    try:
        llm, _ = load_model(Path(name), n_ctx=64, n_threads=1)
        llm.create_completion("hello there", max_tokens=3, temperature=0.0)
        print("ok", name, flush=True)
    except Exception as exc:
        print("fail", name, type(exc).__name__, str(exc)[:200].replace(chr(10), " "), flush=True)
"""


@pytest.fixture(scope="module")
def fuzz_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Variant]:
    return corpus(tmp_path_factory.mktemp("fuzz"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}


def _split(variants: list[Variant]) -> tuple[list[Variant], list[tuple[Variant, str]]]:
    """(accepted, [(refused, message)]). Anything but GGUFError from inspect fails the test."""
    accepted, refused = [], []
    for v in variants:
        try:
            gguf_info.inspect(v.path)
        except GGUFError as exc:
            refused.append((v, exc.message))
        else:
            accepted.append(v)
    return accepted, refused


@pytest.mark.needs_model
def test_fuzz_corpus_bad_files_refused_the_rest_load_in_llama_cpp(fuzz_corpus: list[Variant]) -> None:
    assert len(fuzz_corpus) >= 150
    accepted, refused = _split(fuzz_corpus)
    wrongly_accepted = [v.name for v in accepted if v.bad is True]
    assert not wrongly_accepted, f"accepted although llama.cpp cannot use them: {wrongly_accepted}"
    wrongly_refused = [(v.name, m) for v, m in refused if v.bad is False]
    assert not wrongly_refused
    assert all("\n" not in m for _, m in refused)  # one line each
    assert len(refused) > 100 and len(accepted) >= 5

    # Every accepted file (what `pull FILE` registers) loads and evaluates: one child for all.
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, *(str(v.path) for v in accepted)],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    started = [line.split(" ", 1)[1] for line in lines if line.startswith("start ")]
    assert proc.returncode == 0, (
        f"llama.cpp died (rc {proc.returncode}) on {started[-1:]}: {proc.stderr[-500:]}"
    )
    failed = [line for line in lines if line.startswith("fail ")]
    assert not failed, f"accepted but llama.cpp refused them: {failed}"
    assert sum(line.startswith("ok ") for line in lines) == len(accepted)


SAMPLE = [
    "unchanged",
    "block_count=1000 (UINT32)",
    "attention.layer_norm_rms_epsilon=nan (FLOAT32)",
    "attention.head_count=2147483648 (UINT32)",
]


def test_fuzz_sample_through_the_cli_models_show_pull_and_chat(fuzz_corpus: list[Variant]) -> None:
    """The real commands in subprocesses: exit 0 or a one-line error; never a signal, a hang or exit 70;
    and every file `pull` registered loads."""
    by_name = {v.name: v for v in fuzz_corpus}
    flipped = [v for v in fuzz_corpus if v.bad is None][:1]
    truncated = [v for v in fuzz_corpus if v.name.startswith("truncated at")][-8]  # in the tensor table
    sample = [by_name[name] for name in SAMPLE] + [truncated] + flipped
    env = {**_env(), "SELFHOST_HOME": os.environ["SELFHOST_HOME"]}
    for v in sample:
        for args in (
            ["models", "show", str(v.path)],
            ["pull", str(v.path)],
            ["chat", str(v.path), "-p", "hi", "-n", "3", "--no-log", "--ctx", "64", "--threads", "1"],
        ):
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "selfhost", *args],
                    capture_output=True, text=True, timeout=90, env=env, cwd=REPO,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                pytest.fail(f"hang: selfhost {' '.join(args[:2])} on {v.name}")
            where = f"selfhost {args[0]} on {v.name}: rc {proc.returncode} {proc.stderr[-400:]}"
            assert proc.returncode in (0, 1), where  # no signal (negative), no 70, no 134
            assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, where
            if proc.returncode == 1:
                assert proc.stderr.strip().startswith("error:"), where
            if v.bad:
                assert proc.returncode == 1, where

    from selfhost.models.store import Store

    registered = Store().list()
    assert registered, "pull registered nothing, not even the unchanged model"
    for record in registered:
        gguf_info.inspect(record.path)  # and the loader test above shows accepted files load


SMOLLM2_CASES = [  # the reproductions: these aborted llama.cpp (SIGABRT) or crashed selfhost
    ("llama.block_count", "<I", 0, "block_count is 0"),
    ("llama.block_count", "<I", 1000, "block_count is 1000"),
    ("llama.block_count", "<I", 2**31, "block_count is 2147483648"),
    ("llama.attention.layer_norm_rms_epsilon", "<f", float("nan"), "epsilon is nan"),
    ("llama.attention.layer_norm_rms_epsilon", "<f", -1.0, "epsilon is -1.0"),
    ("llama.attention.head_count", "<I", 2**31, "head_count is 2147483648"),
    ("llama.context_length", "<I", 2**32 - 1, "context_length is 4294967295"),
    ("llama.context_length", "<I", 2**31 - 1, "context_length is 2147483647"),
    ("llama.rope.freq_base", "<f", 0.0, "freq_base is 0.0"),
    ("tokenizer.ggml.model", "<4s", b"bert", "'bert' does not go with architecture 'llama'"),
    ("tokenizer.ggml.model", "<4s", b"rwkv", "'rwkv' does not go with architecture 'llama'"),
]


def _value_offset(data: bytes, key: str) -> int:
    """Where the value of scalar `key` starts: after its name and its 4-byte type (string values:
    after their 8-byte length too)."""
    at = data.index(key.encode() + b"\x08\x00\x00\x00") if key.startswith("tokenizer.") else -1
    if at >= 0:
        return at + len(key) + 4 + 8
    return data.index(key.encode()) + len(key) + 4


def test_smollm2_with_one_bad_field_is_refused_by_every_loader(smollm2_gguf: Path, tmp_path: Path) -> None:
    from selfhost.runtime.llama_backend import load_model

    bad = tmp_path / "smollm2-bad.gguf"
    bad.write_bytes(smollm2_gguf.read_bytes())
    head = smollm2_gguf.read_bytes()[: 4 << 20]  # the key/value table is in the first MBs
    for key, fmt, value, expect in SMOLLM2_CASES:
        at = _value_offset(head, key)
        original = head[at : at + struct.calcsize(fmt)]
        with open(bad, "r+b") as fh:
            fh.seek(at)
            fh.write(struct.pack(fmt, value))
        with pytest.raises(GGUFError, match=expect.replace(".", r"\.")):
            gguf_info.inspect(bad)
        with pytest.raises(GGUFError):  # load_model itself refuses, whoever calls it
            load_model(bad, n_ctx=64)
        with open(bad, "r+b") as fh:
            fh.seek(at)
            fh.write(original)
    gguf_info.inspect(bad)  # restored: the real file passes


def test_the_real_smollm2_passes(smollm2_gguf: Path) -> None:
    info = gguf_info.inspect(smollm2_gguf)
    assert info.architecture == "llama" and info.n_layers == 30
