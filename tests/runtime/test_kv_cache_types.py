"""KV-cache types (q8_0, q4_0) and flash attention on real llama.cpp (SmolLM2): the same greedy answer,
perplexity within a stated bound of F16, the memory estimate matches llama.cpp's allocation, and a
quantized V cache without flash attention is refused by us first, in one line."""

from __future__ import annotations

import ctypes
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfhost.chat.model import ChatModel, EngineOptions
from selfhost.errors import UsageError
from selfhost.runtime import gguf_info
from selfhost.runtime.jobs import Job, JobText
from selfhost.runtime.kvcache import KVSettings
from selfhost.runtime.llama_backend import capture_logs, llama, load_model
from selfhost.runtime.llama_context import open_context
from selfhost.runtime.memory import kv_bytes_per_token
from selfhost.runtime.sampler import SamplingParams

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from those used to make "
    "wine. Books became cheaper, literacy spread across Europe, and ideas travelled faster than ever "
    "before. Within fifty years, printers in more than two hundred cities had produced millions of "
    "copies, and the way people learned, argued and worshipped changed for good."
)
PPL_BOUND = {"q8_0": 1.02, "q4_0": 1.10}  # perplexity at most this many times F16's on TEXT


def perplexity(path: Path, kv: KVSettings) -> float:
    lib = llama()
    llm, _ = load_model(path, n_ctx=64, n_threads=2)
    ctx = open_context(llm.model, n_ctx=256, n_batch=256, threads=2, kv=kv)
    try:
        tokens = llm.tokenize(TEXT.encode(), add_bos=True)
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(tokens)
        assert lib.llama_decode(ctx, batch) == 0
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(llm.model))
        ptr = ctypes.cast(lib.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
        logits = np.ctypeslib.as_array(ptr, shape=(len(tokens), n_vocab)).astype(np.float64)
        lib.llama_batch_free(batch)
    finally:
        lib.llama_free(ctx)
        llm.close()
    top = logits.max(axis=1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    nll = -np.mean([logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)])
    return math.exp(nll)


def answer(path: Path, kv: KVSettings) -> str:
    model = ChatModel.load(Path(path), ctx=256, threads=2, options=EngineOptions(kv=kv))
    try:
        tokens = model.tokenize_prompt(
            model.render(
                [
                    {"role": "system", "content": "Answer in one short sentence."},
                    {"role": "user", "content": "What is the capital of France?"},
                ]
            )
        )
        job = model.engine.submit(Job(tokens, SamplingParams(temperature=0), max_tokens=16))
        return "".join(c.text for c in job.chunks() if isinstance(c, JobText))
    finally:
        model.close()


@pytest.mark.parametrize("cache_type", ["q8_0", "q4_0"])
def test_quantized_kv_gives_the_same_answer_and_a_close_perplexity(
    smollm2_gguf: Path, cache_type: str
) -> None:
    f16 = KVSettings(flash_attn="on")
    quant = KVSettings(type_k=cache_type, type_v=cache_type, flash_attn="on")
    reference = answer(smollm2_gguf, f16)
    assert "Paris" in reference
    assert answer(smollm2_gguf, quant) == reference
    base, ppl = perplexity(smollm2_gguf, f16), perplexity(smollm2_gguf, quant)
    assert ppl <= base * PPL_BOUND[cache_type], (cache_type, base, ppl)


@pytest.mark.parametrize(("type_k", "type_v"), [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_kv_estimate_per_token_matches_what_llama_cpp_allocates(
    smollm2_gguf: Path, type_k: str, type_v: str
) -> None:
    kv = KVSettings(type_k=type_k, type_v=type_v, flash_attn="on")
    lib = llama()
    llm, _ = load_model(smollm2_gguf, n_ctx=64, n_threads=1)
    with capture_logs() as log:
        ctx = open_context(llm.model, n_ctx=2048, n_seq_max=2, n_batch=64, threads=1, kv=kv)
    lib.llama_free(ctx)
    llm.close()
    text = "".join(log)
    found = re.search(r"llama_kv_cache: size = \s*([\d.]+) MiB \(\s*(\d+) cells.*?(\d+)/(\d+) seqs", text)
    assert found, text[-2000:]
    mib, cells, streams = float(found.group(1)), int(found.group(2)), int(found.group(4))
    per_cell = mib * 2**20 / (cells * streams)  # cells per stream: one stream per slot
    estimate = kv_bytes_per_token(gguf_info.inspect(smollm2_gguf), kv)
    assert abs(estimate - per_cell) <= 0.05 * per_cell, (estimate, per_cell)
    assert estimate < kv_bytes_per_token(gguf_info.inspect(smollm2_gguf))  # less than F16


def test_quantized_v_without_flash_attention_is_refused_first(smollm2_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="quantized V cache .* needs flash attention"):
        KVSettings(type_v="q8_0", flash_attn="off").check()
    KVSettings(type_k="q8_0", flash_attn="off").check()  # a quantized K alone is fine
    run = subprocess.run(
        [sys.executable, "-m", "selfhost", "chat", str(smollm2_gguf), "-p", "hi", "--no-log"]
        + ["--cache-type-v", "q4_0", "--flash-attn", "off"],
        capture_output=True,
        text=True,
        env={"SELFHOST_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
        timeout=120,
    )
    assert run.returncode != 0
    assert "needs flash attention" in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == ""
