"""The other protocols of `selfhost serve` for real: Anthropic Messages, OpenAI Responses, Ollama's API,
llama-server's tokenize endpoints and Prometheus metrics; one uvicorn + SmolLM2, the official clients."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from tests.servehelp import Server

pytestmark = pytest.mark.slow

KEY = "proto-key-456"
GREEDY = {"temperature": 0}  # anthropic 2.x dropped sampling arguments: sent as extra fields
SYSTEM = "Answer in one short sentence."
QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("proto") / "home"
    srv = Server(smollm2_gguf, home, "--parallel", "2", "--ctx", "1024", "--threads", "2", api_key=KEY)
    yield srv
    assert srv.stop() == 0, srv.output()


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
        model="smollm2", system=SYSTEM, messages=messages, max_tokens=24, extra_body=GREEDY
    )
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    text = reply.content[0].text
    assert "Paris" in text and reply.stop_reason in ("end_turn", "max_tokens")
    counted = claude.messages.count_tokens(model="smollm2", system=SYSTEM, messages=messages)
    assert counted.input_tokens == reply.usage.input_tokens > 10  # the same rendered prompt

    with claude.messages.stream(
        model="smollm2", system=SYSTEM, messages=messages, max_tokens=24, extra_body=GREEDY
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(deltas) == text and len(deltas) > 1  # streamed in pieces, same greedy reply
    assert final.stop_reason == reply.stop_reason and final.usage.output_tokens == reply.usage.output_tokens

    # the raw event sequence, in Anthropic's order
    body = {"model": "m", "messages": messages, "max_tokens": 8, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60
    ) as response:
        kinds = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}


def test_anthropic_forced_tool_call_answered_with_tool_result(claude) -> None:
    from jsonschema import validate

    tools = [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = claude.messages.create(
        model="smollm2",
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
        model="smollm2",
        messages=messages,
        max_tokens=30,
        extra_body=GREEDY,
        tools=tools,
        tool_choice={"type": "none"},
    )
    assert answer.content[0].type == "text" and answer.content[0].text
    alone = claude.messages.count_tokens(model="smollm2", messages=messages[:1]).input_tokens
    assert answer.usage.input_tokens > alone + 15  # the call and its result are in the prompt
    # a tool use streamed: one tool_use block with its JSON in an input_json_delta
    with claude.messages.stream(
        model="smollm2",
        messages=messages[:1],
        max_tokens=60,
        extra_body=GREEDY,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        final = stream.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert streamed.input == use.input and final.stop_reason == "tool_use"


ANTHROPIC_MALFORMED = [
    ("not json", "{messages: ["),
    ("no max_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
    ("bad role", {"max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}),
    ("empty messages", {"max_tokens": 5, "messages": []}),
    ("image block", {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
    ("temperature 1.5", {"max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}),
    ("tool choice unnamed", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                             "tools": [{"name": "f"}], "tool_choice": {"type": "tool"}}),
    ("auto tools on SmolLM2", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                               "tools": [{"name": "f"}]}),
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
        model="smollm2", instructions=SYSTEM, input=QUESTION, max_output_tokens=24, temperature=0
    )
    assert done.object == "response" and done.status in ("completed", "incomplete")
    assert "Paris" in done.output_text and done.store is False
    assert done.usage.input_tokens > 10 and done.usage.output_tokens > 0

    events = list(
        openai.responses.create(
            model="smollm2",
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
        model="smollm2",
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
        model="smollm2",
        input="What is the weather in Paris?",
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        temperature=0,
    )
    call = next(item for item in first.output if item.type == "function_call")
    validate(json.loads(call.arguments), WEATHER)
    follow = openai.responses.create(
        model="smollm2",
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"},
        ],
        tools=tools,
        tool_choice="none",
        max_output_tokens=30,
        temperature=0,
    )
    alone = openai.responses.create(model="smollm2", input="What is the weather in Paris?", max_output_tokens=1)
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
