"""Which turns of a conversation fit into the context.

The context is sized up front (selfhost.runtime.memory); the oldest turns are trimmed before a turn
would not fit: prompt + the reply budget must stay within n_ctx.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from selfhost.chat.messages import Message
from selfhost.errors import UsageError

DEFAULT_REPLY_RESERVE = 512  # tokens kept free for a reply when --max-tokens is not set


def reply_reserve(n_ctx: int, max_tokens: int | None) -> int:
    """Tokens kept free for the reply when deciding whether a turn fits."""
    wanted = max_tokens if max_tokens is not None else DEFAULT_REPLY_RESERVE
    return max(1, min(wanted, n_ctx // 2))


def turn_starts(messages: Sequence[Message], start: int) -> list[int]:
    """Indices (>= start) where a turn (a user message and what follows it) begins."""
    return [i for i in range(start, len(messages)) if messages[i].role == "user"]


def fit_window(
    messages: Sequence[Message],
    start: int,
    measure: Callable[[Sequence[Message]], int],
    n_ctx: int,
    reserve: int,
) -> tuple[int, int, int]:
    """Drop the oldest turns from messages[start:] until prompt + reserve fits in n_ctx.

    `measure(window)` returns the prompt tokens for a window (the system prompt is added by it).
    The latest turn is always kept. Returns (new start, turns dropped, prompt tokens).
    Raises UsageError when even the latest message alone does not fit.
    """
    starts = turn_starts(messages, start)
    if start < len(messages) and (not starts or starts[0] != start):
        starts.insert(0, start)  # a window may begin with a reply (e.g. after /load)
    dropped = 0
    while True:
        n_prompt = measure(messages[start:])
        if n_prompt + reserve <= n_ctx:
            return start, dropped, n_prompt
        if len(starts) <= 1:
            raise UsageError(
                f"the message does not fit: the prompt is {n_prompt} tokens, the context holds {n_ctx} "
                f"with {reserve} kept for the reply",
                hint="send a shorter message, or use a larger --ctx or a smaller --max-tokens",
            )
        starts.pop(0)
        start = starts[0]
        dropped += 1
