"""Tokenizers saved with the model: character-level, and byte-level BPE (the `tokenizers` library).

Both export to a GGUF `gpt2` (byte-level BPE) vocabulary that llama.cpp tokenizes exactly like we do:

- BPE: GPT-2's ByteLevel pre-tokenizer regex (llama.cpp pre-tokenizer "gpt-2"), no prefix space.
- char: each character's token is the byte-level encoding of its UTF-8 bytes; multi-byte characters are
  rebuilt by merges inside the character (merges never cross characters, so the pre-tokenizer cannot
  change the result). Characters never seen in training are dropped, here and in llama.cpp alike; `unseen`
  counts them so callers can say so (count and examples) instead of dropping them silently.

Special token: `<|endoftext|>` ends every document; it is the GGUF's bos and eos.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfhost import atomic
from selfhost.errors import IntegrityError, SelfhostError, UsageError

EOT = "<|endoftext|>"
NORMAL, CONTROL = 1, 3  # llama.cpp token types (gguf.TokenType)


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_level(text: str) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str  # tokenizer.ggml.pre
    eot_id: int
    eos_id: int | None = None  # None: eot_id (a chat model ends its turns with <|im_end|>)


@dataclass
class Unseen:
    """Characters a tokenizer dropped because training never saw them."""

    counts: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, other: Unseen) -> None:
        self.counts.update(other.counts)

    def describe(self, what: str = "the text", n_examples: int = 5) -> str:
        examples = ", ".join(f"{c!r} x{n}" for c, n in self.counts.most_common(n_examples))
        more = f" and {len(self.counts) - n_examples} more" if len(self.counts) > n_examples else ""
        return (f"{self.total} character{'s' if self.total != 1 else ''} of {what} "
                f"({len(self.counts)} distinct: {examples}{more}) are not in the model's vocabulary "
                "and were dropped")  # fmt: skip


class Tokenizer:
    kind: str
    eot_id: int

    def unseen(self, text: str) -> Unseen:
        """What encode(text) drops (nothing for byte-level BPE: every byte has a token)."""
        return Unseen()

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def gguf_vocab(self) -> GGUFVocab:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        atomic.write_text(Path(path), self.to_json())


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        return [stoi[c] for c in text if c in stoi]  # unseen characters are dropped (see `unseen`)

    def unseen(self, text: str) -> Unseen:
        missing = set(text).difference(self.stoi)
        if not missing:
            return Unseen()
        return Unseen(Counter(c for c in text if c in missing))

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i] for i in ids if 0 <= i < len(chars))

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False)

    def gguf_vocab(self) -> GGUFVocab:
        tokens = [byte_level(c) for c in self.chars] + [EOT]
        types = [NORMAL] * len(self.chars) + [CONTROL]
        merges: list[str] = []
        seen: set[str] = set()
        table = byte_to_unicode()
        for c in self.chars:
            raw = c.encode("utf-8")
            for k in range(1, len(raw)):  # rebuild the character left to right
                left = "".join(table[b] for b in raw[:k])
                merge = f"{left} {table[raw[k]]}"
                if merge not in seen:
                    seen.add(merge)
                    merges.append(merge)
        if not merges:  # llama.cpp needs the merges key; this pair (two UTF-8 lead bytes) never occurs
            merges.append(f"{table[0xC3]} {table[0xC3]}")
        return GGUFVocab(tokens=tokens, types=types, merges=merges, pre="gpt-2", eot_id=self.eot_id)


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in text is text, as in llama.cpp
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise IntegrityError("the BPE tokenizer has no <|endoftext|> token")
        self.eot_id = eot

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from selfhost.train.common import require

        tk = require("tokenizers", "`tokenizers`")
        tok = tk.Tokenizer(tk.models.BPE())
        # GPT-2's regex, no prefix space: exactly llama.cpp's pre-tokenizer "gpt-2".
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return json.dumps({"kind": "bpe", "tokenizer": json.loads(self.tok.to_str())}, ensure_ascii=False)

    def gguf_vocab(self) -> GGUFVocab:
        vocab = self.tok.get_vocab(with_added_tokens=True)
        tokens = [""] * len(vocab)
        for text, i in vocab.items():
            tokens[i] = text
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        types = [CONTROL if t in special else NORMAL for t in tokens]
        raw = json.loads(self.tok.to_str())["model"]["merges"]
        merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in raw]
        return GGUFVocab(tokens=tokens, types=types, merges=merges, pre="gpt-2", eot_id=self.eot_id)


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_SPECIALS = [IM_START, IM_END]
# ChatML; the prompt starts with <|endoftext|> (bos_token), as every training document does.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatTokenizer(Tokenizer):
    """A trained tokenizer plus the chat special tokens (ids after its own): what chat fine-tuning adds.
    In text the specials and <|endoftext|> are their tokens (llama.cpp's special=True, as chat prompts are
    tokenized); they are control tokens in the GGUF, and <|im_end|> is its end of sequence."""

    kind = "chat"

    def __init__(self, inner: Tokenizer, specials: list[str] | None = None) -> None:
        import re

        self.inner, self.specials = inner, list(specials or CHAT_SPECIALS)
        self.eot_id = inner.eot_id
        self.ids = {EOT: inner.eot_id} | {t: inner.vocab_size + i for i, t in enumerate(self.specials)}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.ids) + ")")

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size + len(self.specials)

    @property
    def eos_id(self) -> int:
        return self.ids[IM_END] if IM_END in self.ids else self.eot_id

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._split.split(text):
            out.extend([self.ids[piece]] if piece in self.ids else self.inner.encode(piece) if piece else [])
        return out

    def unseen(self, text: str) -> Unseen:
        return self.inner.unseen(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode(i for i in ids if i < self.inner.vocab_size)

    def to_json(self) -> str:
        inner = json.loads(self.inner.to_json())
        return json.dumps({"kind": "chat", "inner": inner, "specials": self.specials},
                          ensure_ascii=False)  # fmt: skip

    def gguf_vocab(self) -> GGUFVocab:
        vocab = self.inner.gguf_vocab()
        types = vocab.types + [CONTROL] * len(self.specials)
        return GGUFVocab(tokens=vocab.tokens + self.specials, types=types, merges=vocab.merges,
                         pre=vocab.pre, eot_id=vocab.eot_id, eos_id=self.eos_id)  # fmt: skip


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train on `texts` (any iterable: streamed pieces of a corpus larger than memory work too)."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise UsageError(f"unknown tokenizer '{kind}'", hint="use char or bpe")


def from_json(text: str) -> Tokenizer:
    try:
        data = json.loads(text)
        if data["kind"] == "char":
            return CharTokenizer(list(data["chars"]))
        if data["kind"] == "bpe":
            from selfhost.train.common import require

            tk = require("tokenizers", "`tokenizers`")
            return BPETokenizer(tk.Tokenizer.from_str(json.dumps(data["tokenizer"])))
        if data["kind"] == "chat":
            return ChatTokenizer(from_json(json.dumps(data["inner"])), list(data["specials"]))
    except SelfhostError:
        raise
    except Exception as exc:  # malformed JSON or a tokenizers parse error
        raise IntegrityError(f"the saved tokenizer is unreadable ({type(exc).__name__})") from exc
    raise IntegrityError(f"unknown saved tokenizer kind '{data.get('kind')}'")


def load(path: Path) -> Tokenizer:
    return from_json(Path(path).read_text("utf-8"))
