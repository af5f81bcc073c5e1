"""Thinking models and tool calls per template family (selfhost/chat/families.py).

The real chat templates of each family (tests/data/templates/, sources in its README) go into tiny
random GGUFs; a GBNF grammar whose only sentence is the wanted reply makes real llama.cpp emit
exactly that text, token by token, through the real engine, chat session, CLI and server. The
parsers are also fed every cut of each reply and must read the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfhost.chat.families import FAMILIES, Family, detect_family
from selfhost.chat.messages import ReasoningChunk, TextChunk, ToolCallChunk
from selfhost.errors import UsageError
from selfhost.runtime.template import ChatTemplate
from tests.conftest import DATA

TEMPLATES = DATA / "templates"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def literal_grammar(text: str) -> str:
    """GBNF whose only sentence is `text`."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'root ::= "{escaped}"'


# family template -> replies (reasoning and/or two parallel tool calls) as the model writes them
PARIS = {"city": "Paris"}
ROME = {"city": "Rome"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def hermes_calls(think: str = "") -> str:
    calls = "\n".join(
        f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(c)}}}\n</tool_call>'
        for c in (PARIS, ROME)
    )
    return think + calls


DS_SEP = "<｜tool▁sep｜>"
CASES: dict[str, dict[str, str]] = {
    # name: template file, reply with reasoning (reasoning "The capital is Paris.", answer "Paris."),
    # reply with two calls (reasoning, if any, "Two cities.")
    "qwen3": {
        "template": "Qwen-Qwen3-0.6B",
        "think": "<think>\nThe capital is Paris.\n</think>\n\nParis.",
        "tools": hermes_calls("<think>\nTwo cities.\n</think>\n\n"),
    },
    "deepseek-r1": {  # the prompt opens <think>: the reply starts inside it
        "template": "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        "think": "The capital is Paris.\n</think>\n\nParis.",
        "tools": "Two cities.\n</think>\n\n<｜tool▁calls▁begin｜>"
        + "\n".join(
            f"<｜tool▁call▁begin｜>function{DS_SEP}get_weather\n```json\n{json.dumps(c)}\n```<｜tool▁call▁end｜>"
            for c in (PARIS, ROME)
        )
        + "<｜tool▁calls▁end｜>",
    },
    "smollm3": {
        "template": "HuggingFaceTB-SmolLM3-3B",
        "think": "<think>\nThe capital is Paris.\n</think>\nParis.",
    },
    "gpt-oss": {
        "template": "openai-gpt-oss-120b",
        "think": "<|channel|>analysis<|message|>The capital is Paris.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.",
        "tools": "<|channel|>analysis<|message|>Two cities.<|end|>"
        + "".join(
            "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
            f"<|message|>{json.dumps(c)}<|call|>"
            for c in (PARIS, ROME)
        ),
    },
    "llama3.2": {
        "template": "meta-llama-Llama-3.2-3B-Instruct",
        "tools": "\n".join(
            f'{{"name": "get_weather", "parameters": {json.dumps(c)}}}' for c in (PARIS, ROME)
        ),
    },
    "llama3.1": {
        "template": "meta-llama-Llama-3.1-8B-Instruct",
        "tools": "\n".join(
            f'<|python_tag|>{{"name": "get_weather", "parameters": {json.dumps(c)}}}' for c in (PARIS, ROME)
        ),
    },
    "mistral-nemo": {
        "template": "mistralai-Mistral-Nemo-Instruct-2407",
        "tools": "[TOOL_CALLS]["
        + ", ".join(f'{{"name": "get_weather", "arguments": {json.dumps(c)}}}' for c in (PARIS, ROME))
        + "]",
    },
    "mistral-small-3.2": {
        "template": "Mistral-Small-3.2-24B-Instruct-2506",
        "tools": "".join(f"[TOOL_CALLS]get_weather[ARGS]{json.dumps(c)}" for c in (PARIS, ROME)),
    },
    "qwen3-coder": {
        "template": "Qwen3-Coder",
        "tools": "\n".join(
            f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{c['city']}\n</parameter>\n</function>\n"
            "</tool_call>"
            for c in (PARIS, ROME)
        ),
    },
    "qwen2.5": {"template": "Qwen-Qwen2.5-7B-Instruct", "tools": hermes_calls()},
    "granite-4": {"template": "ibm-granite-granite-4.0", "tools": hermes_calls()},
    "phi-4-mini": {  # the closing marker is often missing, and calls may come without a list
        "template": "microsoft-Phi-4-mini-instruct",
        "tools": "<|tool_call|>"
        + ", ".join(f'{{"name": "get_weather", "arguments": {json.dumps(c)}}}' for c in (PARIS, ROME)),
    },
    "granite-3.3": {
        "template": "ibm-granite-granite-3.3-2B-Instruct",
        "tools": "<|tool_call|>["
        + ", ".join(f'{{"name": "get_weather", "arguments": {json.dumps(c)}}}' for c in (PARIS, ROME))
        + "]",
    },
}
THINKING = [name for name, case in CASES.items() if "think" in case]
TOOLS = [name for name, case in CASES.items() if "tools" in case]


def family_of(name: str) -> Family:
    return detect_family(template(CASES[name]["template"]))


def prompt_of(name: str, **extra: object) -> str:
    family = family_of(name)
    vars_ = {**family.template_vars(), **extra}
    return ChatTemplate(template(CASES[name]["template"]), bos_token="<s>").render(
        [{"role": "user", "content": "Weather in Paris and Rome?"}], extra=vars_
    )


def read_all(family: Family, prompt: str, pieces: list[str]) -> tuple[list, object]:
    parser = family.parser(prompt)
    chunks = [c for piece in pieces for c in parser.feed(piece)] + parser.finish()
    return chunks, parser.result()


def stable(result) -> tuple:  # noqa: ANN001
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in result.tool_calls or []]
    return result.content, result.reasoning, calls


def check_stream(chunks: list, result) -> None:  # noqa: ANN001
    """Chunks add up to the result; each call: id and name first, then argument fragments."""
    assert "".join(c.text for c in chunks if isinstance(c, TextChunk)) == result.content
    reasoning = "".join(c.text for c in chunks if isinstance(c, ReasoningChunk))
    assert reasoning == (result.reasoning or "")
    calls = [c for c in chunks if isinstance(c, ToolCallChunk)]
    for i, call in enumerate(result.tool_calls or []):
        mine = [c for c in calls if c.index == i]
        assert mine[0].id == call["id"] and mine[0].name == call["function"]["name"] and not mine[0].arguments
        assert all(c.id is None and c.name is None for c in mine[1:])
        assert "".join(c.arguments for c in mine) == call["function"]["arguments"]


# ------------------------------------------------------------------------------------ parsers
@pytest.mark.parametrize(
    ("name", "kind"), [(n, "think") for n in THINKING] + [(n, "tools") for n in TOOLS]
)
def test_every_cut_of_a_reply_reads_the_same(name: str, kind: str) -> None:
    family, reply = family_of(name), CASES[name][kind]
    prompt = prompt_of(name)
    whole_chunks, whole = read_all(family, prompt, [reply])
    check_stream(whole_chunks, whole)
    expected = stable(whole)
    if kind == "think":
        assert expected == ("Paris.", "The capital is Paris.", [])
    else:
        assert [(n, json.loads(a)) for n, a in expected[2]] == [("get_weather", PARIS), ("get_weather", ROME)]
        assert expected[0] == "" and expected[1] in (None, "Two cities.")
    for cut in range(1, len(reply)):
        chunks, result = read_all(family, prompt, [reply[:cut], reply[cut:]])
        assert stable(result) == expected, f"cut at {cut}: {reply[:cut]!r}"
        check_stream(chunks, result)
    chunks, result = read_all(family, prompt, list(reply))  # one character at a time
    assert stable(result) == expected
    check_stream(chunks, result)


def test_qwen3_coder_parameters_follow_the_tool_schema() -> None:
    reply = (
        "<tool_call>\n<function=f>\n<parameter=code>\n123\n</parameter>\n"
        "<parameter=n>\n7\n</parameter>\n</function>"
    )
    tool = {"name": "f", "parameters": {"properties": {"code": {"type": "string"}, "n": {"type": "integer"}}}}
    parser = FAMILIES["qwen3-coder"].parser("", tools=[{"type": "function", "function": tool}])
    parser.feed(reply)
    parser.finish()
    assert json.loads(parser.result().tool_calls[0]["function"]["arguments"]) == {"code": "123", "n": 7}


def test_without_tools_offered_call_like_text_stays_text() -> None:
    reply = '{"name": "Ada", "parameters": {"age": 36}}'
    parser = FAMILIES["llama3"].parser("", calls=False)  # a chat with no tools: JSON is the answer
    parser.feed(reply)
    parser.finish()
    assert parser.result().content == reply and parser.result().tool_calls is None


def test_families_are_detected_from_the_template_not_the_name() -> None:
    expect = {
        "Qwen-Qwen3-0.6B": ("hermes", True, "enable_thinking", "hermes"),
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("deepseek-r1", True, "enable_thinking", "deepseek-r1"),
        "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("deepseek-r1", True, None, "deepseek-r1"),
        "HuggingFaceTB-SmolLM3-3B": ("think", True, "enable_thinking", None),
        "openai-gpt-oss-120b": ("gpt-oss", True, "reasoning_effort", "harmony"),
        "meta-llama-Llama-3.1-8B-Instruct": ("llama3", False, None, "llama3"),
        "meta-llama-Llama-3.2-3B-Instruct": ("llama3", False, None, "llama3"),
        "mistralai-Mistral-Nemo-Instruct-2407": ("mistral", False, None, "mistral"),
        "Mistral-Small-3.2-24B-Instruct-2506": ("mistral-args", False, None, "mistral-args"),
        "Qwen3-Coder": ("qwen3-coder", False, None, "qwen3-coder"),
        "Qwen-Qwen2.5-7B-Instruct": ("hermes", False, None, "hermes"),
        "ibm-granite-granite-4.0": ("hermes", False, None, "hermes"),
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("hermes", False, None, "hermes"),
        "google-gemma-2-2b-it": ("plain", False, None, None),
        "microsoft-Phi-4-mini-instruct": ("phi4-mini", False, None, "phi4-mini"),
    }
    for file, (name, reasons, switch, tools) in expect.items():
        family = detect_family(template(file))
        got = (family.name, family.reasons, family.switch, family.tools.name if family.tools else None)
        assert got == (name, reasons, switch, tools), file
    assert detect_family(None, "gpt-oss").harmony  # the architecture alone says harmony
    assert detect_family(None).name == "plain"


# ------------------------------------------------------------------------------- think switch
def test_think_switch_renders_as_the_templates_own_switch() -> None:
    user = [{"role": "user", "content": "hi"}]
    qwen = ChatTemplate(template("Qwen-Qwen3-0.6B"))
    family = detect_family(qwen.source)
    off = qwen.render(user, extra=family.template_vars(think=False))
    assert off == qwen.render(user, extra={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = qwen.render(user, extra=family.template_vars(think=True))
    assert on.endswith("<|im_start|>assistant\n") and on == qwen.render(user)
    assert family.template_vars(effort="none") == {"enable_thinking": False}

    smol = ChatTemplate(template("HuggingFaceTB-SmolLM3-3B"))
    off = smol.render(user, extra=detect_family(smol.source).template_vars(think=False))
    assert "Reasoning Mode: /no_think" in off and off.endswith("<think>\n\n</think>\n")

    ds = ChatTemplate(template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"))
    ds_family = detect_family(ds.source)
    assert ds.render(user, extra=ds_family.template_vars()).endswith("<think>\n")  # reply starts inside
    assert ds.render(user, extra=ds_family.template_vars(think=False)).endswith("<think>\n</think>")

    oss = ChatTemplate(template("openai-gpt-oss-120b"))
    oss_family = detect_family(oss.source)
    assert "Reasoning: low" in oss.render(user, extra=oss_family.template_vars(effort="low"))
    assert "Reasoning: medium" in oss.render(user, extra=oss_family.template_vars())
    with pytest.raises(UsageError, match="always reason"):
        oss_family.template_vars(think=False)
    # no switch in the template: refused, never ignored
    with pytest.raises(UsageError, match="no switch"):
        detect_family(template("deepseek-ai-DeepSeek-R1-Distill-Llama-8B")).template_vars(think=False)
    with pytest.raises(UsageError, match="does not think"):
        FAMILIES["llama3"].template_vars(think=True)


# ------------------------------------------------------------------- real engine, session, CLI
_GGUFS: dict[str, Path] = {}


def tiny(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GGUF carrying the family's real chat template (byte vocabulary: any text)."""
    from tests.fakes.tinygguf import write_tiny_llama

    if name not in _GGUFS:
        folder = tmp_path_factory.mktemp(f"family-{name}")
        _GGUFS[name] = write_tiny_llama(
            folder / f"{name}.gguf", chat_template=template(CASES[name]["template"]), n_ctx=4096
        )
    return _GGUFS[name]


def grammar_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "reply.gbnf"
    path.write_text(literal_grammar(text))
    return str(path)


@pytest.mark.needs_model
@pytest.mark.parametrize("name", THINKING)
def test_session_streams_reasoning_apart_and_the_history_keeps_it(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from selfhost.chat.history import ChatLog, HistoryStore
    from selfhost.chat.messages import Message
    from selfhost.chat.session import ChatSession, Sampling

    store = HistoryStore(tmp_path / "history.db")
    session = ChatSession.load(
        tiny(name, tmp_path_factory),
        ctx=2048,
        threads=1,
        sampling=Sampling(temperature=0),
        grammar=literal_grammar(CASES[name]["think"]),
        log=ChatLog(store),
    )
    try:
        chunks = list(session.chat("Capital of France?"))
        kinds = [type(c).__name__ for c in chunks if isinstance(c, ReasoningChunk | TextChunk)]
        assert kinds.index("TextChunk") > kinds.index("ReasoningChunk")  # thinking streams first
        assert "TextChunk" not in kinds[: kinds.index("TextChunk")]
        reasoning = "".join(c.text for c in chunks if isinstance(c, ReasoningChunk))
        answer = "".join(c.text for c in chunks if isinstance(c, TextChunk))
        assert (reasoning, answer) == ("The capital is Paris.", "Paris.")
        done = chunks[-1]
        assert done.message.content == "Paris." and done.message.reasoning == "The capital is Paris."
        assert 0 < done.usage.reasoning_tokens < done.usage.generated_tokens
        stored = store.get(session.log.conversation_id).messages[-1]
        assert (stored.content, stored.reasoning) == ("Paris.", "The capital is Paris.")
        # the next turn goes back through the template, which drops the old reasoning
        following = session.render([*session.messages, Message(role="user", content="And Italy?")])
        assert "Paris." in following and "The capital is Paris." not in following
    finally:
        session.model.close()
        store.close()


@pytest.mark.needs_model
@pytest.mark.parametrize("name", THINKING)
def test_chat_one_shot_json_repl_and_history_keep_reasoning_apart(
    name: str, runner, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from selfhost.cli.app import app

    grammar = grammar_file(tmp_path, CASES[name]["think"])
    args = ["chat", str(tiny(name, tmp_path_factory)), "--grammar", grammar, "-t", "0", "--threads", "1"]
    result = runner.invoke(app, [*args, "--ctx", "2048", "-p", "Capital of France?", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["reply"], payload["reasoning"]) == ("Paris.", "The capital is Paris.")
    from selfhost.chat.history import HistoryStore

    stored = HistoryStore().get(payload["conversation_id"]).messages[-1]
    assert (stored.content, stored.reasoning) == ("Paris.", "The capital is Paris.")
    shown = runner.invoke(app, ["history", "show", str(payload["conversation_id"])])
    assert "> The capital is Paris.\n\nParis." in shown.stdout
    repl = runner.invoke(app, [*args, "--ctx", "2048", "--no-log"], input="Capital of France?\n/exit\n")
    assert repl.exit_code == 0, repl.output
    assert ">>> Paris." in repl.stdout and "The capital is Paris." not in repl.stdout
    assert "The capital is Paris." in repl.stderr  # thinking streams apart, on stderr


@pytest.mark.needs_model
def test_chat_one_shot_json_and_repl_show_thinking_apart(
    runner, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from selfhost.cli.app import app

    path = str(tiny("qwen3", tmp_path_factory))
    grammar = grammar_file(tmp_path, CASES["qwen3"]["think"])
    base = ["chat", path, "--grammar", grammar, "-t", "0", "--threads", "1", "--ctx", "2048"]
    as_json = runner.invoke(app, [*base, "-p", "Capital of France?", "--json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert (payload["reply"], payload["reasoning"]) == ("Paris.", "The capital is Paris.")
    assert payload["usage"]["reasoning_tokens"] > 0

    shown = runner.invoke(app, [*base, "-p", "Capital of France?"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.strip() == "Paris." and "The capital is Paris." in shown.stderr  # apart, on stderr
    hidden = runner.invoke(app, [*base, "-p", "Capital of France?", "--hide-thinking"])
    assert hidden.stdout.strip() == "Paris." and "The capital is Paris." not in hidden.stderr

    repl = runner.invoke(app, [*base, "--no-log"], input="Capital of France?\n/think off\n/think\n/exit\n")
    assert repl.exit_code == 0, repl.output
    assert "Paris." in repl.stdout and "The capital is Paris." in repl.stderr
    assert "thinking off" in repl.stdout and "thinking on" in repl.stdout
    refused = runner.invoke(
        app, ["chat", str(tiny("llama3.2", tmp_path_factory)), "-p", "hi", "--think", "--threads", "1"]
    )
    assert refused.exit_code != 0 and "does not think" in refused.output and "Traceback" not in refused.output


# ------------------------------------------------------------------------------- the server
def _extra(obj, key: str):  # noqa: ANN001, ANN202
    return (obj.model_extra or {}).get(key)


def _check_reasoning(client, name: str, case: dict[str, str]) -> None:  # noqa: ANN001
    body = {
        "model": name,
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "temperature": 0,
        "extra_body": {"grammar": literal_grammar(case["think"])},
    }
    done = client.chat.completions.create(**body)
    message = done.choices[0].message
    assert (message.content, _extra(message, "reasoning_content")) == ("Paris.", "The capital is Paris.")
    assert 0 < done.usage.completion_tokens_details.reasoning_tokens < done.usage.completion_tokens
    reasoning = content = ""
    for chunk in client.chat.completions.create(**body, stream=True):
        if chunk.choices:
            reasoning += _extra(chunk.choices[0].delta, "reasoning_content") or ""
            content += chunk.choices[0].delta.content or ""
    assert (reasoning, content) == ("The capital is Paris.", "Paris.")  # the stream adds up to the reply

    # the switch goes to the template's own control: a different prompt, and the answer alone
    switch = {"reasoning_effort": "low"} if "gpt-oss" in case["template"] else {"think": False}
    off = client.chat.completions.create(
        model=name,
        messages=body["messages"],
        temperature=0,
        extra_body={**switch, "grammar": literal_grammar("Paris.")},
    )
    message = off.choices[0].message
    assert message.content == "Paris." and not _extra(message, "reasoning_content")
    assert off.usage.prompt_tokens != done.usage.prompt_tokens


def _check_tools(client, name: str, case: dict[str, str]) -> None:  # noqa: ANN001
    import jsonschema

    user = {"role": "user", "content": "Weather in Paris and Rome?"}
    body = {
        "model": name,
        "messages": [user],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "temperature": 0,
        "extra_body": {"grammar": literal_grammar(case["tools"])},
    }
    done = client.chat.completions.create(**body)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", PARIS),
        ("get_weather", ROME),
    ]
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    assert len({c.id for c in calls}) == 2

    streamed: dict[int, dict] = {}
    first_delta_has_name = []
    for chunk in client.chat.completions.create(**body, stream=True):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = streamed.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if entry["id"] is None:
                first_delta_has_name.append(bool(tc.id and tc.function.name))
            entry["id"] = entry["id"] or tc.id
            entry["name"] = entry["name"] or tc.function.name
            entry["arguments"] += tc.function.arguments or ""
    assert all(first_delta_has_name)
    assert [(e["name"], e["arguments"]) for e in streamed.values()] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    one = client.chat.completions.create(**body, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.arguments for c in one] == [calls[0].function.arguments]
    one_streamed = {
        tc.index
        for chunk in client.chat.completions.create(**body, parallel_tool_calls=False, stream=True)
        for tc in ((chunk.choices[0].delta.tool_calls or []) if chunk.choices else [])
    }
    assert one_streamed == {0}

    _check_parse_and_forced(client, name, user, case)
    _check_results_answered(client, name, user, calls, done.usage.prompt_tokens)


def _check_parse_and_forced(client, name: str, user: dict, case: dict[str, str]) -> None:  # noqa: ANN001
    import jsonschema
    from openai import pydantic_function_tool
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        city: str

    parsed = client.chat.completions.parse(
        model=name,
        messages=[user],
        tools=[pydantic_function_tool(GetWeather, name="get_weather")],
        temperature=0,
        extra_body={"grammar": literal_grammar(case["tools"])},
    )
    cities = [c.function.parsed_arguments.city for c in parsed.choices[0].message.tool_calls]
    assert cities == ["Paris", "Rome"]

    # a forced call (named) keeps the grammar over the tool's schema and streams as a call too
    unit_tool = {
        "type": "function",
        "function": {
            "name": "set_unit",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["unit"],
                "additionalProperties": False,
            },
        },
    }
    forced = {
        "model": name,
        "messages": [user],
        "tools": [WEATHER_TOOL, unit_tool],
        "tool_choice": {"type": "function", "function": {"name": "set_unit"}},
        "temperature": 0,
        "max_tokens": 40,
    }
    whole = client.chat.completions.create(**forced).choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(whole.function.arguments), unit_tool["function"]["parameters"])
    pieces = [
        tc
        for chunk in client.chat.completions.create(**forced, stream=True)
        for tc in ((chunk.choices[0].delta.tool_calls or []) if chunk.choices else [])
    ]
    assert pieces[0].id and pieces[0].function.name == "set_unit" and len(pieces) >= 2
    assert "".join(p.function.arguments or "" for p in pieces) == whole.function.arguments
    if name.startswith("mistral"):
        assert len(whole.id) == 9 and whole.id.isalnum()  # what Mistral's templates accept back



def _check_results_answered(client, name: str, user: dict, calls: list, prompt_tokens: int) -> None:  # noqa: ANN001
    """The results go back through the template (Llama 3.x templates take one call per turn)."""
    kept = calls[:1] if name.startswith("llama") else calls
    answer_text = "It is sunny in Paris."
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": c.function.model_dump(include={"name", "arguments"})}
            for c in kept
        ],
    }
    results = [{"role": "tool", "tool_call_id": c.id, "content": f"sunny in {c.function.name}"} for c in kept]
    answer = client.chat.completions.create(
        model=name,
        messages=[user, assistant, *results],
        tools=[WEATHER_TOOL],
        temperature=0,
        extra_body={"grammar": literal_grammar(answer_text)},
    )
    assert answer.choices[0].message.content == answer_text and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens > prompt_tokens + len("sunny in get_weather")


@pytest.mark.needs_model
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if n != "granite-3.3"])
def test_server_separates_reasoning_and_reads_tool_calls(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from openai import BadRequestError, OpenAI

    from tests.fakes.servehelp import Server

    model = tiny(name, tmp_path_factory)
    with Server(model, tmp_path / "home", "--ctx", "4096", "--parallel", "1") as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        if "think" in CASES[name]:
            _check_reasoning(client, name, CASES[name])
        if "tools" in CASES[name]:
            _check_tools(client, name, CASES[name])
        else:  # no tool format in the template: refused clearly
            with pytest.raises(BadRequestError) as refused:
                client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL]
                )
            assert refused.value.code == "tools_unsupported"
        with pytest.raises(BadRequestError, match="could not compile the grammar"):
            client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], extra_body={"grammar": "root ::= ("}
            )
        if "think" not in CASES[name]:  # no reasoning: a think switch is refused, never ignored
            with pytest.raises(BadRequestError, match="does not think"):
                client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "hi"}], extra_body={"think": True}
                )
    assert "Traceback" not in server.output()


@pytest.mark.needs_model
def test_phi4_mini_tools_ride_on_the_system_message(tmp_path_factory: pytest.TempPathFactory) -> None:
    from selfhost.chat.messages import Message
    from selfhost.chat.session import ChatSession

    path = tiny("phi-4-mini", tmp_path_factory)
    session = ChatSession.load(path, ctx=2048, threads=1, system="Be brief.")
    try:
        prompt = session.render([Message(role="user", content="Weather?")], tools=[WEATHER_TOOL])
        listed = json.dumps([WEATHER_TOOL["function"]])
        expected = f"<|system|>Be brief.<|tool|>{listed}<|/tool|><|end|><|user|>Weather?<|end|><|assistant|>"
        assert prompt == expected
    finally:
        session.model.close()


@pytest.mark.needs_model
def test_control_tokens_reach_the_parser_as_text(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Markers such as gpt-oss's <|channel|> or Llama's <|python_tag|> are control tokens: a job of a
    family with markup renders them (Job.special); a plain model's reply never shows them."""
    from selfhost.chat.model import ChatModel

    model = ChatModel.load(tiny("gpt-oss", tmp_path_factory), ctx=256, threads=1)
    try:
        assert model.family.harmony and model.family.special
        control = model.engine.tokenize("<|im_start|>", add_bos=False, special=True)
        assert len(control) == 1  # one control token in the tiny vocabulary
        assert model.engine.piece(control[0], special=True) == b"<|im_start|>"
        assert model.engine.piece(control[0]) == b""
    finally:
        model.close()
