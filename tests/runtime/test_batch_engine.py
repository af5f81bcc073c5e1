"""The batch engine on real llama.cpp (SmolLM2): slots, prefix reuse, chunked prefill, cancel, limits.

And the chat template's sandbox limits: hangs and huge values are stopped, empty renders refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from selfhost.chat.model import ChatModel
from selfhost.errors import ModelLoadError
from selfhost.runtime.jobs import Job, JobEnd, JobText, QueueFullError
from selfhost.runtime.sampler import SamplingParams
from selfhost.runtime.template import ChatTemplate
from selfhost.runtime.text_stream import TextStream

GREEDY = SamplingParams(temperature=0)
QUESTIONS = ["What is the capital of France?", "What do bees make?", "Name a red fruit.", "Say hello."]


@pytest.fixture(scope="module")
def model(smollm2_gguf: Path):
    m = ChatModel.load(smollm2_gguf, ctx=512, threads=2, parallel=4, prefill_chunk=32, max_queue=2)
    yield m
    m.close()


def prompt(model: ChatModel, question: str) -> list[int]:
    return model.tokenize_prompt(model.render([{"role": "user", "content": question}]))


def run(jobs: list[Job]) -> list[tuple[str, JobEnd]]:
    """Drive the engine inline until every job has ended."""
    while any(j.end is None for j in jobs):
        jobs[0]._engine.step()
    out = []
    for job in jobs:
        chunks = list(job._chunks)
        text = "".join(c.text for c in chunks if isinstance(c, JobText))
        out.append((text, job.end))
    return out


def test_jobs_batched_together_give_the_replies_they_give_alone(model: ChatModel) -> None:
    alone = []
    for q in QUESTIONS:
        model.engine.clear_cache()
        alone += run([model.engine.submit(Job(prompt(model, q), GREEDY, max_tokens=32))])
    model.engine.clear_cache()
    steps = model.engine.steps
    together = run([model.engine.submit(Job(prompt(model, q), GREEDY, max_tokens=32)) for q in QUESTIONS])
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert sum(e.generated_tokens for _, e in together) >= 4 * 8
    # batched: far fewer decode steps than the 4 jobs needed one after another
    assert model.engine.steps - steps < sum(e.generated_tokens for _, e in alone) * 0.6
    for text, end in together:
        assert end.finish_reason in ("stop", "length") and text == end.text


def test_prompt_prefix_in_a_slot_is_reused(model: ChatModel) -> None:
    model.engine.clear_cache()
    first = prompt(model, "What is the capital of France?")
    ((_, a),) = run([model.engine.submit(Job(first, GREEDY, max_tokens=4))])
    ((_, b),) = run([model.engine.submit(Job(first, GREEDY, max_tokens=4))])
    assert a.reused_tokens == 0 and b.reused_tokens == len(first) - 1  # all but the last prompt token


def test_long_prompt_is_read_in_chunks_while_others_generate(model: ChatModel) -> None:
    model.engine.clear_cache()
    short = model.engine.submit(Job(prompt(model, "Count to twenty."), GREEDY, max_tokens=60))
    model.engine.step()
    model.engine.step()
    before = short._chunks.copy()
    long_prompt = prompt(model, "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 25)
    assert len(long_prompt) > 200
    late = model.engine.submit(Job(long_prompt, GREEDY, max_tokens=4))
    produced = 0
    for _ in range(4):  # 4 steps of 32 prompt tokens: the short job still gets a token every step
        count = len(short._chunks)
        model.engine.step()
        produced += len(short._chunks) > count or short.end is not None
    assert produced >= 3 and late.end is None and len(before) >= 1
    run([short, late])
    assert late.end.finish_reason in ("stop", "length")


def test_cancel_frees_the_slot_and_keeps_what_was_read(model: ChatModel) -> None:
    job = model.engine.submit(Job(prompt(model, "Tell a long story."), GREEDY, max_tokens=400))
    for _ in range(5):
        model.engine.step()
    job.cancel()
    ((text, end),) = run([job])
    assert end.finish_reason == "cancelled" and 0 < end.generated_tokens < 10 and text == end.text
    assert model.engine.busy() == (0, 0)


def test_a_failed_decode_ends_every_job_in_the_batch_and_the_engine_goes_on(model: ChatModel) -> None:
    model.engine.clear_cache()
    clean = run([model.engine.submit(Job(prompt(model, "Name a red fruit."), GREEDY, max_tokens=8))])[0][0]
    model.engine.clear_cache()
    long_prompt = prompt(model, "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 10)
    bad = long_prompt[:40] + [10**7]  # its 41st token is not in the vocabulary
    broken = model.engine.submit(Job(bad, GREEDY, max_tokens=4))  # slot 0
    reading = model.engine.submit(Job(long_prompt, GREEDY, max_tokens=4))  # slot 1
    model.engine.step()  # `broken` reads 32 tokens, the whole prefill budget
    model.engine.step()  # one batch: broken's last 9 (the bad one too) and 23 of reading's; refused
    assert broken.end.finish_reason == "error" and "decode" in broken.end.error
    assert reading.end.finish_reason == "error"  # its cache no longer matches what it was told it holds
    assert model.engine.busy() == (0, 0)
    assert (
        run([model.engine.submit(Job(prompt(model, "Name a red fruit."), GREEDY, max_tokens=8))])[0][0]
        == clean
    )


def test_queue_full_is_refused(model: ChatModel) -> None:
    jobs = [model.engine.submit(Job(prompt(model, "Hi"), GREEDY, max_tokens=2)) for _ in range(6)]  # 4 + 2
    with pytest.raises(QueueFullError):
        model.engine.submit(Job(prompt(model, "Hi"), GREEDY, max_tokens=2))
    run(jobs)


def test_reply_stops_at_the_slot_context_and_seeded_sampling_repeats(model: ChatModel) -> None:
    tokens = prompt(model, "word " * 400)
    ((_, end),) = run([model.engine.submit(Job(tokens, SamplingParams(seed=1), max_tokens=10_000))])
    assert end.finish_reason in ("context", "stop")
    if end.finish_reason == "context":
        assert len(tokens) + end.generated_tokens == 512
    # a seed repeats a sampled reply for the same engine state (what other slots hold changes the
    # float rounding of attention a little, and at temperature 1 that can change a token)
    sampled = SamplingParams(temperature=1.0, seed=42)
    replies = set()
    for _ in range(2):
        model.engine.clear_cache()
        replies.add(
            run([model.engine.submit(Job(prompt(model, "Say something."), sampled, max_tokens=12))])[0][0]
        )
    assert len(replies) == 1


def test_stop_strings_are_cut_even_across_tokens() -> None:
    stream = TextStream(["END", "\n\n"])
    out = "".join(stream.feed(p) for p in [b"Hello E", b"N", b"D more"])
    assert out == "Hello " and stream.stopped and stream.full == "Hello " and stream.matched == "END"
    assert TextStream(["b", "a"]).feed(b"xaby") == "x" and TextStream(["b", "a"]).matched is None
    both = TextStream(["b", "a"])
    both.feed(b"xaby")
    assert both.matched == "a"  # the earliest stop string in the text is the one that ends it
    stream = TextStream(["xyz"])
    assert stream.feed(b"abx") == "ab" and stream.feed(b"q") == "xq"  # held back, then released
    assert TextStream([]).feed("é".encode()[:1]) == ""  # half a character waits for the rest


def test_template_limits_stop_hangs_huge_values_and_empty_prompts() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    hang = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x")
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="longer than"):
        hang.render(msgs)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ModelLoadError, match="value"):
        ChatTemplate("{{ 'x' * 10**9 }}").render(msgs)
    with pytest.raises(ModelLoadError, match="value"):
        ChatTemplate("{% set s = 'x' * 900000 %}{{ s + s }}").render(msgs)
    with pytest.raises(ModelLoadError, match="empty prompt"):
        ChatTemplate("{% if false %}x{% endif %}").render(msgs)
    with pytest.raises(ModelLoadError, match="invalid"):
        ChatTemplate("{% for %}")
    with pytest.raises(ModelLoadError, match="unsafe|access"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(msgs)
    ok = ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ bos_token }}", bos_token="<s>"
    )
    assert ok.render(msgs) == "<user>hi<s>"


@pytest.mark.timeout(120)  # before the fix the engine thread died and the first job's reader hung
def test_an_unexpected_error_ends_only_the_jobs_it_hit_and_the_engine_thread_goes_on(
    smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = ChatModel.load(smollm2_gguf, ctx=256, threads=2, parallel=2)
    engine = m.engine
    engine.start()  # the server's mode: the scheduler on its own thread
    try:
        real_sample, calls = engine._sample, []

        def sample_failing_once(slot):  # noqa: ANN001, ANN202
            calls.append(slot)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real_sample(slot)

        monkeypatch.setattr(engine, "_sample", sample_failing_once)
        hit = engine.submit(Job(prompt(m, "Say hello."), GREEDY, max_tokens=4))
        assert list(hit.chunks())[-1].finish_reason == "error" and "RuntimeError: boom" in hit.end.error
        # the thread is alive: the next job is answered, and a sampler that cannot be built fails only its job
        after = engine.submit(Job(prompt(m, "Say hello."), GREEDY, max_tokens=4))
        assert list(after.chunks())[-1].finish_reason in ("stop", "length") and after.end.generated_tokens > 0

        def broken_sampler(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise TypeError("a binding changed")

        monkeypatch.setattr("selfhost.runtime.batch.make_sampler", broken_sampler)
        refused = engine.submit(Job(prompt(m, "Say hello."), GREEDY, max_tokens=4))
        assert list(refused.chunks())[-1].finish_reason == "error" and "TypeError" in refused.end.error
        monkeypatch.undo()
        assert engine._thread is not None and engine._thread.is_alive() and engine.busy() == (0, 0)
    finally:
        m.close()


def test_repetition_penalties_reach_llama_cpp(model: ChatModel) -> None:
    """llama-cpp-python 0.3.36's penalties sampler takes n_vocab first: a penalised job runs and differs."""
    model.engine.clear_cache()
    question = prompt(model, "List the numbers from one to twenty, separated by commas.")
    plain = run([model.engine.submit(Job(question, GREEDY, max_tokens=40))])[0]
    penalised = SamplingParams(temperature=0, repeat_penalty=1.8, frequency_penalty=1.0, presence_penalty=1.0)
    model.engine.clear_cache()
    text, end = run([model.engine.submit(Job(question, penalised, max_tokens=40))])[0]
    assert end.finish_reason in ("stop", "length") and end.error is None
    assert text != plain[0]
