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

TEMPLATES = Path(__file__).parent / "data" / "templates"


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
