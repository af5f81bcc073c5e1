"""Memory sizing: free RAM now, a model's KV cache per token, and the context and slot counts that fit.

llama.cpp aborts the process when asked to evaluate past its context, so contexts are sized up front
(trained length, capped by memory).
"""

from __future__ import annotations

import contextlib
import os

from selfhost.runtime.gguf_info import GGUFInfo

CONTEXT_CEILING = 8192  # a sane default ceiling; --ctx can ask for more
FALLBACK_TRAINED = 2048  # when the GGUF does not say
KV_MEMORY_SHARE = 0.5  # the KV cache may take at most this share of the RAM left after the weights
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
    available = available_memory() if available is None else available
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



def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation now (Linux MemAvailable, else free pages), None if
    unknown."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None
