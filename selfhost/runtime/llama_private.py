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
