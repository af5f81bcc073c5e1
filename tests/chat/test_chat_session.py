"""ChatSession on real llama.cpp: SmolLM2 answers, KV-cache reuse, context trimming on tiny GGUFs; what
the session does with a stopped or refused reply on the fake engine (tests/fakes/engine.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfhost.chat.context import fit_window, reply_reserve
from selfhost.chat.messages import DoneChunk, Message, TextChunk, TrimChunk
from selfhost.chat.session import ChatSession, ContextLengthError, Sampling
from selfhost.errors import UsageError
from selfhost.runtime.gguf_info import GGUFInfo
from selfhost.runtime.memory import default_context, kv_bytes_per_token
from tests.fakes.tinygguf import write_tiny_llama

BRIEF = "Answer in one short sentence."


def run_turn(chunks) -> tuple[str, DoneChunk, list[TrimChunk]]:
    text, trims, done = "", [], None
    for chunk in chunks:
        if isinstance(chunk, TextChunk):
            text += chunk.text
        elif isinstance(chunk, TrimChunk):
            trims.append(chunk)
        elif isinstance(chunk, DoneChunk):
            done = chunk
    assert done is not None
    return text, done, trims


def fake_info(**kw) -> GGUFInfo:
    base = dict(
        path=Path("x.gguf"),
        size=100 * 2**20,
        version=3,
        architecture="llama",
        n_tensors=1,
        n_params=1,
        tensor_types={},
        n_layers=32,
        embedding_length=4096,
        context_length=32768,
    )
    return GGUFInfo(**{**base, **kw})


def test_default_context_is_trained_capped_by_ceiling_and_memory() -> None:
    info = fake_info()
    assert kv_bytes_per_token(info) == 2 * 32 * 4096 * 2  # 512 KiB per token
    assert default_context(info, available=64 * 2**30) == 8192  # plenty of RAM: the ceiling
    assert default_context(info, available=2**30 + info.size) == 1024  # 0.5 GiB for KV -> 1024 tokens
    assert default_context(fake_info(context_length=2048), available=64 * 2**30) == 2048
    assert default_context(fake_info(context_length=128), available=64 * 2**30) == 128
    assert default_context(info, available=0) == 512  # never below a usable floor
    assert default_context(fake_info(context_length=None), available=64 * 2**30) == 2048


def test_kv_estimate_counts_grouped_query_heads_and_matches_llama_cpp(smollm2_gguf: Path) -> None:
    import re

    from selfhost.runtime import gguf_info
    from selfhost.runtime.llama_backend import capture_logs, load_model

    # Llama-3-8B shape: 8 KV heads of 32 store a quarter of n_embd for K and for V
    gqa = fake_info(head_count=32, head_count_kv=8)
    assert kv_bytes_per_token(gqa) == 32 * 8 * (128 + 128) * 2  # 128 KiB per token
    assert kv_bytes_per_token(fake_info(head_count=8, head_count_kv=4, key_length=256, value_length=256)) == (
        32 * 4 * 512 * 2
    )
    # the estimate is what llama.cpp allocates (SmolLM2: 30 layers, 3 of 9 heads keep K/V)
    info = gguf_info.inspect(smollm2_gguf)
    with capture_logs() as log:
        llm, _ = load_model(smollm2_gguf, n_ctx=1024, n_threads=1)
    llm.close()
    sizes = re.findall(r"KV buffer size =\s*([\d.]+) MiB", "".join(log))
    assert sizes and sum(float(x) for x in sizes) * 2**20 == kv_bytes_per_token(info) * 1024


def test_fit_window_drops_oldest_turns_and_refuses_what_cannot_fit() -> None:
    msgs = []
    for i in range(5):
        msgs += [Message(role="user", content=f"q{i}"), Message(role="assistant", content=f"a{i}")]
    msgs.append(Message(role="user", content="last"))

    def measure(window):
        return 10 + 20 * len(window)  # system prompt 10, each message 20 tokens

    assert fit_window(msgs, 0, measure, 1000, 10) == (0, 0, 230)
    start, dropped, n = fit_window(msgs, 0, measure, 120, 10)
    assert (start, dropped) == (6, 3) and msgs[start].content == "q3" and n + 10 <= 120
    assert fit_window(msgs, 10, measure, 40, 10) == (10, 0, 30)
    with pytest.raises(UsageError, match="does not fit"):
        fit_window(msgs, 0, measure, 35, 10)
    assert (
        reply_reserve(128, 16) == 16 and reply_reserve(128, None) == 64 and reply_reserve(8192, None) == 512
    )


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> ChatSession:
    return ChatSession.load(
        Path(smollm2_gguf), ctx=1024, threads=1, system=BRIEF, sampling=Sampling(temperature=0, max_tokens=24)
    )


def test_smollm2_knows_the_capital_of_france(smol: ChatSession) -> None:
    smol.reset()
    smol.model.engine.clear_cache()
    text, done, _ = run_turn(smol.chat("What is the capital of France?"))  # greedy
    assert "Paris" in text
    assert done.message.content == text
    u = done.usage
    assert (
        u.generated_tokens
        == done.message.tokens
        == len(smol.model.llm.tokenize(text.encode(), add_bos=False))
    )
    assert u.finish_reason == "stop"
    # the prompt is the system prompt and the question in SmolLM2's ChatML, evaluated from a cold cache
    expected = (
        f"<|im_start|>system\n{BRIEF}<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert u.prompt_tokens == len(smol.model.llm.tokenize(expected.encode(), add_bos=False, special=True))
    assert (u.reused_tokens, u.evaluated_tokens) == (0, u.prompt_tokens)
    assert u.generation_tokens_per_s > 0 and u.time_to_first_token_s > 0
    assert smol.summary.backend == "CPU" and smol.summary.n_ctx == 1024 and smol.summary.quant == "Q4_1"


def test_second_turn_uses_history_and_evaluates_only_new_tokens(smol: ChatSession) -> None:
    smol.reset()
    _, first, _ = run_turn(smol.chat("My name is Zorblax."))
    second_text, second, _ = run_turn(smol.chat("What is my name?"))
    assert "Zorblax" in second_text  # the first turn reached the model
    u1, u2 = first.usage, second.usage
    # Everything turn 1 left in the KV cache (its prompt and reply) is reused; llama.cpp's own
    # counters say only the new tokens were evaluated.
    last_not_fed_back = 0 if u1.finish_reason == "stop" else 1  # a reply cut at --max-tokens
    assert u1.context_used == u1.prompt_tokens + u1.generated_tokens - last_not_fed_back
    assert u2.reused_tokens == u1.context_used
    assert u2.evaluated_tokens == u2.prompt_tokens - u1.context_used
    assert u2.evaluated_tokens < 25 < u2.prompt_tokens
    # Control: without the first turn the model cannot know the name.
    smol.reset()
    alone, _, _ = run_turn(smol.chat("What is my name?"))
    assert "Zorblax" not in alone


def test_undo_retry_and_seeded_retry_is_reproducible(smol: ChatSession) -> None:
    smol.reset()
    smol.sampling = Sampling(temperature=0.9, seed=3, max_tokens=12)
    try:
        first, _, _ = run_turn(smol.chat("Tell me a fun fact."))
        again, done, _ = run_turn(smol.retry())
        assert again == first  # same seed, same prompt: same reply
        assert [m.role for m in smol.messages] == ["user", "assistant"]
        assert done.usage.evaluated_tokens <= 2  # the prompt was already in the cache
        assert smol.undo() == 2 and smol.messages == []
        with pytest.raises(UsageError, match="nothing to retry"):
            list(smol.retry())
    finally:
        smol.sampling = Sampling(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("t") / "ctx128.gguf", n_ctx=128)


@pytest.mark.needs_model
def test_overflow_twenty_turns_in_128_tokens_trims_and_never_aborts(tiny128: Path) -> None:
    engine = ChatSession.load(
        Path(tiny128), threads=1, sampling=Sampling(temperature=0.8, seed=1, max_tokens=16)
    )
    assert engine.n_ctx == 128  # the trained context, not llama-cpp-python's 512
    dropped = 0
    for i in range(20):
        _, done, trims = run_turn(engine.chat(f"turn {i}: tell me more"))
        u = done.usage
        assert u.prompt_tokens + u.generated_tokens <= 128 and u.context_used <= 128
        assert u.generated_tokens <= 16
        for trim in trims:
            assert trim.dropped_turns == u.dropped_turns > 0
        dropped += u.dropped_turns
    assert dropped > 0 and engine.window_start > 0
    assert len(engine.messages) == 40  # trimmed from the context, not from the conversation
    assert engine.messages[engine.window_start].role == "user"
    # A message that cannot fit even alone is refused with a clear error; the engine stays usable.
    with pytest.raises(UsageError, match="does not fit"):
        list(engine.chat("word " * 200))
    assert len(engine.messages) == 40
    _, done, _ = run_turn(engine.chat("still there?"))
    assert done.usage.context_used <= 128


@pytest.mark.needs_model
def test_reply_stops_before_the_context_is_full(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "talker.gguf", n_ctx=128, seed=1)  # greedy, it never says <|im_end|>
    engine = ChatSession.load(path, ctx=64, threads=1, sampling=Sampling(temperature=0))
    _, done, _ = run_turn(engine.chat("hi"))
    u = done.usage
    assert u.finish_reason == "context"
    assert u.prompt_tokens + u.generated_tokens == 64 and u.context_used < 64


@pytest.mark.needs_model
def test_no_template_is_refused_and_raw_mode_completes(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "notemplate.gguf", chat_template=None)
    with pytest.raises(UsageError, match="no chat template") as err:
        ChatSession.load(path, threads=1)
    assert "--raw" in str(err.value)
    engine = ChatSession.load(path, threads=1, raw=True, sampling=Sampling(seed=1, max_tokens=8))
    assert engine.render([Message(role="user", content="Once upon")]) == "Once upon"
    _, done, _ = run_turn(engine.chat("Once upon"))
    assert done.usage.generated_tokens > 0
    assert engine.render(engine.messages) == "Once upon" + done.message.content


def test_a_stopped_stream_keeps_the_partial_reply_and_the_next_turn_works(
    tiny_gguf: Path, fake_model
) -> None:
    fake_model.enqueue("A long story that goes on and on.")
    session = ChatSession.load(tiny_gguf, threads=1, sampling=Sampling(temperature=0))
    stream = session.chat("hi")
    shown = "".join(next(stream).text for _ in range(3))
    stream.close()  # what Ctrl-C in a renderer does
    partial = session.messages[-1]
    assert shown == "A long story" and partial.content == shown
    assert partial.role == "assistant" and partial.finish_reason == "interrupted" and partial.tokens == 3
    assert session.last_usage.finish_reason == "interrupted"
    _, done, _ = run_turn(session.chat("go on"))
    assert done.usage.reused_tokens > 0 and [m.role for m in session.messages] == ["user", "assistant"] * 2
    assert "<|im_start|>assistant\nA long story<|im_end|>" in fake_model.prompts[-1]  # the partial reply


def test_a_prompt_past_the_context_is_refused_before_generation(tiny_gguf: Path, fake_model) -> None:
    """The server's mode (trim=False: the client owns the history) refuses; a chat (trim=True) drops turns."""
    session = ChatSession.load(tiny_gguf, threads=1, sampling=Sampling(max_tokens=8))
    session.messages = [Message(role="user", content="word " * 200)]
    with pytest.raises(ContextLengthError, match=r"the prompt is \d+ tokens and the context holds 128"):
        session.prepare(trim=False)
    with pytest.raises(UsageError, match="does not fit"):
        session.prepare(trim=True)
    assert fake_model.prompts == []  # nothing reached the model
    for i in range(8):
        run_turn(session.chat(f"turn {i}: tell me more"))
    assert session.window_start > 0  # the chat dropped its oldest turns ...
    with pytest.raises(ContextLengthError):
        session.prepare(trim=False)  # ... which a client's whole conversation cannot do


@pytest.mark.needs_model
def test_kv_cache_reuse_gives_the_same_replies_as_a_cold_cache_over_20_trimmed_turns(tiny128: Path) -> None:
    """Each turn's reply from the cached prefix equals the reply recomputed after clearing the cache."""
    session = ChatSession.load(
        Path(tiny128), threads=1, sampling=Sampling(temperature=0.7, seed=5, max_tokens=12)
    )
    reused_turns = dropped = 0
    for i in range(20):
        cached, done, _ = run_turn(session.chat(f"turn {i}: tell me more"))
        reused_turns += done.usage.reused_tokens > 0
        dropped += done.usage.dropped_turns
        session.model.engine.clear_cache()
        cold, again, _ = run_turn(session.retry())
        assert again.usage.reused_tokens == 0 and again.usage.prompt_tokens == done.usage.prompt_tokens
        assert cold == cached, i
        assert again.message.tokens == done.message.tokens
    assert reused_turns >= 15 and dropped > 0  # the cache was really used, the window really moved
