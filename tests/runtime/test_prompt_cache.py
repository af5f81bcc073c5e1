"""The prompt cache on real llama.cpp (SmolLM2): a conversation whose slot was taken by another gets its
prefix back from RAM, or from disk in a new process; corrupt and foreign files are ignored with a
notice. Prompt tokens evaluated are counted, not timed."""

from __future__ import annotations

from pathlib import Path

from selfhost.chat.model import ChatModel, EngineOptions
from selfhost.runtime.jobs import Job, JobEnd
from selfhost.runtime.kvcache import KVSettings
from selfhost.runtime.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0)
HISTORY = "Here are my notes. " + " ".join(f"Item {i}: buy {i} apples and {i + 1} pears." for i in range(16))


def load(path: Path, parallel: int = 1, **options) -> ChatModel:  # noqa: ANN003
    return ChatModel.load(
        Path(path), ctx=1024, threads=2, parallel=parallel, options=EngineOptions(**options)
    )


def ask(model: ChatModel, *turns: str) -> tuple[list[int], JobEnd]:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    tokens = model.tokenize_prompt(model.render(messages))
    job = model.engine.submit(Job(tokens, GREEDY, max_tokens=4))
    for _ in job.chunks():
        pass
    assert job.end is not None
    return tokens, job.end


def evaluated(end: JobEnd) -> int:
    return end.prompt_tokens - end.reused_tokens


def test_a_conversation_gets_its_prefix_back_from_ram_after_its_slot_was_taken(smollm2_gguf: Path) -> None:
    for cache_ram in (0, 64):
        model = load(smollm2_gguf, cache_ram_mb=cache_ram)
        try:
            first, _ = ask(model, HISTORY)
            ask(model, "Something else entirely: " + HISTORY[::-1])  # takes the only slot
            tokens, end = ask(model, HISTORY, "Noted.", "How many pears in item 3?")
        finally:
            model.close()
        if cache_ram == 0:  # no cache: all but the template's head (system prompt) is read again
            assert evaluated(end) >= len(tokens) - 32
            assert end.restored_tokens == 0
        else:  # the first turn's prefix comes back: only the new turn is evaluated
            assert end.restored_tokens >= len(first) - 8
            assert evaluated(end) <= len(tokens) - len(first) + 8
            assert len(first) > 150


def test_the_disk_cache_outlives_the_process_and_ignores_corrupt_or_foreign_files(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    model = load(smollm2_gguf, cache_dir=cache)
    first, _ = ask(model, HISTORY)
    model.close()  # the slot's state is written to the directory
    files = list(cache.glob("*.bin"))
    assert len(files) == 1

    model = load(smollm2_gguf, cache_dir=cache)  # a new engine, as in `selfhost chat --continue`
    assert model.engine.prompt_cache.take_notices() == []
    tokens, end = ask(model, HISTORY, "Noted.", "How many pears in item 3?")
    model.engine.prompt_cache.directory = None  # keep the file as it is for the next part
    model.close()
    assert end.restored_tokens >= len(first) - 8 and evaluated(end) <= len(tokens) - len(first) + 8

    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the state
    files[0].write_bytes(bytes(data))
    model = load(smollm2_gguf, cache_dir=cache)
    tokens, end = ask(model, HISTORY, "Noted.", "How many pears in item 3?")
    notices = [n.message for n in model.engine.prompt_cache.take_notices()]
    model.engine.prompt_cache.directory = None
    model.close()
    assert end.restored_tokens == 0 and evaluated(end) == len(tokens)
    assert any("corrupt" in n for n in notices), notices

    model = load(smollm2_gguf, cache_dir=cache)  # a good file again
    ask(model, HISTORY)
    model.close()
    model = load(smollm2_gguf, cache_dir=cache, kv=KVSettings(type_k="q8_0"))  # another KV layout
    notices = [n.message for n in model.engine.prompt_cache.take_notices()]
    tokens, end = ask(model, HISTORY, "Noted.", "How many pears in item 3?")
    model.close()
    assert any("made for another model" in n for n in notices), notices
    assert end.restored_tokens == 0


def test_a_served_conversation_gets_its_prefix_back_after_another_took_the_slot(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    import httpx

    from tests.fakes.servehelp import Server

    def ask(*turns: str) -> dict:
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
        ]
        body = {"messages": messages, "temperature": 0, "max_tokens": 2}
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    flags = ["--parallel", "1", "--ctx", "1024", "--cache-ram", "64"]
    with Server(smollm2_gguf, tmp_path / "home", *flags) as srv:
        first = ask(HISTORY)
        ask("Something else entirely: " + HISTORY[::-1])
        back = ask(HISTORY, "Noted.", "How many pears in item 3?")
        health = httpx.get(f"{srv.url}/v1/status", timeout=5).json()["models"][0]  # per-model counters
    assert back["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] - 8
    assert health["prompt_cache"]["restored"] == 1


def test_chat_continue_starts_from_the_cache_dir(runner, smollm2_gguf: Path, tmp_path: Path) -> None:
    import json

    from selfhost.cli.app import app

    common = [str(smollm2_gguf), "--threads", "2", "--ctx", "1024", "-t", "0", "-n", "4", "--json"]
    common += ["--cache-dir", str(tmp_path / "prompts")]
    first = runner.invoke(app, ["chat", "-p", HISTORY, *common])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["chat", "--continue", "-p", "How many pears in item 3?", *common])
    assert again.exit_code == 0, again.output
    usage = json.loads(again.stdout)["usage"]
    assert usage["restored_tokens"] >= json.loads(first.stdout)["usage"]["prompt_tokens"] - 8
    assert usage["evaluated_tokens"] < usage["prompt_tokens"] // 3
