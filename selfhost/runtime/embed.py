"""Pooled, L2-normalised embeddings from a llama.cpp model (the chat model or a second one), and
rerank scores from a reranker GGUF (llama.cpp's rank pooling: one relevance score per query/document).

A context of its own with embeddings on: the model's pooling when its GGUF names one (embedding
models do), mean pooling otherwise. One input at a time, each checked against the context first.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from selfhost.errors import ModelLoadError, UsageError
from selfhost.runtime.llama_context import fill_sequence, open_context


class Embedder:
    def __init__(self, llm: Any, name: str, *, n_ctx: int, threads: int, rank: bool = False) -> None:
        from selfhost.runtime import llama_private
        from selfhost.runtime.llama_backend import llama

        self.lib = llama()
        self.llm, self.name = llm, name
        self.vocab = llama_private.vocab(llm)
        self.n_embd = self.lib.llama_model_n_embd(llm.model)
        self.rank = rank  # rank pooling: the output is the classifier's score(s), not a vector
        self.n_ctx, self.threads = n_ctx, threads
        self.ctx: Any = None  # made on first use: a chat server that never embeds pays nothing
        self._lock = threading.Lock()

    def _open(self) -> None:
        lib = self.lib
        pooling = _model_pooling(self.llm)
        if self.rank:
            pooling = lib.LLAMA_POOLING_TYPE_RANK
        elif pooling <= 0:
            pooling = lib.LLAMA_POOLING_TYPE_MEAN
        ctx = open_context(
            self.llm.model, n_ctx=self.n_ctx, threads=self.threads, embeddings=True, pooling_type=pooling,
            what="an embedding context",
        )
        self.batch = lib.llama_batch_init(self.n_ctx, 0, 1)
        self.ctx = ctx

    def tokens(self, text: str) -> list[int]:
        add_bos = bool(self.lib.llama_vocab_get_add_bos(self.vocab))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def embed(self, tokens: list[int]) -> list[float]:
        """One pooled vector (unit length). Raises UsageError if the text does not fit the context."""
        vector = self._pooled(tokens, self.n_embd)
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def rerank_tokens(self, query: str, document: str) -> list[int]:
        """A query/document pair as the reranker reads it: its GGUF's `rerank` template, else
        [BOS] query [EOS] [SEP] document [EOS] as the vocabulary asks (what llama-server does)."""
        lib, vocab = self.lib, self.vocab
        template = lib.llama_model_chat_template(self.llm.model, b"rerank")
        if template:
            text = template.decode("utf-8").replace("{query}", query).replace("{document}", document)
            return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        eos = lib.llama_vocab_eos(vocab)
        if eos == -1:
            eos = lib.llama_vocab_sep(vocab)
        add_eos = [eos] if lib.llama_vocab_get_add_eos(vocab) else []
        tokens = [lib.llama_vocab_bos(vocab)] if lib.llama_vocab_get_add_bos(vocab) else []
        tokens += self.llm.tokenize(query.encode("utf-8"), add_bos=False, special=False) + add_eos
        if lib.llama_vocab_get_add_sep(vocab):
            tokens.append(lib.llama_vocab_sep(vocab))
        return tokens + self.llm.tokenize(document.encode("utf-8"), add_bos=False, special=False) + add_eos

    def score(self, tokens: list[int]) -> float:
        """The relevance score of one rerank_tokens() pair (a raw logit; higher is more relevant)."""
        return self._pooled(tokens, max(1, self.lib.llama_model_n_cls_out(self.llm.model)))[0]

    def _pooled(self, tokens: list[int], size: int) -> list[float]:
        if not tokens:
            raise UsageError("an input is empty")
        if len(tokens) > self.n_ctx:
            raise UsageError(f"an input is {len(tokens)} tokens; the embedding context holds {self.n_ctx}")
        lib = self.lib
        with self._lock:
            if self.ctx is None:
                self._open()
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            b = self.batch
            fill_sequence(b, tokens, all_logits=True)
            if lib.llama_model_has_encoder(self.llm.model) and not lib.llama_model_has_decoder(
                self.llm.model
            ):
                rc = lib.llama_encode(self.ctx, b)
            else:
                rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise ModelLoadError(f"llama.cpp could not compute the embedding (code {rc})")
            pointer = lib.llama_get_embeddings_seq(self.ctx, 0)
            return [float(pointer[i]) for i in range(size)]

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None


def _model_pooling(llm: Any) -> int:
    """The pooling type a GGUF declares (`{arch}.pooling_type`), or -1."""
    metadata = getattr(llm, "metadata", {}) or {}
    for key, value in metadata.items():
        if key.endswith(".pooling_type"):
            try:
                return int(value)
            except ValueError:
                return -1
    return -1
