"""The fake engine (tests/fakes/engine.py) keeps BatchEngine's contract: each check runs on both.

Tests that use the fake rely on these rules: if the real engine changes one, this file fails first.
Both engines come from ChatModel.load on the same tiny GGUF; the real one is a random model that
never ends a reply by itself (greedy), the fake one is scripted to go on as long.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from selfhost.chat.model import ChatModel
from selfhost.errors import UsageError
from selfhost.runtime.jobs import Job, JobEnd, JobText, QueueFullError
from selfhost.runtime.sampler import SamplingParams
from tests.fakes.engine import FakeModel, use_fake_engine

GREEDY = SamplingParams(temperature=0)
CTX = 64


@pytest.fixture(scope="module")
def talker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fakes.tinygguf import write_tiny_llama

    # greedy on these random weights never samples <|im_end|>: a reply runs to a limit
    return write_tiny_llama(tmp_path_factory.mktemp("contract") / "talker.gguf", n_ctx=128, seed=1)


@pytest.fixture(params=[pytest.param("real", marks=pytest.mark.needs_model), "fake"])
def model(request: pytest.FixtureRequest, talker: Path, monkeypatch: pytest.MonkeyPatch):
    if request.param == "fake":
        use_fake_engine(monkeypatch, FakeModel(default=lambda prompt, n: " and so on" * 200))
    m = ChatModel.load(talker, ctx=CTX, threads=1, parallel=1, max_queue=0)
    yield m
    m.close()


def prompt(model: ChatModel, text: str) -> list[int]:
    return model.tokenize_prompt(model.render([{"role": "user", "content": text}]))


def run(job: Job) -> tuple[str, JobEnd]:
    chunks = list(job.chunks())
    end = chunks[-1]
    assert isinstance(end, JobEnd) and all(isinstance(c, JobText) for c in chunks[:-1])
    return "".join(c.text for c in chunks[:-1]), end


def test_vocabulary_control_tokens_and_round_trip(model: ChatModel) -> None:
    engine = model.engine
    control = engine.tokenize("<|im_start|>", add_bos=False, special=True)
    assert len(control) == 1 and len(engine.tokenize("<|im_start|>", add_bos=False, special=False)) > 1
    assert engine.piece(control[0], special=True) == b"<|im_start|>" and engine.piece(control[0]) == b""
    text = "Hello there, the sea!"
    assert engine.detokenize(engine.tokenize(text, add_bos=False, special=False)).decode() == text
    assert (engine.special_text("bos"), engine.special_text("eos")) == ("<|endoftext|>", "<|im_end|>")
    assert engine.adds_bos is False and engine.n_vocab > control[0]
    assert model.count_tokens(text) == len(engine.tokenize(text, add_bos=False, special=False))


def test_submit_refuses_what_cannot_run(model: ChatModel) -> None:
    engine = model.engine
    with pytest.raises(ValueError, match="at least one prompt token"):
        engine.submit(Job([], GREEDY, max_tokens=4))
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(Job([1] * CTX, GREEDY, max_tokens=4))
    first = engine.submit(Job(prompt(model, "hi"), GREEDY, max_tokens=2))
    with pytest.raises(QueueFullError, match="all 1 slots are busy"):  # one slot, no queue
        engine.submit(Job(prompt(model, "hi"), GREEDY, max_tokens=2))
    assert engine.busy() == (0, 1)
    run(first)
    assert engine.busy() == (0, 0)


def test_max_tokens_ends_with_length_and_the_last_token_is_not_evaluated(model: ChatModel) -> None:
    tokens = prompt(model, "hi")
    text, end = run(model.engine.submit(Job(tokens, GREEDY, max_tokens=5)))
    assert (end.finish_reason, end.generated_tokens, end.prompt_tokens) == ("length", 5, len(tokens))
    assert end.context_used == len(tokens) + 5 - 1 and end.text == text and text


def test_a_reply_ends_at_the_slot_end_with_context(model: ChatModel) -> None:
    tokens = prompt(model, "hi")
    _, end = run(model.engine.submit(Job(tokens, GREEDY, max_tokens=1000)))
    assert end.finish_reason == "context"
    assert end.prompt_tokens + end.generated_tokens == CTX and end.context_used == CTX - 1


def test_the_next_prompt_reuses_what_the_slot_holds(model: ChatModel) -> None:
    model.engine.clear_cache()
    first = prompt(model, "hi")
    _, end = run(model.engine.submit(Job(first, GREEDY, max_tokens=4)))
    assert end.reused_tokens == 0
    again = first + model.engine.tokenize(" more", add_bos=False, special=False)
    _, end2 = run(model.engine.submit(Job(again, GREEDY, max_tokens=4)))
    assert end.context_used == len(first) + 3 and end2.reused_tokens == len(first)  # the shared prefix
    _, same = run(model.engine.submit(Job(first, GREEDY, max_tokens=4)))
    assert same.reused_tokens == len(first) - 1  # one prompt token is always evaluated, for its logits
    model.engine.clear_cache()
    _, cold = run(model.engine.submit(Job(first, GREEDY, max_tokens=4)))
    assert cold.reused_tokens == 0


def test_a_cancelled_job_ends_with_what_it_had(model: ChatModel) -> None:
    job = model.engine.submit(Job(prompt(model, "hi"), GREEDY, max_tokens=1000))
    chunks = job.chunks()
    shown = [next(chunks), next(chunks), next(chunks)]
    job.cancel()
    rest = list(chunks)
    end = rest[-1]
    assert isinstance(end, JobEnd) and end.finish_reason == "cancelled"
    assert end.generated_tokens >= 3 and end.text.startswith("".join(c.text for c in shown))


def test_grammar_without_a_root_rule_is_refused(model: ChatModel) -> None:
    model.engine.check_grammar('root ::= "yes" | "no"')
    with pytest.raises(UsageError, match="could not compile the grammar"):
        model.engine.check_grammar('answer ::= "yes"')


def test_the_server_thread_streams_to_an_async_consumer(model: ChatModel) -> None:
    import asyncio

    async def consume(job: Job) -> list:
        return [chunk async for chunk in job.achunks()]

    model.engine.start()  # the server's mode; ChatModel.close stops the thread
    chunks = asyncio.run(consume(model.engine.submit(Job(prompt(model, "hi"), GREEDY, max_tokens=3))))
    end = chunks[-1]
    assert isinstance(end, JobEnd) and (end.finish_reason, end.generated_tokens) == ("length", 3)
    assert "".join(c.text for c in chunks[:-1]) == end.text
