"""`selfhost serve` over the fake engine, where llama.cpp adds nothing: metrics, a full queue, clients that
leave, the history log, the model budget. The server is the real one (bind, model manager, FastAPI,
uvicorn on 127.0.0.1) on a thread of the test process (tests/fakes/inprocess.py), its models scripted
(tests/fakes/engine.py). Replies, token counts, grammars, batching and context limits keep their tests
on real llama.cpp: test_serve.py, test_serve_protocols.py, test_serve_models.py."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes.engine import FakeModel, numbered, use_fake_engine
from tests.fakes.inprocess import InProcessServer

KEY = "fake-key-789"
HI = [{"role": "user", "content": "What is the capital of France?"}]
ENDLESS = " and so on" * 2000  # longer than any reply these tests let run


@pytest.fixture(scope="module")
def served(tiny_gguf: Path):
    """One server for the module: two slots, a queue of one, the history log on."""
    with pytest.MonkeyPatch.context() as mp:
        fake = use_fake_engine(mp, FakeModel(step_seconds=0.005))
        srv = InProcessServer(mp, [tiny_gguf], api_key=KEY, parallel=2, max_queue=1, ctx=4096, log=True)
        yield srv, fake
        srv.stop()


@pytest.fixture
def server(served: tuple[InProcessServer, FakeModel]) -> InProcessServer:
    srv, fake = served
    wait_idle(srv)  # what the test before left running has ended
    fake.default, fake.prompts[:] = numbered, []
    return srv


@pytest.fixture
def fake(served: tuple[InProcessServer, FakeModel]) -> FakeModel:
    return served[1]


def post(server: InProcessServer, path: str, body: object, **kw) -> httpx.Response:
    kw.setdefault("timeout", 30)
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers(), **kw)


def wait_idle(server: InProcessServer, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while (health := server.health())["slots_busy"] or health["queued"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    return health


def metrics(server: InProcessServer) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_and_move_as_requests_are_served(server: InProcessServer, fake: FakeModel) -> None:
    before = metrics(server)
    assert before[("selfhost_slots", ())] == 2 and before[("selfhost_models_loaded", ())] == 1
    assert before[("selfhost_model_load_seconds", (("model", "tiny"),))] > 0
    assert post(server, "/v1/messages", {"model": "tiny", "max_tokens": 8, "messages": HI}).status_code == 200
    assert post(server, "/api/chat", {"model": "tiny", "messages": HI, "stream": False}).status_code == 200
    assert post(server, "/v1/messages", {"messages": []}).status_code == 400
    after = metrics(server)

    def moved(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("selfhost_requests_total", (("endpoint", "/v1/messages"), ("status", "200"))) == 1
    assert moved("selfhost_requests_total", (("endpoint", "/v1/messages"), ("status", "400"))) == 1
    assert moved("selfhost_requests_total", (("endpoint", "/api/chat"), ("status", "200"))) == 1
    assert moved("selfhost_time_to_first_token_seconds_count") == 2
    assert moved("selfhost_time_per_output_token_seconds_count") == 2
    assert moved("selfhost_generated_tokens_total") == 2 * 7  # "Reply N from the fake model."
    engine = fake.engines[0]
    prompts = sum(len(engine.tokenize(p, add_bos=False, special=True)) for p in fake.prompts)
    assert len(fake.prompts) == 2 and moved("selfhost_prompt_tokens_total") == prompts
    assert after[("selfhost_slots_busy", ())] == 0 and after[("selfhost_queue_length", ())] == 0


def test_full_queue_answers_503_with_retry_after(server: InProcessServer, fake: FakeModel) -> None:
    fake.default = lambda prompt, n: ENDLESS
    body = {"prompt": "1, 2, 3,", "max_tokens": 4000, "stream": True}
    opened = []  # these hold both slots and the one place in the queue
    try:
        for _ in range(3):
            ctx = httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers())
            opened.append((ctx, ctx.__enter__()))
        deadline = time.monotonic() + 10
        while server.health()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.health()["slots_busy"] == 2
        refused = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4})
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        for ctx, _ in opened:
            ctx.__exit__(None, None, None)
    wait_idle(server)
    assert post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4}).status_code == 200


def test_disconnected_stream_frees_its_slot(server: InProcessServer, fake: FakeModel) -> None:
    fake.default = lambda prompt, n: ENDLESS
    body = {"messages": HI, "max_tokens": 3000, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=30
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert server.health()["slots_busy"] == 1
    wait_idle(server)
    fake.default = lambda prompt, n: "Back."
    done = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4})
    assert done.json()["choices"][0]["message"]["content"] == "Back."


def test_a_waiting_non_streaming_client_that_hangs_up_frees_its_slot(
    server: InProcessServer, fake: FakeModel
) -> None:
    fake.default = lambda prompt, n: ENDLESS
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 3000}, timeout=0.5)
    wait_idle(server)


def test_log_writes_served_conversations_to_history(server: InProcessServer) -> None:
    from selfhost.chat.history import HistoryStore

    system = {"role": "system", "content": "Answer in one short sentence."}
    question = {"role": "user", "content": "What do cows drink?"}
    reply = post(server, "/v1/chat/completions", {"messages": [system, question], "max_tokens": 12}).json()
    store = HistoryStore()  # the test's SELFHOST_HOME is the server's
    convs = [store.get(c.id) for c in store.list()]
    found = [c for c in convs if c.messages and c.messages[0].content == "What do cows drink?"]
    assert found and found[0].system == system["content"]
    assert [(m.role, m.content) for m in found[0].messages] == [
        ("user", "What do cows drink?"), ("assistant", reply["choices"][0]["message"]["content"])
    ]


def test_a_budget_of_one_model_evicts_the_first_but_never_while_it_streams(
    monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path, tmp_path: Path, capsys
) -> None:
    from selfhost.models.store import ModelRecord, Store

    fake = use_fake_engine(monkeypatch, FakeModel(step_seconds=0.005))  # its own server, its own models

    for name in ("first", "second"):
        path = Path(shutil.copy(tiny_gguf, tmp_path / f"{name}.gguf"))
        Store().add(ModelRecord(name=name, path=path, size=path.stat().st_size, sha256=None, source="local"))
    fake.default = lambda prompt, n: ENDLESS
    srv = InProcessServer(monkeypatch, ["first"], parallel=1, max_models=1, ctx=512)
    try:
        story = {"model": "first", "messages": HI, "max_tokens": 60, "stream": True,
                 "stream_options": {"include_usage": True}}  # fmt: skip
        events: list[tuple[float, str]] = []
        other: dict = {}

        def ask_second() -> None:
            other["reply"] = post(srv, "/v1/chat/completions", {"model": "second", "messages": HI,
                                                                 "max_tokens": 4}).json()  # fmt: skip
            other["at"] = time.monotonic()

        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=story, timeout=30) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            thread = threading.Thread(target=ask_second)
            thread.start()
            for line in lines:
                if line.startswith("data:"):
                    events.append((time.monotonic(), line))
            streamed_until = time.monotonic()
        thread.join(30)
        usage = json.loads(events[-2][1].removeprefix("data: "))["usage"]
        assert events[-1][1] == "data: [DONE]" and usage["completion_tokens"] == 60  # never cut short
        assert other["reply"]["model"] == "second" and other["at"] >= streamed_until - 0.05
        names = {m["name"] for m in httpx.get(f"{srv.url}/v1/status", timeout=5).json()["models"]}
        assert names == {"second"}
    finally:
        srv.stop()
    assert "unloaded first to make room (--max-models 1)" in capsys.readouterr().err
    assert [e.closed for e in fake.engines] == [True, True]  # the evicted model, then the last at stop
