"""Thinking and tool calls through the other protocols: a tiny GGUF with Qwen3's real chat template, and
a GBNF grammar whose only sentence is the reply (tests/chat/test_families.py), so real llama.cpp writes
reasoning and Hermes tool calls that the family parser reads; each protocol must carry them."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.chat.test_families import CASES, PARIS, ROME, WEATHER_TOOL, literal_grammar, tiny
from tests.fakes.servehelp import Server

pytestmark = [pytest.mark.slow, pytest.mark.needs_model]  # a server on a tiny GGUF

THINK = CASES["qwen3"]["think"]  # reasoning "The capital is Paris.", answer "Paris."
CALLS = CASES["qwen3"]["tools"]  # reasoning "Two cities.", then two get_weather calls (Paris, Rome)
QUESTION = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    path = tiny("qwen3", tmp_path_factory)
    home = tmp_path_factory.mktemp("families") / "home"
    with Server(path, home, "--ctx", "4096", "--parallel", "1") as srv:
        srv.model = path.stem
        yield srv


def test_anthropic_thinking_blocks_and_tool_use(server: Server) -> None:
    from anthropic import Anthropic

    claude = Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)
    think = {"grammar": literal_grammar(THINK), "temperature": 0}
    reply = claude.messages.create(model=server.model, max_tokens=200, messages=QUESTION, extra_body=think)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in reply.content] == [
        ("thinking", "The capital is Paris."),
        ("text", "Paris."),
    ]
    with claude.messages.stream(model=server.model, max_tokens=200, messages=QUESTION, extra_body=think) as s:
        kinds = [e.delta.type for e in s if e.type == "content_block_delta"]
        final = s.get_final_message()
    assert "thinking_delta" in kinds and "text_delta" in kinds
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == "Paris."

    tool = WEATHER_TOOL["function"]
    tools = [{"name": tool["name"], "description": tool["description"], "input_schema": tool["parameters"]}]
    calls = {"grammar": literal_grammar(CALLS), "temperature": 0}
    for stream in (False, True):
        if stream:
            with claude.messages.stream(
                model=server.model, max_tokens=300, messages=QUESTION, tools=tools, extra_body=calls
            ) as s:
                reply = s.get_final_message()
        else:
            reply = claude.messages.create(
                model=server.model, max_tokens=300, messages=QUESTION, tools=tools, extra_body=calls
            )
        uses = [b for b in reply.content if b.type == "tool_use"]
        assert [(u.name, u.input) for u in uses] == [("get_weather", PARIS), ("get_weather", ROME)]
        assert reply.stop_reason == "tool_use" and reply.content[0].type == "thinking"


def test_responses_reasoning_items_and_function_calls(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    think = {"grammar": literal_grammar(THINK)}
    done = client.responses.create(
        model=server.model, input="Capital of France?", temperature=0, extra_body=think
    )
    assert [item.type for item in done.output] == ["reasoning", "message"]
    assert done.output[0].content[0].text == "The capital is Paris." and done.output_text == "Paris."
    events = list(
        client.responses.create(
            model=server.model, input="Capital of France?", temperature=0, extra_body=think, stream=True
        )
    )
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (reasoning, answer) == ("The capital is Paris.", "Paris.")
    assert [i.type for i in events[-1].response.output] == ["reasoning", "message"]

    tool = {"type": "function", **WEATHER_TOOL["function"]}
    calls = client.responses.create(
        model=server.model,
        input="Weather in Paris and Rome?",
        tools=[tool],
        temperature=0,
        extra_body={"grammar": literal_grammar(CALLS)},
    )
    found = [(i.name, json.loads(i.arguments)) for i in calls.output if i.type == "function_call"]
    assert found == [("get_weather", PARIS), ("get_weather", ROME)]


def test_ollama_thinking_and_tool_calls(server: Server) -> None:
    def chat(body: dict) -> list[dict]:
        response = httpx.post(f"{server.url}/api/chat", json={"model": server.model, **body}, timeout=120)
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines() if line]

    think = {"messages": QUESTION, "grammar": literal_grammar(THINK), "options": {"temperature": 0}}
    (whole,) = chat({**think, "stream": False})
    assert (whole["message"]["thinking"], whole["message"]["content"]) == ("The capital is Paris.", "Paris.")
    lines = chat(think)
    thinking = "".join(line["message"].get("thinking", "") for line in lines)
    content = "".join(line["message"]["content"] for line in lines)
    assert (thinking, content) == ("The capital is Paris.", "Paris.") and lines[-1]["done"]

    tools = {"messages": QUESTION, "tools": [WEATHER_TOOL], "grammar": literal_grammar(CALLS)}
    for stream in (False, True):
        lines = chat({**tools, "stream": stream})
        calls = [c for line in lines for c in line["message"].get("tool_calls", [])]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
            ("get_weather", PARIS),
            ("get_weather", ROME),
        ]


def test_think_switch_through_each_protocol(server: Server) -> None:
    """think: false (Ollama) and thinking disabled (Anthropic) reach the template's own switch."""
    answer = {"grammar": literal_grammar("Paris.")}
    on = httpx.post(f"{server.url}/v1/messages/count_tokens", json={"messages": QUESTION}).json()
    off = httpx.post(
        f"{server.url}/v1/messages/count_tokens",
        json={"messages": QUESTION, "thinking": {"type": "disabled"}},
    ).json()
    assert off["input_tokens"] != on["input_tokens"]  # enable_thinking=false renders a different prompt
    body = {"model": server.model, "messages": QUESTION, "think": False, "stream": False, **answer}
    done = httpx.post(f"{server.url}/api/chat", json=body, timeout=120).json()
    assert done["message"]["content"] == "Paris." and "thinking" not in done["message"]
