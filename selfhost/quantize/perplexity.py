"""Perplexity of a GGUF model on a text, computed from the logits of every position.

The text is tokenized once and cut into fixed windows of `window` tokens. Each window is
evaluated from an empty KV cache (`reset(); eval(tokens)`), and, like llama.cpp's
llama-perplexity, only the second half of each window is scored, so every scored token has at
least window/2 tokens of context. NLL comes from a log-softmax over `scores` (the logits at
position j predict token j+1); llama-cpp-python's `echo=True, logprobs` path is off by one and is
not used. Memory stays bounded: one window of logits at a time, at most `chunks` windows.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from pydantic import BaseModel

from selfhost.errors import UsageError
from selfhost.events import Events, Progress, Result
from selfhost.runtime import gguf_info

MIN_TOKENS = 16
GEN_PROMPT_TOKENS = 16


class PerplexityResult(BaseModel):
    path: Path
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    window: int
    n_windows: int
    n_scored: int
    prompt_tok_s: float  # tokens/s while evaluating the windows (prompt processing)
    gen_tok_s: float  # tokens/s of a short greedy generation (one token per eval)
    gen_tokens: int


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such text file: {path}")
    text = path.read_text("utf-8", errors="replace")
    if not text.strip():
        raise UsageError(f"{path} is empty")
    return text


def perplexity(
    path: Path,
    text: str,
    *,
    window: int = 256,
    chunks: int | None = None,
    threads: int | None = None,
    gen_tokens: int = 32,
    label: str | None = None,
) -> Events:
    """Perplexity of the model at `path` on `text`, plus prompt and generation speed.

    Yields Progress of task "perplexity <label or file name>" per window; ends with
    Result(PerplexityResult)."""
    from selfhost.runtime.llama_backend import load_model

    if window < MIN_TOKENS:
        raise UsageError(f"--window must be at least {MIN_TOKENS} tokens")
    if chunks is not None and chunks < 1:
        raise UsageError("--chunks must be at least 1")
    info = gguf_info.inspect(path)
    if info.context_length:
        window = min(window, info.context_length)  # past the trained context llama.cpp may abort

    task = f"perplexity {label or Path(path).name}"
    llm, _report = load_model(path, n_ctx=window, logits_all=True, n_threads=threads)
    try:
        if chunks is not None:  # tokenize only what the windows need (~4 chars per token, generous margin)
            text = text[: chunks * window * 16]
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(tokens) < MIN_TOKENS:
            raise UsageError(f"the text is too short: {len(tokens)} tokens, need at least {MIN_TOKENS}")
        size = min(window, len(tokens))
        n_windows = len(tokens) // size
        if chunks is not None:
            n_windows = min(n_windows, chunks)
        bos = llm.token_bos() if _adds_bos(llm) else None
        first = size // 2

        total_nll, n_scored, eval_seconds = 0.0, 0, 0.0
        for w in range(n_windows):
            batch = list(tokens[w * size : (w + 1) * size])
            if bos is not None and bos >= 0:
                batch[0] = bos
            nll, scored, seconds = _score_window(llm, batch, first)
            total_nll, n_scored, eval_seconds = total_nll + nll, n_scored + scored, eval_seconds + seconds
            yield Progress(task, w + 1, n_windows, unit="windows")

        gen_tok_s, made = _generation_speed(llm, tokens[:GEN_PROMPT_TOKENS], min(gen_tokens, size - 17))
    finally:
        close = getattr(llm, "close", None)
        if close is not None:
            close()

    nll = total_nll / n_scored
    yield Result(PerplexityResult(
        path=Path(path), ppl=math.exp(nll), nll=nll, window=size, n_windows=n_windows, n_scored=n_scored,
        prompt_tok_s=n_windows * size / eval_seconds if eval_seconds else 0.0,
        gen_tok_s=gen_tok_s, gen_tokens=made,
    ))


def _score_window(llm, batch: list[int], first: int) -> tuple[float, int, float]:  # noqa: ANN001
    """Evaluate one window from an empty cache: (summed NLL of tokens first+1.., their count, seconds)."""
    import numpy as np

    llm.reset()
    started = time.perf_counter()
    llm.eval(batch)
    seconds = time.perf_counter() - started
    size = len(batch)
    logits = np.asarray(llm.scores[first : size - 1], dtype=np.float64)  # rows j predict j+1
    targets = np.asarray(batch[first + 1 : size])
    peak = logits.max(axis=1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
    return float((log_z - logits[np.arange(len(targets)), targets]).sum()), len(targets), seconds


def _generation_speed(llm, prompt: list[int], n: int) -> tuple[float, int]:  # noqa: ANN001
    """Greedy-decode `n` tokens after `prompt`, one eval per token; return (tokens/s, n)."""
    import numpy as np

    if n <= 0:
        return 0.0, 0
    llm.reset()
    llm.eval(list(prompt))
    started = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    seconds = time.perf_counter() - started
    return (n / seconds if seconds else 0.0), n


def _adds_bos(llm) -> bool:  # noqa: ANN001
    value = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower()
    return value == "true"
