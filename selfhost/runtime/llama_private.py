"""Every use of llama-cpp-python's private API (underscored attributes and modules) in one file.

llama-cpp-python does not promise these across releases; when a release renames one, this file is
the one to fix. The public C API (`llama_cpp.llama_*` bindings of llama.h) is used directly elsewhere.
"""

from __future__ import annotations

from typing import Any


def vocab(llm: Any) -> Any:
    """The `llama_vocab *` of a loaded `Llama` (for the llama_vocab_* C functions)."""
    return llm._model.vocab


def token_text(llm: Any, token: int) -> str:
    """The text of one token as the vocabulary spells it (BOS/EOS names for the chat template)."""
    return llm._model.token_get_text(token)


def ggml_library() -> Any:
    """The ctypes handle of libggml that llama-cpp-python loaded."""
    from llama_cpp import _ggml

    return _ggml.libggml


def open_model_and_context(path: str, model_params: Any, ctx_params: Any) -> tuple[Any, Any]:
    """A bare llama.cpp model and context (no `Llama` wrapper: the caller sets its own params,
    e.g. an eval callback). Both have `.close()`; the context exposes `.ctx` and `.memory`.
    Raises ValueError when llama.cpp refuses the file."""
    from llama_cpp import _internals

    model = _internals.LlamaModel(path_model=path, params=model_params, verbose=True)
    try:
        ctx = _internals.LlamaContext(model=model, params=ctx_params, verbose=True)
    except ValueError:
        model.close()
        raise
    return model, ctx


def decode_all_logits(lib: Any, ctx: Any, tokens: list[int]) -> int:
    """Decode `tokens` as one sequence from position 0 with every position an output; the return
    code of llama_decode."""
    from llama_cpp import _internals

    batch = _internals.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1, verbose=False)
    try:
        batch.set_batch(tokens, n_past=0, logits_all=True)
        return lib.llama_decode(ctx.ctx, batch.batch)
    finally:
        batch.close()
