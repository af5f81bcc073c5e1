"""From sampled tokens to reply text: a token's bytes, and incremental UTF-8 decoding that holds
back any tail that could still become a stop string."""

from __future__ import annotations

import codecs
import ctypes
from typing import Any


class TextStream:
    """Incremental UTF-8 decoding with stop strings: text is released once no stop can start in it."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.full = ""
        self.released = 0
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, piece: bytes, final: bool = False) -> str:
        self.full += self.decoder.decode(piece, final=final)
        for stop in self.stop:
            at = self.full.find(stop, max(0, self.released - len(stop)))
            if at != -1:
                self.full, self.stopped, self.matched = self.full[:at], True, stop
        hold = 0 if final or self.stopped else self._held_back()
        out = self.full[self.released : len(self.full) - hold]
        self.released += len(out)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still become a stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.full)), best, -1):
                if stop.startswith(self.full[-n:]):
                    best = n
                    break
        return best


def token_piece(lib: Any, vocab: Any, token: int, special: bool = False) -> bytes:
    """The bytes a token stands for (control tokens only with `special`)."""
    buf = ctypes.create_string_buffer(64)
    n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]
