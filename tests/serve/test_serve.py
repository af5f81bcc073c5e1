"""`selfhost serve` for real: uvicorn in a subprocess, SmolLM2 in llama.cpp, the official openai client.

A full queue, clients that leave and the history log run over the fake engine instead:
tests/serve/test_serve_fake_engine.py."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.fakes.servehelp import WEATHER, Server

pytestmark = pytest.mark.slow

KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the served file's name: a request names the model it wants
BRIEF = {"role": "system", "content": "Answer in one short sentence."}
PARIS = [BRIEF, {"role": "user", "content": "What is the capital of France?"}]
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What do bees make?",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("serve") / "home"
    flags = ["--parallel", "4", "--ctx", "1024", "--threads", "2"]
    with Server(smollm2_gguf, home, *flags, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server: Server, path: str, body: object, **kw) -> httpx.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {"Content-Type": "application/json", **server.headers(), **kw.pop("headers", {})}
    kw.setdefault("timeout", 120)
    return httpx.post(f"{server.url}{path}", content=data, headers=headers, **kw)


def ask(client, question: str, max_tokens: int = 40) -> str:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[BRIEF, {"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
    )
    return reply.choices[0].message.content


def test_start_line_models_and_health(server: Server, client) -> None:
    out = server.output()
    assert "4 slots" in out and "context 1024 per slot" in out and "layers offloaded" in out, out
    assert f"serving on {server.url}/v1" in out
    assert server.health()["slots"] == 4
    ids = [m.id for m in client.models.list().data]
    assert ids[0].startswith("SmolLM2"), ids


def test_openai_client_gets_paris_streaming_and_not(server: Server, client) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=24)
    text = reply.choices[0].message.content
    assert "Paris" in text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.id.startswith("chatcmpl-") and reply.created > 0 and reply.object == "chat.completion"

    # usage counts the tokens: the prompt as the template renders it, the reply as generated
    from selfhost.chat.model import ChatModel

    model = ChatModel.load(_gguf(server), ctx=1024, threads=1)
    try:
        prompt = model.tokenize_prompt(model.render(PARIS))
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.usage.completion_tokens == model.count_tokens(text)
        assert reply.usage.total_tokens == len(prompt) + reply.usage.completion_tokens
    finally:
        model.close()

    stream = client.chat.completions.create(
        model=MODEL,
        messages=PARIS,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(deltas) == text and len(deltas) > 1  # streamed in pieces, same greedy reply
    assert finish == reply.choices[0].finish_reason
    assert usage.completion_tokens == reply.usage.completion_tokens
    assert usage.prompt_tokens == reply.usage.prompt_tokens


def test_four_concurrent_streams_equal_their_replies_alone(server: Server, client) -> None:
    alone = [ask(client, q, 48) for q in QUESTIONS]

    def stream(question: str) -> str:
        parts = []
        for event in client.chat.completions.create(
            model=MODEL,
            messages=[BRIEF, {"role": "user", "content": question}],
            temperature=0,
            max_tokens=48,
            stream=True,
        ):
            parts += [c.delta.content or "" for c in event.choices]
        return "".join(parts)

    peak = []
    watching = True

    def watch() -> None:
        while watching:
            peak.append(server.health()["slots_busy"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(stream, QUESTIONS))
    finally:
        watching = False
        watcher.join()
    assert max(peak) >= 3  # the requests really ran side by side
    assert together == alone


def test_over_long_prompt_is_400_and_the_server_answers_next(server: Server) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 8}
    response = post(server, "/v1/chat/completions", long)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "1024" in error["message"]
    assert post(server, "/v1/chat/completions", {"messages": PARIS, "max_tokens": 4}).status_code == 200


def test_a_reply_stops_at_the_context_end_with_length(server: Server) -> None:
    counting = ", ".join(str(i) for i in range(1, 207)) + ","  # the model goes on counting
    response = post(server, "/v1/completions", {"prompt": counting, "max_tokens": 500, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert 900 < body["usage"]["prompt_tokens"] < 1000
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 1024  # the slot's whole context, never past it


def test_api_key_is_required_except_for_health(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": PARIS})
    assert response.status_code == 401


MALFORMED = [
    ("not json", "{messages: ["),
    ("a list", "[1, 2]"),
    ("no messages", {"model": "x"}),
    ("empty messages", {"messages": []}),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("content a number", {"messages": [{"role": "user", "content": 42}]}),
    ("temperature a word", {"messages": PARIS, "temperature": "hot"}),
    ("temperature too high", {"messages": PARIS, "temperature": 7}),
    ("n = 2", {"messages": PARIS, "n": 2}),
    ("max_tokens 0", {"messages": PARIS, "max_tokens": 0}),
    ("five stops", {"messages": PARIS, "stop": ["a", "b", "c", "d", "e"]}),
    (
        "tool_choice unknown",
        {
            "messages": PARIS,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
    ),
    (
        "bad tool name",
        {"messages": PARIS, "tools": [{"type": "function", "function": {"name": "no spaces!"}}]},
    ),
    ("schema missing", {"messages": PARIS, "response_format": {"type": "json_schema"}}),
    ("format type", {"messages": PARIS, "response_format": {"type": "yaml"}}),
    ("logprobs", {"messages": PARIS, "logprobs": True}),
]


@pytest.mark.parametrize("name,body", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_are_4xx_json_errors(server: Server, name: str, body: object) -> None:
    response = post(server, "/v1/chat/completions", body)
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text


def test_other_bad_requests_and_the_server_stays_up(server: Server) -> None:
    huge = post(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (9 * 2**20)}]}
    )
    assert huge.status_code == 413 and "error" in huge.json()
    assert httpx.get(f"{server.url}/v1/nothing", headers=server.headers()).status_code == 404
    assert httpx.get(f"{server.url}/v1/chat/completions", headers=server.headers()).status_code == 405
    field = post(server, "/v1/chat/completions", {"messages": PARIS, "temperature": "hot"}).json()["error"]
    assert field["param"] == "temperature" and "temperature" in field["message"]
    assert server.proc.poll() is None
    assert server.health()["status"] == "ok"


def test_json_schema_response_format_validates(server: Server, client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city in Italy and its country as JSON."}],
        temperature=0,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    data = json.loads(reply.choices[0].message.content)
    jsonschema.validate(data, schema)
    plain = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Reply with {"name": NAME} for a cat.'}],
        temperature=0,
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    assert plain.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(plain.choices[0].message.content), dict)


def test_forced_tool_call_arguments_validate(server: Server, client) -> None:
    parameters = WEATHER
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather now", "parameters": parameters},
        },
        {
            "type": "function",
            "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        temperature=0,
        max_tokens=60,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), parameters)

    required = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it?"}],
        temperature=0,
        max_tokens=60,
        tools=tools,
        tool_choice="required",
    )
    call = required.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
    # SmolLM2's template has no tools: "auto" is refused clearly instead of silently ignoring them
    auto = post(server, "/v1/chat/completions", {"messages": PARIS, "tools": tools})
    assert auto.status_code == 400 and auto.json()["error"]["code"] == "tools_unsupported"


def test_text_completions_and_embeddings(server: Server, client) -> None:
    done = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert done.object == "text_completion" and done.choices[0].text.strip()
    assert done.usage.completion_tokens <= 8
    stopped = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[","]
    )
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"

    result = client.embeddings.create(
        model=MODEL, input=["a cat sat on the mat", "a cat sat on the mat", "stocks"]
    )
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3 and all(len(v) == 576 for v in vectors)  # SmolLM2's width
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-4
    assert vectors[0] == pytest.approx(vectors[1], abs=1e-5) and vectors[0] != pytest.approx(
        vectors[2], abs=1e-3
    )
    assert result.usage.prompt_tokens > 0
    single = client.embeddings.create(model=MODEL, input="hello")
    assert len(single.data) == 1


def test_second_embedding_model_then_sigterm_finishes_and_exits_0(
    smollm2_gguf: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    flags = ["--parallel", "1", "--ctx", "512", "--threads", "1", "--max-queue", "0"]
    with Server(smollm2_gguf, tmp_path / "home", *flags, "--embedding-model", str(tiny_gguf)) as srv:
        embedded = post(srv, "/v1/embeddings", {"input": ["one", "two"]}).json()
        assert embedded["model"] == "tiny" and len(embedded["data"]) == 2
        assert len(embedded["data"][0]["embedding"]) == 64  # the tiny model's width, not SmolLM2's 576
        ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
        assert ids[:2] == ["SmolLM2-135M-Instruct.Q4_1", "tiny"]
        body = {"messages": PARIS, "max_tokens": 16, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.HTTPError):  # no longer accepting
                httpx.get(f"{srv.url}/health", timeout=2)
            rest = list(lines)  # the reply in flight is finished within the grace period
        assert [line for line in rest if line][-1] == "data: [DONE]"
        assert srv.proc.wait(30) == 0, srv.output()  # the one SIGTERM is enough: exit 0
    assert "stopped" in srv.output()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{srv.url}/health", timeout=2)


def _gguf(server: Server) -> Path:
    return Path(server.proc.args[4])
