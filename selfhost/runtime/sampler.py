"""How a job picks tokens: `SamplingParams` and the llama.cpp sampler chain built from them
(grammar, penalties, top-k / top-p / min-p, temperature, seeded distribution, or greedy)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from selfhost.errors import SelfhostError, UsageError


class SamplingParams(BaseModel):
    """How one job picks tokens. temperature 0 is greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a random seed per job


def check_grammar(lib: Any, vocab: Any, grammar: str) -> None:
    """Compile a GBNF grammar once, to refuse a broken one before a job carries it."""
    sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise UsageError("llama.cpp could not compile the grammar (GBNF, root rule `root`)")
    lib.llama_sampler_free(sampler)


def make_sampler(lib: Any, vocab: Any, s: SamplingParams, grammar: str | None = None) -> Any:
    """A new sampler chain (free it with `lib.llama_sampler_free`). Raises SelfhostError when the
    grammar does not compile."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        lib.llama_sampler_chain_add(chain, sampler)

    if grammar is not None:
        compiled = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not compiled:
            lib.llama_sampler_free(chain)
            raise SelfhostError("llama.cpp could not compile the grammar")
        add(compiled)
    if s.repeat_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
        add(_penalties(lib, vocab, s))
    if s.temperature <= 0:
        add(lib.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        add(lib.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(lib.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0:
        add(lib.llama_sampler_init_min_p(s.min_p, 1))
    add(lib.llama_sampler_init_temp(s.temperature))
    add(lib.llama_sampler_init_dist(s.seed if s.seed is not None else lib.LLAMA_DEFAULT_SEED))
    return chain


def _penalties(lib: Any, vocab: Any, s: SamplingParams) -> Any:
    """Repeat / frequency / presence penalties over the last 64 tokens. llama.cpp's signature moved:
    without n_vocab (late 2024 to 2025), then with it again first (backend sampling)."""
    args: list[Any] = [64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty]
    if len(getattr(lib.llama_sampler_init_penalties, "argtypes", None) or ()) == 5:
        args.insert(0, lib.llama_vocab_n_tokens(vocab))
    return lib.llama_sampler_init_penalties(*args)
