"""The one builder of llama.cpp contexts through the C API, and of bare models for callers that need
no `Llama` wrapper.

Every context selfhost opens itself is made by `open_context`: the batch engine's (one KV stream per
slot), a draft model's, the embedding context, and the imatrix calibration's (with an eval callback).
`Llama` objects (llama_backend.load_model) keep their own context for tokenizing and templates.
`set_token` and `fill_sequence` write a `llama_batch` for every one of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfhost.errors import ModelLoadError
from selfhost.runtime.kvcache import KVSettings
from selfhost.runtime.llama_backend import capture_logs, llama


def open_context(
    model: Any,
    *,
    n_ctx: int,
    threads: int,
    n_batch: int | None = None,
    n_seq_max: int = 1,
    kv: KVSettings | None = None,
    embeddings: bool = False,
    pooling_type: int | None = None,
    eval_callback: Any = None,
    what: str | None = None,
) -> Any:
    """A llama.cpp context (`llama_context *`, free it with `llama_free`) on `model` (`llama_model *`).

    n_ctx cells in all, n_seq_max sequences each with its own KV stream of n_ctx / n_seq_max cells;
    n_batch (default n_ctx) tokens per decode, in one micro-batch. `eval_callback`: a
    `ggml_backend_sched_eval_callback` the caller keeps alive as long as the context. `what` names the
    context in the error (default "a context of N tokens"). Raises ModelLoadError."""
    lib = llama()
    params = lib.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch or n_ctx
    params.n_seq_max = n_seq_max
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    # One KV stream per sequence: a reply's cells never interleave with another's, so a greedy reply is
    # the same token for token whatever else runs beside it (a unified cache changes float rounding).
    params.kv_unified = False
    (kv or KVSettings()).apply(params)
    if embeddings:
        params.embeddings = True
    if pooling_type is not None:
        params.pooling_type = pooling_type
    if eval_callback is not None:
        params.cb_eval = eval_callback
        params.cb_eval_user_data = None
    with capture_logs() as log:
        ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise ModelLoadError(
            f"llama.cpp could not create {what or f'a context of {n_ctx} tokens'}", hint=_tail(log)
        )
    return ctx


def load_bare_model(path: Path, *, n_gpu_layers: int = 0) -> Any:
    """A `llama_model *` (free it with `llama_model_free`) for a file the caller has validated
    (gguf_info.inspect): no `Llama` wrapper, no context. Raises ModelLoadError."""
    lib = llama()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    with capture_logs() as log:
        model = lib.llama_model_load_from_file(str(path).encode("utf-8"), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {path}", hint=_tail(log))
    return model


@contextlib.contextmanager
def model_and_context(path: Path, *, n_gpu_layers: int = 0, **context: Any) -> Iterator[tuple[Any, Any]]:
    """(llama_model *, llama_context *) for the block, both freed after it; `context`: open_context's
    keyword arguments."""
    lib = llama()
    model = load_bare_model(path, n_gpu_layers=n_gpu_layers)
    try:
        ctx = open_context(model, **context)
        try:
            yield model, ctx
        finally:
            lib.llama_free(ctx)
    finally:
        lib.llama_model_free(model)


def set_token(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    """Entry i of a `llama_batch`: `token` at position `pos` of one sequence, with or without logits."""
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits


def fill_sequence(
    batch: Any, tokens: list[int], *, seq_id: int = 0, start: int = 0, all_logits: bool
) -> None:
    """The whole batch: `tokens` of one sequence from position `start`; logits at every position, or
    only at the last one."""
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        set_token(batch, i, token, start + i, seq_id, all_logits or i == last)
    batch.n_tokens = len(tokens)


def _tail(log: list[str]) -> str | None:
    """The end of llama.cpp's log, on one line, for an error's hint."""
    return "".join(log)[-300:].strip().replace("\n", " | ") or None
