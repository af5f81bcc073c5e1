"""How big the context is, and which turns of a conversation fit into it.

llama.cpp aborts the process when asked to evaluate past its context, so the engine sizes the
context up front (trained length, capped by memory) and trims the oldest turns before a turn
would not fit: prompt + the reply budget must stay within n_ctx.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from selfhost import system_info
from selfhost.chat.messages import Message
from selfhost.errors import UsageError
from selfhost.gguf_info import GGUFInfo

CONTEXT_CEILING = 8192  # a sane default ceiling; --ctx can ask for more
FALLBACK_TRAINED = 2048  # when the GGUF does not say
KV_MEMORY_SHARE = 0.5  # the KV cache may take at most this share of the RAM left after the weights
DEFAULT_REPLY_RESERVE = 512  # tokens kept free for a reply when --max-tokens is not set
MIN_CONTEXT = 32
USEFUL_SLOT_CONTEXT = 2048  # a server slot gets at least this much (or the trained context) by default


def kv_bytes_per_token(info: GGUFInfo) -> int:
    """F16 K and V for every layer: n_layer x n_head_kv x (key + value head size) x 2 bytes.

    Grouped-query attention (n_head_kv < n_head) stores less; without head counts in the GGUF,
    n_embd for K and for V is the upper bound."""
    n_layers = info.n_layers or 32
    n_embd = info.embedding_length or 4096
    if info.head_count:
        head = n_embd // info.head_count
        n_kv = info.head_count_kv or info.head_count
        width = n_kv * ((info.key_length or head) + (info.value_length or head))
    else:
        width = 2 * n_embd
    return n_layers * width * 2


def default_context(
    info: GGUFInfo, available: int | None = None, ceiling: int = CONTEXT_CEILING, slots: int = 1
) -> int:
    """Tokens per slot: the model's trained context, capped by `ceiling` and by what `slots` KV
    caches may take in RAM together."""
    trained = info.context_length or FALLBACK_TRAINED
    limit = min(trained, ceiling)
    available = system_info.available_memory() if available is None else available
    if available is not None:
        budget = max(0, available - info.size) * KV_MEMORY_SHARE / max(1, slots)
        by_memory = int(budget // kv_bytes_per_token(info)) // 256 * 256
        limit = min(limit, max(by_memory, min(trained, 512)))
    return max(limit, min(trained, MIN_CONTEXT))


def default_slots(info: GGUFInfo, available: int | None = None, most: int = 4) -> int:
    """As many slots (up to `most`) as free memory gives a useful context each: 2048 tokens, or the
    trained context when it is shorter."""
    wanted = min(info.context_length or FALLBACK_TRAINED, USEFUL_SLOT_CONTEXT)
    for slots in range(most, 1, -1):
        if default_context(info, available, slots=slots) >= wanted:
            return slots
    return 1


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
