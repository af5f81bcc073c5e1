"""Speculative decoding in the batch engine (real llama.cpp, SmolLM2): n-gram and draft-model drafts
give the same greedy tokens as no speculation, seeded sampling is unchanged, acceptance is counted,
a draft model with another vocabulary is refused; and the same through the server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from selfhost.chat.model import ChatModel, EngineOptions
from selfhost.errors import UsageError
from selfhost.runtime.jobs import Job, JobEnd, JobText
from selfhost.runtime.sampler import SamplingParams
from selfhost.runtime.speculative import NgramDrafter, SpecSettings
from tests.fakes.servehelp import Server

GREEDY = SamplingParams(temperature=0)
QUOTE = (
    "Repeat this text exactly: The quick brown fox jumps over the lazy dog. Pack my box with five "
    "dozen liquor jugs. How vexingly quick daft zebras jump."
)
FREE = "Tell me a story about a cat."


def load(path: Path, parallel: int = 1, **options) -> ChatModel:  # noqa: ANN003
    return ChatModel.load(Path(path), ctx=512, threads=2, parallel=parallel, options=EngineOptions(**options))


def reply(
    model: ChatModel, question: str, sampling: SamplingParams = GREEDY, n: int = 48
) -> tuple[str, JobEnd]:
    model.engine.clear_cache()  # cold: a reused prefix was computed in another batch (other rounding)
    tokens = model.tokenize_prompt(model.render([{"role": "user", "content": question}]))
    job = model.engine.submit(Job(tokens, sampling, max_tokens=n))
    text = "".join(c.text for c in job.chunks() if isinstance(c, JobText))
    assert job.end is not None
    return text, job.end


@pytest.fixture(scope="module")
def plain(smollm2_gguf: Path):
    m = load(smollm2_gguf)
    yield m
    m.close()


def test_ngram_drafter_proposes_what_followed_the_last_ngram() -> None:
    d = NgramDrafter(2)
    d.reset([1, 2, 3, 4, 5, 9, 1, 2])
    assert d.draft(3) == [3, 4, 5]
    d.extend([3])  # the latest occurrence wins
    assert d.draft(2) == [4, 5]
    d.extend([7])
    assert d.draft(4) == []  # (3, 7) never occurred before


def test_ngram_speculation_keeps_greedy_and_seeded_output(plain: ChatModel, smollm2_gguf: Path) -> None:
    spec = load(smollm2_gguf, spec=SpecSettings(mode="ngram", draft_max=6, ngram=2))
    try:
        for question in (QUOTE, FREE):
            base, base_end = reply(plain, question)
            fast, end = reply(spec, question)
            assert fast == base and end.generated_tokens == base_end.generated_tokens
            assert 0 <= end.accepted_tokens <= end.drafted_tokens
        _, quoted = reply(spec, QUOTE)
        assert quoted.drafted_tokens > 0 and quoted.accepted_tokens >= quoted.drafted_tokens // 3
        seeded = SamplingParams(temperature=0.9, seed=11)
        assert reply(spec, FREE, seeded)[0] == reply(plain, FREE, seeded)[0]
        counters = spec.engine.counters()["speculative"]
        assert counters["drafted_tokens"] >= quoted.drafted_tokens > 0
    finally:
        spec.close()


def test_draft_model_speculation_keeps_greedy_output_in_batched_slots(
    plain: ChatModel, smollm2_gguf: Path
) -> None:
    # the reference has 2 slots too: the slot count alone can change float rounding in llama.cpp
    two = load(smollm2_gguf, parallel=2)
    wanted = []
    for q in (QUOTE, FREE):
        two.engine.clear_cache()  # each one alone, as cold as in the batch below
        wanted.append(reply(two, q)[0])
    two.close()
    spec = load(smollm2_gguf, parallel=2, draft_model=str(smollm2_gguf))
    try:
        assert spec.engine.spec.mode == "draft"
        prompts = [spec.tokenize_prompt(spec.render([{"role": "user", "content": q}])) for q in (QUOTE, FREE)]
        jobs = [spec.engine.submit(Job(p, GREEDY, max_tokens=48)) for p in prompts]
        while any(j.end is None for j in jobs):
            spec.engine.step()
        texts = ["".join(c.text for c in j._chunks if isinstance(c, JobText)) for j in jobs]
        assert texts == wanted
        # a model drafting for itself: almost every confident draft is kept
        assert sum(j.end.drafted_tokens for j in jobs) > 10
        assert sum(j.end.accepted_tokens for j in jobs) >= 0.9 * sum(j.end.drafted_tokens for j in jobs)
    finally:
        spec.close()


def test_a_draft_model_with_another_vocabulary_is_refused(smollm2_gguf: Path, tiny_gguf: Path) -> None:
    with pytest.raises(UsageError, match="cannot draft for this model: its vocabulary"):
        load(smollm2_gguf, draft_model=str(tiny_gguf))
    with pytest.raises(UsageError, match="either --spec ngram or --draft-model"):
        load(smollm2_gguf, draft_model=str(smollm2_gguf), spec=SpecSettings(mode="ngram"))


def test_served_greedy_reply_is_the_same_with_ngram_speculation(smollm2_gguf: Path, tmp_path: Path) -> None:
    body = {"messages": [{"role": "user", "content": QUOTE}], "temperature": 0, "max_tokens": 40}
    answers = []
    for args in ((), ("--spec", "ngram", "--spec-ngram", "2")):
        home = tmp_path / f"home{len(args)}"
        with Server(smollm2_gguf, home, "--parallel", "1", "--ctx", "512", *args) as srv:
            r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            answers.append(r.json())
            health = httpx.get(f"{srv.url}/v1/status", timeout=5).json()["models"][0]  # per-model counters
            scraped = httpx.get(f"{srv.url}/metrics", timeout=5).text
    plain_reply, spec_reply = answers
    assert spec_reply["choices"][0]["message"] == plain_reply["choices"][0]["message"]
    details = spec_reply["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0
    assert "accepted_prediction_tokens" not in plain_reply["usage"].get("completion_tokens_details", {})
    assert health["speculative"]["accepted_tokens"] == details["accepted_prediction_tokens"]
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s for f in text_string_to_metric_families(scraped) for s in f.samples}
    assert samples["selfhost_spec_accepted_tokens_total"].value == details["accepted_prediction_tokens"]
    assert samples["selfhost_spec_drafted_tokens_total"].value == health["speculative"]["drafted_tokens"]
