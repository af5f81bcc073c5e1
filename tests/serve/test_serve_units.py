"""Pieces of `selfhost serve` that need no running server: tool-call parsing, tool templates, CLI errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from selfhost.chat.families import FAMILIES, forced_call_parser
from selfhost.runtime.template import ChatTemplate
from selfhost.serve.schemas import FunctionDef, Tool
from selfhost.serve.service import _complete
from tests.conftest import REPO

HERMES = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
)


def _parse(text: str):  # noqa: ANN202
    parser = FAMILIES["hermes"].parser("")
    parser.feed(text)
    parser.finish()
    return parser.result()


def test_auto_mode_reads_hermes_tool_call_blocks() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reply = _parse(text)
    calls = reply.tool_calls
    assert calls is not None and len(calls) == 1 and reply.content == "Let me check."
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert _parse("No tools needed: it is sunny.").tool_calls is None
    bad = _parse("<tool_call>{not json}</tool_call>")
    assert bad.tool_calls is None and bad.content == "{not json}"  # not a call: the text stands
    two = _parse('<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b", "arguments": {}}').tool_calls
    assert [c["function"]["name"] for c in two] == ["a", "b"]  # the last block may be cut at max_tokens
    assert two[0]["function"]["arguments"] == "{}"


def _forced(name: str | None, text: str):  # noqa: ANN202
    parser = forced_call_parser(FAMILIES["hermes"], name)
    chunks = parser.feed(text[:5]) + parser.feed(text[5:]) + parser.finish()
    assert chunks[0].id is not None  # streamed as a call: id and name first
    return parser.result().tool_calls


def test_named_and_required_modes_take_the_whole_reply() -> None:
    named = _forced("f", ' {"x": 1} ')
    assert named[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    required = _forced(None, '{"name": "g", "arguments": {"y": 2}}')
    assert required[0]["function"] == {"name": "g", "arguments": '{"y": 2}'}
    assert not _complete(_forced(None, '{"name": "g", "arguments": {"y"'))  # cut short: no call invented


def test_templates_that_know_tools_render_them() -> None:
    template = ChatTemplate(HERMES)
    assert template.supports_tools
    tools = [Tool(function=FunctionDef(name="get_weather")).model_dump()]
    prompt = template.render([{"role": "user", "content": "hi"}], tools=tools)
    assert prompt.startswith("<tools>get_weather;</tools>") and prompt.endswith("<|assistant|>")
    assert not ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}").supports_tools


def test_busy_port_is_one_clear_line_and_open_host_warns(tiny_gguf) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "selfhost",
                "serve",
                str(tiny_gguf),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2  # a usage error
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    warned = subprocess.run(
        [sys.executable, "-m", "selfhost", "serve", "no-such-model-x", "--host", "0.0.0.0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "without --api-key" in warned.stderr and warned.returncode != 0
    assert "Traceback" not in warned.stderr


def test_default_slots_give_each_a_useful_context_within_memory() -> None:
    from selfhost.runtime.gguf_info import GGUFInfo
    from selfhost.runtime.memory import default_context, default_slots, kv_bytes_per_token

    info = GGUFInfo(
        path="x.gguf", size=100 * 2**20, version=3, architecture="llama", n_tensors=1, n_params=1,
        tensor_types={}, n_layers=32, embedding_length=4096, context_length=32768,
    )  # fmt: skip
    per_token = kv_bytes_per_token(info)  # 512 KiB
    plenty = info.size + 2 * 4 * 8192 * per_token
    assert default_slots(info, plenty) == 4 and default_context(info, plenty, slots=4) == 8192
    tight = info.size + 2 * 2 * 2048 * per_token  # room for two 2048-token slots, not three
    assert default_slots(info, tight) == 2 and default_context(info, tight, slots=2) == 2048
    assert default_slots(info, info.size) == 1  # no memory to spare: one slot
    short = info.model_copy(update={"context_length": 512})
    assert default_slots(short, info.size + 2 * 4 * 512 * per_token) == 4  # its whole trained context


def test_chat_page_url_from_the_api_url() -> None:
    from selfhost.cli.serve import page_url

    assert page_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/"
    assert page_url("http://0.0.0.0:8080/v1") == "http://127.0.0.1:8080/"  # opened on this machine
    assert page_url("http://[::]:9000/v1") == "http://[::1]:9000/"
