"""The other protocols of `selfhost serve` for real: Anthropic Messages, OpenAI Responses, Ollama's API,
llama-server's tokenize endpoints and Prometheus metrics; one uvicorn + SmolLM2, the official clients.
(How the metrics move as requests are served: tests/serve/test_serve_fake_engine.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from tests.fakes.servehelp import WEATHER, Server
from tests.fakes.tinygguf import gguf_bytes, write_tiny_reranker

pytestmark = pytest.mark.slow

KEY = "proto-key-456"
MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the served file's name (selfhost's name for a .gguf path)
GREEDY = {"temperature": 0}  # anthropic 2.x dropped sampling arguments: sent as extra fields
SYSTEM = "Answer in one short sentence."
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("proto") / "home"
    reranker = write_tiny_reranker(home.parent / "tiny-reranker.gguf")
    flags = ["--parallel", "2", "--ctx", "1024", "--threads", "2", "--rerank-model", str(reranker)]
    with Server(smollm2_gguf, home, *flags, api_key=KEY) as srv:
        yield srv


def post(server: Server, path: str, body: object, **headers: str) -> httpx.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    sent = {"Content-Type": "application/json", **server.headers(), **headers}
    return httpx.post(f"{server.url}{path}", content=data, headers=sent, timeout=120)


# ------------------------------------------------------------------ Anthropic
@pytest.fixture(scope="module")
def claude(server: Server):
    from anthropic import Anthropic

    return Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def test_anthropic_reply_stream_and_count_tokens(server: Server, claude) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    reply = claude.messages.create(
        model=MODEL, system=SYSTEM, messages=messages, max_tokens=24, extra_body=GREEDY
    )
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    text = reply.content[0].text
    assert "Paris" in text and reply.stop_reason in ("end_turn", "max_tokens")
    counted = claude.messages.count_tokens(model=MODEL, system=SYSTEM, messages=messages)
    assert counted.input_tokens == reply.usage.input_tokens > 10  # the same rendered prompt

    with claude.messages.stream(
        model=MODEL, system=SYSTEM, messages=messages, max_tokens=24, extra_body=GREEDY
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(deltas) == text and len(deltas) > 1  # streamed in pieces, same greedy reply
    assert final.stop_reason == reply.stop_reason and final.usage.output_tokens == reply.usage.output_tokens

    # the raw event sequence, in Anthropic's order
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60
    ) as response:
        kinds = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]

    # a stop sequence ends the reply: Anthropic's stop_reason "stop_sequence" names it, whole and streamed
    cut = claude.messages.create(model=MODEL, system=SYSTEM, messages=messages, max_tokens=24,
                                 stop_sequences=["Paris"], extra_body=GREEDY)  # fmt: skip
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == "Paris"
    before = cut.content[0].text if cut.content else ""
    assert "Paris" not in before and text.startswith(before.rstrip())  # the greedy reply, cut before it
    with claude.messages.stream(model=MODEL, system=SYSTEM, messages=messages, max_tokens=24,
                                stop_sequences=["Paris"], extra_body=GREEDY) as stream:  # fmt: skip
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "Paris"
    assert set(kinds[2:-3]) == {"content_block_delta"}


def test_anthropic_forced_tool_call_answered_with_tool_result(claude) -> None:
    from jsonschema import validate

    tools = [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = claude.messages.create(
        model=MODEL,
        messages=messages,
        max_tokens=60,
        extra_body=GREEDY,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert reply.stop_reason == "tool_use"
    use = next(b for b in reply.content if b.type == "tool_use")
    assert use.name == "get_weather"
    validate(use.input, WEATHER)

    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}],
        },
    ]
    answer = claude.messages.create(
        model=MODEL,
        messages=messages,
        max_tokens=30,
        extra_body=GREEDY,
        tools=tools,
        tool_choice={"type": "none"},
    )
    assert answer.content[0].type == "text" and answer.content[0].text
    alone = claude.messages.count_tokens(model=MODEL, messages=messages[:1]).input_tokens
    assert answer.usage.input_tokens > alone + 15  # the call and its result are in the prompt
    # a tool use streamed: one tool_use block with its JSON in an input_json_delta
    with claude.messages.stream(
        model=MODEL,
        messages=messages[:1],
        max_tokens=60,
        extra_body=GREEDY,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        final = stream.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert streamed.input == use.input and final.stop_reason == "tool_use"


HI = [{"role": "user", "content": "x"}]
ANTHROPIC_MALFORMED = [
    ("not json", "{messages: ["),
    ("no max_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
    ("bad role", {"max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}),
    ("empty messages", {"max_tokens": 5, "messages": []}),
    ("image block", {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
    ("temperature 1.5", {"max_tokens": 5, "temperature": 1.5, "messages": HI}),
    ("tool choice unnamed", {"max_tokens": 5, "messages": HI, "tools": [{"name": "f"}],
                             "tool_choice": {"type": "tool"}}),
    ("auto tools on SmolLM2", {"max_tokens": 5, "messages": HI, "tools": [{"name": "f"}]}),
]  # fmt: skip


@pytest.mark.parametrize("name,body", ANTHROPIC_MALFORMED, ids=[m[0] for m in ANTHROPIC_MALFORMED])
def test_anthropic_malformed_bodies_get_anthropic_errors(server: Server, name: str, body: object) -> None:
    response = post(server, "/v1/messages", body)
    assert response.status_code == 400, (name, response.text)
    data = response.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert data["error"]["message"] and "Traceback" not in response.text


# ---------------------------------------------------------- OpenAI Responses
@pytest.fixture(scope="module")
def openai(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


class Place(BaseModel):
    city: str
    country: str


def test_responses_create_stream_and_parse(openai) -> None:
    done = openai.responses.create(
        model=MODEL, instructions=SYSTEM, input=QUESTION, max_output_tokens=24, temperature=0
    )
    assert done.object == "response" and done.status in ("completed", "incomplete")
    assert "Paris" in done.output_text and done.store is False
    assert done.usage.input_tokens > 10 and done.usage.output_tokens > 0

    events = list(
        openai.responses.create(
            model=MODEL,
            instructions=SYSTEM,
            input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
            max_output_tokens=24,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == done.output_text and len(deltas) > 1
    assert [e.sequence_number for e in events] == list(range(len(events)))

    parsed = openai.responses.parse(
        model=MODEL,
        input="Name a city in Italy and its country as JSON.",
        text_format=Place,
        max_output_tokens=80,
        temperature=0,
    )
    assert isinstance(parsed.output_parsed, Place) and parsed.output_parsed.city


def test_responses_function_call_round_trip(openai) -> None:
    from jsonschema import validate

    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    first = openai.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        temperature=0,
    )
    call = next(item for item in first.output if item.type == "function_call")
    validate(json.loads(call.arguments), WEATHER)
    follow = openai.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"},
        ],
        tools=tools,
        tool_choice="none",
        max_output_tokens=30,
        temperature=0,
    )
    alone = openai.responses.create(model=MODEL, input="What is the weather in Paris?", max_output_tokens=1)
    assert follow.output_text and follow.usage.input_tokens > alone.usage.input_tokens + 5  # the result


RESPONSES_MALFORMED = [
    ("no input", {"model": "m"}),
    ("input a number", {"input": 5}),
    ("bad item", {"input": [{"type": "function_call", "name": "f"}]}),
    ("web search tool", {"input": "x", "tools": [{"type": "web_search"}]}),
    ("previous response", {"input": "x", "previous_response_id": "resp_1"}),
    ("schema missing", {"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}),
]


@pytest.mark.parametrize("name,body", RESPONSES_MALFORMED, ids=[m[0] for m in RESPONSES_MALFORMED])
def test_responses_malformed_bodies_get_openai_errors(server: Server, name: str, body: object) -> None:
    response = post(server, "/v1/responses", body)
    assert response.status_code == 400, (name, response.text)
    assert response.json()["error"]["message"] and "Traceback" not in response.text


# ---------------------------------------------------------------- Ollama API
@pytest.fixture(scope="module")
def ollama(server: Server):
    from ollama import Client

    return Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_ollama_list_show_ps_version(server: Server, ollama) -> None:
    name = MODEL
    listed = ollama.list().models
    assert listed[0].model == name and listed[0].size > 50_000_000
    assert listed[0].details.quantization_level == "Q4_1" and listed[0].details.family == "llama"
    shown = ollama.show(name)
    assert "im_start" in shown.template and shown.modelinfo["llama.context_length"] == 8192
    assert "completion" in shown.capabilities
    running = ollama.ps().models
    assert [m.model for m in running] == [name] and running[0].context_length == 1024
    assert httpx.get(f"{server.url}/api/version", headers=server.headers()).json()["version"]
    from ollama import ResponseError

    with pytest.raises(ResponseError) as missing:
        ollama.show("no-such-model")
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error


def test_ollama_chat_generate_and_json_format(ollama) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    options = {"temperature": 0, "num_predict": 24}
    reply = ollama.chat(model=MODEL, messages=messages, options=options)
    text = reply.message.content
    assert "Paris" in text and reply.done and reply.done_reason in ("stop", "length")
    assert reply.eval_count > 0 and reply.prompt_eval_count > 10 and reply.total_duration > 0
    parts = list(ollama.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == text and len(parts) > 2
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == reply.eval_count

    made = ollama.generate(model=MODEL, prompt=QUESTION, system=SYSTEM, options=options)
    assert made.response == text  # the same chat prompt, greedy
    raw = ollama.generate(
        model=MODEL, prompt="1, 2, 3, 4,", raw=True, options={"temperature": 0, "num_predict": 6}
    )
    assert raw.response.strip().startswith("5") and raw.eval_count <= 6

    schema = Place.model_json_schema()
    place = ollama.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city in Italy and its country as JSON."}],
        format=schema,
        options={"temperature": 0, "num_predict": 80},
    )
    assert Place.model_validate_json(place.message.content).city
    plain = ollama.generate(
        model=MODEL,
        prompt='Reply with {"name": NAME} for a cat.',
        format="json",
        options={"temperature": 0},
    )
    assert isinstance(json.loads(plain.response), dict)
    loaded = ollama.generate(model=MODEL, prompt="", keep_alive="5m")  # Ollama's way to preload
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_embed_and_unsupported(server: Server, ollama) -> None:
    result = ollama.embed(model=MODEL, input=["a cat sat on the mat", "stocks fell"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 576
    assert result.prompt_eval_count > 0
    legacy = ollama.embeddings(model=MODEL, prompt="a cat sat on the mat")  # the older endpoint
    assert legacy.embedding == pytest.approx(result.embeddings[0], abs=1e-5)
    for path in ("/api/create", "/api/push", "/api/copy"):
        response = post(server, path, {"model": "x"})
        assert response.status_code == 501 and "not supported" in response.json()["error"]
    failed = post(server, "/api/pull", {"model": "no-such-alias-xyz"})
    last = json.loads(failed.text.strip().splitlines()[-1])
    assert failed.status_code == 200 and "no-such-alias-xyz" in last["error"]  # NDJSON: the error is a line


OLLAMA_MALFORMED = [
    ("/api/chat", "not json", "{model: "),
    ("/api/chat", "no model", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/api/chat", "bad role", {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}),
    ("/api/chat", "options a list", {"model": "m", "messages": [], "options": [1]}),
    ("/api/chat", "bad format", {"model": "m", "messages": [], "format": "yaml"}),
    ("/api/generate", "temperature a word", {"model": "m", "prompt": "x", "options": {"temperature": "hot"}}),
    ("/api/generate", "images", {"model": "m", "prompt": "x", "images": ["aGk="]}),
    ("/api/embed", "no input", {"model": "m"}),
    ("/api/show", "no name", {}),
]


@pytest.mark.parametrize("path,name,body", OLLAMA_MALFORMED, ids=[f"{m[0]} {m[1]}" for m in OLLAMA_MALFORMED])
def test_ollama_malformed_bodies_get_ollama_errors(
    server: Server, path: str, name: str, body: object
) -> None:
    response = post(server, path, body)
    assert response.status_code == 400, (name, response.text)
    assert isinstance(response.json()["error"], str) and "Traceback" not in response.text


# ------------------------------------------------ llama-server's helper endpoints
def test_tokenize_detokenize_and_apply_template(server: Server) -> None:
    tokens = post(server, "/tokenize", {"content": "Hello world"}).json()["tokens"]
    assert len(tokens) == 2 and all(isinstance(t, int) for t in tokens)
    pieces = post(server, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tokens and "".join(p["piece"] for p in pieces) == "Hello world"
    special = post(server, "/tokenize", {"content": "<|im_start|>"}).json()["tokens"]
    literal = post(server, "/tokenize", {"content": "<|im_start|>", "parse_special": False}).json()["tokens"]
    assert len(special) == 1 and len(literal) > 1
    assert post(server, "/detokenize", {"tokens": tokens}).json() == {"content": "Hello world"}
    bad = post(server, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and "token id" in bad.json()["error"]["message"]

    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 degrees and sunny"},
    ]  # fmt: skip
    prompt = post(server, "/apply-template", {"messages": messages}).json()["prompt"]
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "18 degrees and sunny" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------- metrics
# ------------------------------------------------------------------- API key
GUARDED = [
    ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/responses"),
    ("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show"), ("POST", "/api/chat"),
    ("POST", "/api/generate"), ("POST", "/api/embed"), ("GET", "/api/version"), ("POST", "/api/pull"),
    ("POST", "/api/create"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/apply-template"),
    ("GET", "/metrics"), ("POST", "/v1/rerank"), ("POST", "/rerank"),
]  # fmt: skip


@pytest.mark.parametrize("method,path", GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
def test_the_api_key_guards_every_endpoint(server: Server, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
        response = httpx.request(method, f"{server.url}{path}", json={}, headers=headers)
        assert response.status_code == 401, (headers, response.text)
    if path.startswith("/api/"):
        assert "API key" in response.json()["error"]
    if path.startswith("/v1/messages"):
        assert response.json()["error"]["type"] == "authentication_error"
    # x-api-key is accepted as well as Bearer
    assert (
        httpx.request(method, f"{server.url}{path}", json={}, headers={"x-api-key": KEY}).status_code != 401
    )


def test_metrics_public_and_api_pull_through_selfhost_pull(
    smollm2_gguf: Path, fake_hub, tmp_path: Path
) -> None:
    tiny = gguf_bytes()
    fake_hub.add_file("someone/tiny-GGUF", "tiny-F32.gguf", tiny)  # the server's `selfhost pull` asks it
    flags = ["--parallel", "1", "--ctx", "256", "--threads", "1", "--metrics-public"]
    with Server(smollm2_gguf, tmp_path / "home", *flags, api_key=KEY) as srv:
        assert "selfhost_slots 1.0" in httpx.get(f"{srv.url}/metrics").text
        assert httpx.get(f"{srv.url}/api/tags").status_code == 401  # only /metrics is public
        headers = {"x-api-key": KEY}
        none = httpx.post(f"{srv.url}/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=headers)
        assert none.status_code == 400 and "--rerank-model" in none.json()["error"]["message"]

        from ollama import Client

        ollama = Client(host=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        progress = list(ollama.pull("someone/tiny-GGUF:F32", stream=True))
        assert progress[-1].status == "success"
        sizes = [p.total for p in progress if p.total]
        assert sizes and max(sizes) == len(tiny)
        assert [p.completed for p in progress if p.total][-1] == len(tiny)
        assert "someone/tiny-GGUF:F32" in [m.model for m in ollama.list().models]


# -------------------------------------------------------------------- rerank
WAR = "When did the Second World War end?"
DOCUMENTS = [
    "The sky is blue and the grass is green.",
    "The Second World War ended in 1945.",
    "Cats sleep for most of the day.",
]


def test_rerank_puts_the_answer_first(server: Server) -> None:
    body = {
        "model": "tiny-reranker",
        "query": WAR,
        "documents": DOCUMENTS,
        "top_n": 2,
        "return_documents": True,
    }
    done = post(server, "/v1/rerank", body)
    assert done.status_code == 200, done.text
    data = done.json()
    results = data["results"]
    assert [r["index"] for r in results][:1] == [1] and len(results) == 2  # the answer first, top_n kept
    assert results[0]["document"] == {"text": DOCUMENTS[1]}
    assert results[0]["relevance_score"] > results[1]["relevance_score"]
    assert data["model"] == "tiny-reranker" and data["usage"]["total_tokens"] > 3 * len(WAR)
    # Jina's {"text": ...} documents, the /rerank alias, every document when there is no top_n
    alias = post(server, "/rerank", {"query": WAR, "documents": [{"text": d} for d in reversed(DOCUMENTS)]})
    ranked = alias.json()["results"]
    assert len(ranked) == 3 and ranked[0]["index"] == 1 and "document" not in ranked[0]
    scores = [r["relevance_score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]


RERANK_MALFORMED = [
    ("no query", {"documents": ["a"]}),
    ("no documents", {"query": "q", "documents": []}),
    ("document a number", {"query": "q", "documents": [5]}),
    ("top_n 0", {"query": "q", "documents": ["a"], "top_n": 0}),
    ("too long", {"query": "q", "documents": ["9" * 5000]}),
]


@pytest.mark.parametrize("name,body", RERANK_MALFORMED, ids=[m[0] for m in RERANK_MALFORMED])
def test_rerank_malformed_bodies_are_400(server: Server, name: str, body: object) -> None:
    response = post(server, "/v1/rerank", body)
    assert response.status_code == 400, (name, response.text)
    assert response.json()["error"]["message"] and "Traceback" not in response.text


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/messages", {"max_tokens": 800, "stream": True}),
        ("/api/chat", {"model": MODEL, "options": {"num_predict": 800}}),
        ("/v1/responses", {"input": "Tell me a very long story about a dragon.", "stream": True}),
    ],
    ids=["anthropic", "ollama", "responses"],
)
def test_a_client_that_leaves_a_stream_frees_its_slot(server: Server, path: str, body: dict) -> None:
    story = [{"role": "user", "content": "Tell me a very long story about a dragon."}]
    body = {"messages": story, **body} if "input" not in body else body
    with httpx.stream(
        "POST", f"{server.url}{path}", json=body, headers=server.headers(), timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        [next(lines) for _ in range(8)]
        assert server.health()["slots_busy"] == 1
    deadline = time.monotonic() + 10
    while server.health()["slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["slots_busy"] == 0


def test_an_oversized_body_is_413_in_each_protocols_shape(server: Server) -> None:
    huge = "x" * (9 * 2**20)
    anthropic = post(
        server, "/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": huge}]}
    )
    assert anthropic.status_code == 413 and anthropic.json()["error"]["type"] == "request_too_large"
    ollama = post(server, "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": huge}]})
    assert ollama.status_code == 413 and "over" in ollama.json()["error"]
    responses = post(server, "/v1/responses", {"input": huge})
    assert responses.status_code == 413 and "over" in responses.json()["error"]["message"]


def test_ollama_keep_alive_unloads_and_ps_shows_it(server: Server, ollama) -> None:
    """Last in the module: it unloads the served model, which the next request loads again."""
    running = ollama.ps().models
    assert [m.model for m in running] == [MODEL] and running[0].expires_at is not None
    ollama.generate(model=MODEL, prompt="", keep_alive=0)  # Ollama's way to unload a model now
    deadline = time.monotonic() + 20
    while ollama.ps().models and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ollama.ps().models == []
    again = ollama.chat(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], options={"num_predict": 4}
    )
    assert again.done and [m.model for m in ollama.ps().models] == [MODEL]
