"""Speculative decoding for the batch engine: who proposes the draft tokens a slot verifies.

A generating slot evaluates its sampled token plus up to `draft_max` drafted tokens in one batch
and samples at each of those positions in turn: a drafted token is kept while it equals what the
target model samples there (with the slot's own sampler chain), so the first mismatch is replaced
by the target's own token. Drafts here are deterministic (a lookup, or the draft model's argmax),
and for a deterministic draft this is the standard acceptance rule: the output distribution is the
target's, and greedy output is the same token for token.

- `NgramDrafter`: prompt lookup. The last `ngram` tokens of the slot's history (prompt and reply)
  are looked up in that history; the tokens that followed their latest earlier occurrence are the
  draft. No second model: it wins when the reply quotes its input (edits, summaries, code, RAG).
- `ModelDrafter`: a small model of the same vocabulary drafts greedily in its own llama.cpp
  context, one KV sequence per slot beside the target's; it stops early when unsure (p < p_min).
- `DraftPace`: how many tokens a slot drafts at each step, from how its last drafts fared.
"""

from __future__ import annotations

import ctypes
from typing import Any, Literal

from pydantic import BaseModel

from selfhost.errors import UsageError
from selfhost.runtime.llama_context import fill_sequence
from selfhost.runtime.tokens import common_prefix

SpecMode = Literal["none", "ngram", "draft"]


class SpecSettings(BaseModel):
    """--spec, --spec-draft, --spec-ngram (and --draft-model, which sets mode "draft")."""

    mode: SpecMode = "none"
    draft_max: int = 8  # tokens drafted per step at most
    ngram: int = 3  # n-gram size looked up (ngram mode)
    p_min: float = 0.6  # a draft model stops drafting below this probability of its top token

    def label(self) -> str:
        if self.mode == "none":
            return ""
        what = f"n-gram {self.ngram}" if self.mode == "ngram" else "draft model"
        return f"speculative {what}, up to {self.draft_max}"


class NgramDrafter:
    """Prompt-lookup drafting over one slot's history, indexed incrementally."""

    def __init__(self, ngram: int) -> None:
        self.n = max(1, ngram)
        self.history: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> position after its latest occurrence

    def reset(self, tokens: list[int]) -> None:
        self.history, self.index = [], {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append tokens; every n-gram that ends before the last token is indexed."""
        h, n = self.history, self.n
        for token in tokens:
            end = len(h)  # the n-gram ending at h[end - 1] is followed by h[end] = token
            if end >= n:
                self.index[tuple(h[end - n : end])] = end
            h.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the history's last n-gram."""
        h = self.history
        if k <= 0 or len(h) <= self.n:
            return []
        at = self.index.get(tuple(h[-self.n :]))
        if at is None:
            return []
        return h[at : at + k]


class DraftPace:
    """How many tokens a slot drafts next: double while every draft holds, else the accepted run plus
    one; after a draft rejected outright, skip drafting for 1, 2, 4 ... 32 steps (a failed draft
    costs a wider batch)."""

    def __init__(self, draft_max: int) -> None:
        self.draft_max = draft_max
        self.length = draft_max  # tokens to draft next
        self.misses = 0  # drafts rejected outright in a row
        self.skip = 0  # steps left without drafting

    def budget(self) -> int:
        """Tokens to draft at this step: 0 while backing off."""
        if self.skip > 0:
            self.skip -= 1
            return 0
        return self.length

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt to one verified draft: `accepted` of its `drafted` tokens held."""
        if accepted == drafted:
            self.length = min(self.draft_max, 2 * self.length)
        else:
            self.length = max(1, accepted + 1)
        if accepted == 0:
            self.misses += 1
            self.skip = min(32, 2 ** (self.misses - 1))
        else:
            self.misses = 0


class ModelDrafter:
    """A draft model's own context: one sequence per slot, holding the tokens it has seen."""

    def __init__(self, draft_llm: Any, context: Any, n_seq: int, n_batch: int) -> None:
        from selfhost.runtime import llama_private
        from selfhost.runtime.llama_backend import llama

        self.lib = llama()
        self.llm = draft_llm
        self.ctx = context
        self.memory = self.lib.llama_get_memory(context)
        self.vocab = llama_private.vocab(draft_llm)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self.batch = self.lib.llama_batch_init(n_batch, 0, 1)
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def forget(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, 0, -1)
        self.cached[seq] = []

    def draft(self, seq: int, history: list[int], k: int, p_min: float) -> list[int]:
        """Up to k greedy tokens continuing `history` (whose prefix this sequence may hold already)."""
        if k <= 0 or not history:
            return []
        cached = self.cached[seq]
        keep = min(common_prefix(cached, history), len(history) - 1)
        if not self.lib.llama_memory_seq_rm(self.memory, seq, keep, -1):
            keep = 0
            self.lib.llama_memory_seq_rm(self.memory, seq, 0, -1)
        del cached[keep:]
        if not self._decode(seq, history[keep:]):
            self.forget(seq)
            return []
        out: list[int] = []
        while True:
            token, p = self._top()
            if p < p_min or self.lib.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            if len(out) >= k or not self._decode(seq, [token]):
                break
        return out

    def _decode(self, seq: int, tokens: list[int]) -> bool:
        """Evaluate tokens at the end of the sequence, in n_batch pieces; logits of the last one."""
        cached = self.cached[seq]
        for start in range(0, len(tokens), self.n_batch):
            piece = tokens[start : start + self.n_batch]
            fill_sequence(self.batch, piece, seq_id=seq, start=len(cached), all_logits=False)
            if self.lib.llama_decode(self.ctx, self.batch) != 0:
                return False
            cached.extend(piece)
        return True

    def _top(self) -> tuple[int, float]:
        """The argmax of the last logits and its softmax probability."""
        import numpy as np

        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        logits = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
        )
        token = int(logits.argmax())
        top = float(logits[token])
        p = 1.0 / float(np.exp(logits - top).sum())
        return token, p


def check_compatible(lib: Any, target_vocab: Any, draft_vocab: Any, draft_name: str) -> None:
    """Refuse a draft model whose tokens do not mean the target's (llama.cpp's own test: same
    vocabulary type, same BOS/EOS, sizes within 128, the same text for every shared token)."""
    problem = None
    if lib.llama_vocab_type(target_vocab) != lib.llama_vocab_type(draft_vocab):
        problem = "a different kind of tokenizer"
    elif lib.llama_vocab_bos(target_vocab) != lib.llama_vocab_bos(draft_vocab) or lib.llama_vocab_eos(
        target_vocab
    ) != lib.llama_vocab_eos(draft_vocab):
        problem = "different BOS/EOS tokens"
    else:
        n_target, n_draft = lib.llama_vocab_n_tokens(target_vocab), lib.llama_vocab_n_tokens(draft_vocab)
        if abs(n_target - n_draft) > 128:
            problem = f"{n_draft} tokens where the model has {n_target}"
        else:
            for token in range(min(n_target, n_draft)):
                if lib.llama_vocab_get_text(target_vocab, token) != lib.llama_vocab_get_text(
                    draft_vocab, token
                ):
                    problem = f"token {token} differs"
                    break
    if problem is not None:
        raise UsageError(
            f"draft model {draft_name} cannot draft for this model: its vocabulary has {problem}",
            hint="use a smaller model of the same family",
        )
