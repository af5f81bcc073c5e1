"""Model families: how a chat template's replies carry reasoning and tool calls.

A model's family is detected once, when it loads, from its GGUF chat template (and architecture),
never from its file name (`detect_family`). The family says

- how the reply separates reasoning from the answer (`<think>...</think>`, gpt-oss harmony channels),
  and whether the prompt already opened the think block (DeepSeek-R1: the reply starts inside it);
- which template variable is its think switch (`enable_thinking`, harmony's `reasoning_effort`),
  or that it has none (`template_vars` refuses a switch that does not exist);
- its tool-call format (Hermes/Qwen `<tool_call>` JSON, Qwen3-Coder XML, Llama 3.x JSON and
  `<|python_tag|>`, Mistral `[TOOL_CALLS]`, DeepSeek-R1, harmony `to=functions.NAME`, Granite 3,
  Phi-4-mini), or none (the server answers 400 `tools_unsupported`).

`Family.parser(prompt)` makes the one incremental parser of a reply: `feed(text_delta)` returns typed
chunks (`ReasoningChunk`, `TextChunk`, `ToolCallChunk`: id and name first, then argument fragments),
`finish()` flushes what was held back, `result()` is the parsed reply. The stream's chunks always
concatenate to the result: the REPL, one-shot mode and the server all read replies through it.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from selfhost.chat.messages import ReasoningChunk, ReplyChunk, TextChunk, ToolCallChunk
from selfhost.errors import UsageError

EFFORTS = ("low", "medium", "high")


@dataclass(frozen=True)
class ToolFormat:
    """Where tool calls sit in a reply and how their body reads."""

    name: str
    start: tuple[str, ...]  # markers opening a call region
    end: str | None  # marker closing it (None: the body's own end: a closed JSON value)
    body: str  # json ({name, arguments}: one, array, sequence) | xml | mistral | deepseek
    kept: tuple[str, ...] = ()  # start markers that are the body's own first text (Llama's bare `{"name"`)
    drop: tuple[str, ...] = ()  # wrapper markers removed from the text (DeepSeek's calls begin/end)
    id_alnum9: bool = False  # Mistral's templates want ids of exactly 9 letters and digits
    example: str = ""  # how a call looks, told to the model when its template cannot list tools
    in_system: bool = False  # the tools go in the system message's `tools` field (Phi-4-mini)


@dataclass(frozen=True)
class Family:
    """One template family: reasoning markup, think switch, tool format."""

    name: str
    think: tuple[str, str] | None = None  # reasoning tags
    switch: str | None = None  # "enable_thinking" | "reasoning_effort" | None
    tools: ToolFormat | None = None
    harmony: bool = False  # gpt-oss channels instead of tags
    always_thinks: bool = False  # reasons with no way to turn it off (DeepSeek-R1 distills)

    @property
    def reasons(self) -> bool:
        return self.harmony or self.think is not None

    @property
    def special(self) -> bool:
        """Generated control tokens must reach the parser as text (its markers are such tokens)."""
        return self.reasons or self.tools is not None

    def template_vars(self, think: bool | None = None, effort: str | None = None) -> dict[str, Any]:
        """The template variables for a think switch / reasoning effort; refuses what has no switch."""
        if effort is not None and effort not in (*EFFORTS, "none", "minimal"):
            raise UsageError(f"reasoning effort '{effort}' is not one of low, medium, high, none")
        if self.switch == "reasoning_effort":
            if think is False or effort == "none":
                raise UsageError(
                    f"{self.name} models always reason and have no switch to turn it off",
                    hint="ask for reasoning_effort low instead",
                )
            return {"reasoning_effort": {"minimal": "low"}.get(effort or "", effort or "medium")}
        if effort is not None and think is None:
            think = effort != "none"
        if self.switch == "enable_thinking":
            return {"enable_thinking": think is not False}  # passed always: some templates default off
        if think is True and not self.reasons:
            raise UsageError(f"this model ({self.name} template) does not think before it answers")
        if think is False and self.always_thinks:
            raise UsageError(f"this model ({self.name} template) always thinks: its template has no switch")
        return {}

    def parser(
        self,
        prompt: str = "",
        *,
        plain: bool = False,
        calls: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> ReplyParser:
        """A parser for one reply to `prompt` (plain: the reply is text only, e.g. under a grammar;
        calls=False: no tools were offered, so text that looks like a call is text: Llama's `{"name"`;
        tools: the offered tools, whose schemas type Qwen3-Coder's XML parameters)."""
        tools_offered = tools or []
        tools = self.tools is not None and calls
        if plain or (not self.reasons and not tools):
            return PlainParser()
        if self.harmony:
            return HarmonyParser(self)
        in_think = self.think is not None and _opens_think(prompt, self.think)
        parser = TagParser(self, in_think=in_think, calls=tools)
        parser.strings = _string_params(tools_offered)
        return parser

    def call_id(self) -> str:
        if self.tools is not None and self.tools.id_alnum9:
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
        return f"call_{secrets.token_hex(12)}"


def forced_call_parser(family: Family, name: str | None) -> ReplyParser:
    """The parser of a reply a grammar forces into one call: the named function's arguments, or
    (name None: tool_choice "required") a {"name": ..., "arguments": ...} object. Streams like any call."""
    if name is not None:
        return NamedCallParser(name, family.call_id())
    parser = TagParser(Family(family.name, tools=ToolFormat("required", (), None, "json")), in_think=False)
    parser.mode, parser.region = "tool", _Region(0)
    parser.call_id = family.call_id  # the family's ids (Mistral's 9 characters)
    return parser


def _string_params(tools: list[dict[str, Any]]) -> frozenset[tuple[str, str]]:
    """(function, parameter) pairs whose schema type is string."""
    pairs = set()
    for tool in tools:
        fn = tool.get("function", tool)
        for name, prop in (fn.get("parameters") or {}).get("properties", {}).items():
            if isinstance(prop, dict) and prop.get("type") == "string":
                pairs.add((fn.get("name", ""), name))
    return frozenset(pairs)


def _opens_think(prompt: str, think: tuple[str, str]) -> bool:
    """Did the rendered prompt open a think block it did not close (the reply starts inside it)?"""
    tail = prompt.rstrip()
    return tail.endswith(think[0])


THINK = ("<think>", "</think>")
HERMES = ToolFormat("hermes", ("<tool_call>",), "</tool_call>", "json")
FAMILIES: dict[str, Family] = {
    "plain": Family("plain"),
    "gpt-oss": Family(
        "gpt-oss", switch="reasoning_effort", harmony=True, tools=ToolFormat("harmony", (), None, "")
    ),
    "qwen3-coder": Family(
        "qwen3-coder", tools=ToolFormat("qwen3-coder", ("<tool_call>",), "</tool_call>", "xml")
    ),
    "deepseek-r1": Family(
        "deepseek-r1",
        think=THINK,
        tools=ToolFormat(
            "deepseek-r1",
            ("<｜tool▁call▁begin｜>",),
            "<｜tool▁call▁end｜>",
            "deepseek",
            drop=("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
            example="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n"
            "ARGUMENTS\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ),
        always_thinks=True,
    ),
    "mistral": Family(
        "mistral", tools=ToolFormat("mistral", ("[TOOL_CALLS]",), None, "json", id_alnum9=True)
    ),
    "mistral-args": Family(
        "mistral-args", tools=ToolFormat("mistral-args", ("[TOOL_CALLS]",), None, "mistral", id_alnum9=True)
    ),
    "llama3": Family(
        "llama3", tools=ToolFormat("llama3", ("<|python_tag|>", '{"name"'), None, "json", kept=('{"name"',))
    ),
    "granite3": Family("granite3", tools=ToolFormat("granite3", ("<|tool_call|>",), None, "json")),
    "phi4-mini": Family(
        "phi4-mini",
        tools=ToolFormat("phi4-mini", ("<|tool_call|>",), "<|/tool_call|>", "json-seq", in_system=True),
    ),
    "hermes": Family("hermes", tools=HERMES),
}


def detect_family(template: str | None, architecture: str | None = None) -> Family:
    """The family of a model, from its chat template's own markup (and its GGUF architecture)."""
    src = template or ""
    base = _tool_family(src, architecture)
    if base.harmony or base.name == "deepseek-r1":
        return _with_switch(base, src)
    think = THINK if "<think>" in src or "</think>" in src else None
    if think is None:
        return _with_switch(base, src) if "enable_thinking" in src else base
    name = base.name if base.name != "plain" else "think"
    family = Family(name, think=think, tools=base.tools)
    return _with_switch(family, src)


def _tool_family(src: str, architecture: str | None) -> Family:
    if "<|channel|>" in src or architecture == "gpt-oss":
        return FAMILIES["gpt-oss"]
    if "<function=" in src and "<parameter=" in src:
        return FAMILIES["qwen3-coder"]
    if "tool▁calls▁begin" in src or "<｜Assistant｜>" in src:
        return FAMILIES["deepseek-r1"]
    if "[TOOL_CALLS]" in src:
        return FAMILIES["mistral-args" if "[ARGS]" in src else "mistral"]
    if "<|tool_call|>" in src or "<|/tool|>" in src:
        return FAMILIES["phi4-mini" if "<|/tool_call|>" in src or "<|/tool|>" in src else "granite3"]
    if "<tool_call>" in src:
        return FAMILIES["hermes"]
    if "<|start_header_id|>" in src and "tools" in src:
        return FAMILIES["llama3"]
    return FAMILIES["plain"]


def _with_switch(family: Family, src: str) -> Family:
    if family.harmony:
        return family
    if "enable_thinking" in src:
        return Family(family.name, think=family.think or THINK, switch="enable_thinking", tools=family.tools)
    return family


# --------------------------------------------------------------------------- parsers
@dataclass
class ParsedReply:
    content: str
    reasoning: str | None
    tool_calls: list[dict[str, Any]] | None  # OpenAI's shape; arguments: the JSON text


class ReplyParser:
    """Incremental: feed text deltas, get typed chunks; `result()` is what the chunks add up to."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[dict[str, Any]] = []
        self._finished = False

    def feed(self, text: str) -> list[ReplyChunk]:
        return self._collect(self._feed(text)) if text else []

    def finish(self) -> list[ReplyChunk]:
        """Flush what was held back (once; later calls return nothing)."""
        if self._finished:
            return []
        self._finished = True
        return self._collect(self._finish())

    def result(self) -> ParsedReply:
        reasoning = "".join(self._reasoning)
        return ParsedReply("".join(self._content), reasoning or None, self._calls or None)

    def _collect(self, chunks: list[ReplyChunk]) -> list[ReplyChunk]:
        for c in chunks:
            if isinstance(c, TextChunk):
                self._content.append(c.text)
            elif isinstance(c, ReasoningChunk):
                self._reasoning.append(c.text)
            elif c.id is not None:
                self._calls.append(
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                )
            else:
                self._calls[c.index]["function"]["arguments"] += c.arguments
        return chunks

    def _feed(self, text: str) -> list[ReplyChunk]:
        raise NotImplementedError

    def _finish(self) -> list[ReplyChunk]:
        return []


class NamedCallParser(ReplyParser):
    """The whole reply is the arguments of one named call (tool_choice naming a function)."""

    def __init__(self, name: str, call_id: str) -> None:
        super().__init__()
        self.name, self.id = name, call_id
        self.section = _Section()

    def _feed(self, text: str) -> list[ReplyChunk]:
        kept = self.section.text(text)
        if not kept:
            return []
        out: list[ReplyChunk] = []
        if not self._calls:
            out.append(ToolCallChunk(index=0, id=self.id, name=self.name))
        out.append(ToolCallChunk(index=0, arguments=kept))
        return out


class PlainParser(ReplyParser):
    """Replies with no markup: every delta is content."""

    def _feed(self, text: str) -> list[ReplyChunk]:
        return [TextChunk(text=text)]


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if m.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class _Section:
    """Whitespace rules of one reasoning/content section: no leading, no trailing whitespace."""

    fresh: bool = True
    pending: str = ""

    def text(self, s: str) -> str:
        if self.fresh:
            s = s.lstrip()
            if not s:
                return ""
            self.fresh = False
        body = self.pending + s
        kept = body.rstrip()
        self.pending = body[len(kept) :]
        return kept

    def close(self) -> None:
        self.fresh, self.pending = True, ""


@dataclass
class _Region:
    """One tool-call region: its text and, per call found in it, what was sent."""

    base: int
    text: str = ""
    started: list[bool] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)


class SteppingParser(ReplyParser):
    """A parser that reads its buffer `buf` in steps: each step consumes what it can decide on and says
    whether another step may make progress (False: wait for more text, or, when final, nothing left)."""

    buf: str

    def _feed(self, text: str) -> list[ReplyChunk]:
        self.buf += text
        out: list[ReplyChunk] = []
        self._steps(out, final=False)
        return out

    def _steps(self, out: list[ReplyChunk], final: bool) -> None:
        while self._step(out, final):
            pass

    def _step(self, out: list[ReplyChunk], final: bool) -> bool:
        raise NotImplementedError


class TagParser(SteppingParser):
    """Think tags and marker-delimited tool calls (every family but harmony)."""

    def __init__(self, family: Family, in_think: bool, calls: bool = True) -> None:
        super().__init__()
        self.family = family
        self.tools = family.tools if calls else None
        self.mode = "reasoning" if in_think else ("start" if family.think else "content")
        self.buf = ""
        self.section = _Section()
        self.region: _Region | None = None
        self.n_calls = 0
        self.call_id = family.call_id
        self.strings: frozenset[tuple[str, str]] = frozenset()  # XML parameters typed string

    # markers of content mode
    @property
    def _markers(self) -> tuple[str, ...]:
        return (*self.tools.start, *self.tools.drop) if self.tools else ()

    def _finish(self) -> list[ReplyChunk]:
        out: list[ReplyChunk] = []
        self._steps(out, final=True)
        if self.mode == "tool":
            self._close_region(out, self.region.text if self.region else "", final=True)
        elif self.buf:
            self._emit(out, self.buf, reasoning=self.mode == "reasoning")
        self.buf = ""
        return out

    def _emit(self, out: list[ReplyChunk], s: str, *, reasoning: bool) -> None:
        kept = self.section.text(s)
        if kept:
            out.append(ReasoningChunk(text=kept) if reasoning else TextChunk(text=kept))

    def _step(self, out: list[ReplyChunk], final: bool) -> bool:
        """Advance once; True when the state changed (call again)."""
        if self.mode == "start":
            return self._step_start(final)
        if self.mode == "reasoning":
            return self._step_reasoning(out, final)
        if self.mode == "content":
            return self._step_content(out, final)
        return self._step_tool(out, final)

    def _step_start(self, final: bool) -> bool:
        assert self.family.think is not None
        opener = self.family.think[0]
        s = self.buf.lstrip()
        if s.startswith(opener):
            self.buf, self.mode = s[len(opener) :], "reasoning"
            return True
        if (not s or opener.startswith(s)) and not final:
            return False
        self.mode = "content"
        return True

    def _step_reasoning(self, out: list[ReplyChunk], final: bool) -> bool:
        assert self.family.think is not None
        closer = self.family.think[1]
        i = self.buf.find(closer)
        if i >= 0:
            self._emit(out, self.buf[:i], reasoning=True)
            self.section.close()
            self.buf, self.mode = self.buf[i + len(closer) :], "content"
            return True
        if final:
            return False
        keep = _held(self.buf, (closer,))
        self._emit(out, self.buf[: len(self.buf) - keep], reasoning=True)
        self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _step_content(self, out: list[ReplyChunk], final: bool) -> bool:
        found = [(i, m) for m in self._markers if (i := self.buf.find(m)) >= 0]
        if found:
            i, marker = min(found)
            self._emit(out, self.buf[:i], reasoning=False)
            rest = self.buf[i + len(marker) :]
            if self.tools is not None and marker in self.tools.drop:
                self.buf = rest
                return True
            self.section.close()
            kept = self.tools is not None and marker in self.tools.kept
            self.region = _Region(self.n_calls, marker if kept else "")
            self.buf, self.mode = rest, "tool"
            return True
        if final:
            return False
        keep = _held(self.buf, self._markers)
        self._emit(out, self.buf[: len(self.buf) - keep], reasoning=False)
        self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _step_tool(self, out: list[ReplyChunk], final: bool) -> bool:
        assert self.region is not None and self.tools is not None
        self.region.text += self.buf
        self.buf = ""
        text, end = self.region.text, self.tools.end
        if end is not None:
            i = text.find(end)
            if i >= 0:
                self._close_region(out, text[:i], final=True)
                self.buf = text[i + len(end) :]
                return True
            self._scan(out, text[: len(text) - _held(text, (end,))], final=False)
            return False
        done = self._scan(out, text, final=False)
        if done is not None:
            self._close_region(out, text[:done], final=True)
            self.buf = text[done:]
            return True
        return False

    def _close_region(self, out: list[ReplyChunk], body: str, final: bool) -> None:
        region = self.region
        assert region is not None
        self._scan(out, body, final=final)
        if not any(region.started):  # not a call after all: the text stands as content
            self._emit(out, body, reasoning=False)
        self.n_calls = region.base + len(region.started)
        self.region, self.mode = None, "content"
        self.section.close()

    def _scan(self, out: list[ReplyChunk], body: str, final: bool) -> int | None:
        """Send what is new in the region's calls; return where the body ends, once it does."""
        assert self.region is not None and self.tools is not None
        if self.tools.body == "xml":
            calls, done = scan_xml(body, self.strings)
        else:
            calls, done = SCANNERS[self.tools.body](body)
        region = self.region
        for k, (name, args, complete) in enumerate(calls):
            if k == len(region.started):
                region.started.append(False)
                region.sent.append(0)
            if not region.started[k]:
                if name is None:
                    break
                out.append(ToolCallChunk(index=region.base + k, id=self.call_id(), name=name))
                region.started[k] = True
            if final and complete and not args:
                args = "{}"
            if len(args) > region.sent[k]:
                out.append(ToolCallChunk(index=region.base + k, arguments=args[region.sent[k] :]))
                region.sent[k] = len(args)
        return done


# --------------------------------------------------------------------------- body scanners
# A scanner reads a (possibly partial) call region and returns ([(name, arguments so far, complete)],
# end): the arguments text only ever grows, and `end` is where the region's calls end, once they do.
Scan = tuple[list[tuple[str | None, str, bool]], int | None]
_WS = " \t\r\n"


def _skip_ws(s: str, i: int, extra: str = "") -> int:
    while i < len(s) and s[i] in _WS + extra:
        i += 1
    return i


def _value_end(s: str, i: int) -> int | None:
    """Index just after the JSON value starting at s[i], or None when it is not complete yet."""
    if i >= len(s):
        return None
    if s[i] == '"':
        return _string_end(s, i)
    if s[i] not in "{[":
        j = i
        while j < len(s) and s[j] not in ",}] \t\r\n":
            j += 1
        return j if j < len(s) else None
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c == '"':
            end = _string_end(s, j)
            if end is None:
                return None
            j = end
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _string_end(s: str, i: int) -> int | None:
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
            continue
        if s[j] == '"':
            return j + 1
        j += 1
    return None


def _scan_object(s: str, i: int) -> tuple[tuple[str | None, str, bool], int | None]:
    """One {"name": ..., "arguments"|"parameters": ...} object from s[i] == '{'."""
    name: str | None = None
    args = ""
    j = i + 1
    while True:
        j = _skip_ws(s, j, ",")
        if j >= len(s):
            return (name, args, False), None
        if s[j] == "}":
            return (name, args, True), j + 1
        key_end = _string_end(s, j) if s[j] == '"' else None
        if key_end is None:
            return (name, args, False), None
        key = s[j + 1 : key_end - 1]
        j = _skip_ws(s, key_end)
        if j >= len(s) or s[j] != ":":
            return (name, args, False), None
        j = _skip_ws(s, j + 1)
        end = _value_end(s, j)
        if key in ("arguments", "parameters"):
            args = s[j : end if end is not None else len(s)]
        elif key == "name" and end is not None:
            name = json.loads(s[j:end]) if s[j] == '"' else None
        if end is None:
            return (name, args, False), None
        j = end


def scan_json(s: str, sequence: bool = False) -> Scan:
    """A JSON call object or an array of them (`sequence`: or several objects separated by ',' or ';')."""
    calls: list[tuple[str | None, str, bool]] = []
    j = _skip_ws(s, 0)
    array = j < len(s) and s[j] == "["
    if array:
        j += 1
    while True:
        j = _skip_ws(s, j, ",;" if array or sequence else "")
        if j >= len(s):
            return calls, None
        if array and s[j] == "]":
            return calls, j + 1
        if s[j] != "{":
            return calls, j if calls else None
        call, end = _scan_object(s, j)
        calls.append(call)
        if end is None:
            return calls, None
        j = end
        if not array and not sequence:
            return calls, end


def scan_mistral(s: str) -> Scan:
    """Mistral Small 3.x: NAME[ARGS]{...}."""
    i = s.find("[ARGS]")
    if i < 0:
        return [], None
    name = s[:i].strip()
    j = _skip_ws(s, i + len("[ARGS]"))
    end = _value_end(s, j)
    args = s[j : end if end is not None else len(s)]
    return [(name, args, end is not None)], end


def scan_deepseek(s: str) -> Scan:
    """DeepSeek-R1: function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```."""
    i = s.find("<｜tool▁sep｜>")
    nl = s.find("\n", i) if i >= 0 else -1
    if nl < 0:
        return [], None
    name = s[i + len("<｜tool▁sep｜>") : nl].strip()
    j = s.find("{", nl)
    if j < 0:
        return [(name, "", False)], None
    end = _value_end(s, j)
    return [(name, s[j : end if end is not None else len(s)], end is not None)], None


_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def scan_xml(s: str, strings: frozenset[tuple[str, str]] = frozenset()) -> Scan:
    """Qwen3-Coder: <function=NAME><parameter=P>VALUE</parameter>...</function>, as JSON arguments
    growing one parameter at a time. A value stays a string where the tool's schema says so
    (`strings`: (function, parameter) pairs); otherwise one that reads as JSON keeps its type."""
    m = re.search(r"<function=([^>\n]+)>", s)
    if m is None:
        return [], None
    parts = []
    for p in _PARAM.finditer(s, m.end()):
        value = p.group(2)
        try:
            typed = json.loads(value)
            text = value.strip() if not isinstance(typed, str) else json.dumps(value)
        except json.JSONDecodeError:
            text = json.dumps(value)
        if (m.group(1).strip(), p.group(1)) in strings:
            text = json.dumps(value)
        parts.append(f"{json.dumps(p.group(1))}: {text}")
    complete = "</function>" in s[m.end() :]
    args = "{" + ", ".join(parts) + ("}" if complete else "")
    return [(m.group(1).strip(), args, complete)], None


SCANNERS = {
    "json": scan_json,
    "json-seq": lambda s: scan_json(s, sequence=True),
    "mistral": scan_mistral,
    "deepseek": scan_deepseek,
    "xml": scan_xml,
}


# --------------------------------------------------------------------------- harmony
_H_END = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")


class HarmonyParser(SteppingParser):
    """gpt-oss harmony: messages `<|channel|>C [to=R] [<|constrain|>json]<|message|>BODY<|end|>`;
    analysis -> reasoning, final/commentary -> content, a recipient `functions.NAME` -> a tool call.

    The reply continues the prompt's `<|start|>assistant`, so it begins in a message header."""

    def __init__(self, family: Family) -> None:
        super().__init__()
        self.family = family
        self.buf = ""
        self.mode = "header"
        self.kind = "content"  # of the message being read: reasoning | content | call
        self.n_calls = 0

    def _finish(self) -> list[ReplyChunk]:
        out: list[ReplyChunk] = []
        self._steps(out, final=True)
        if self.mode == "body" and self.buf:
            self._body(out, self.buf)
        elif self.mode == "header" and self.buf.strip() and not self._calls and not self._content:
            self._body_kind("")  # no header at all: the whole reply is the answer
            self._body(out, self.buf)
        self.buf = ""
        return out

    def _step(self, out: list[ReplyChunk], final: bool) -> bool:
        if self.mode == "header":
            i = self.buf.find("<|message|>")
            if i < 0:
                return False
            self._body_kind(self.buf[:i])
            self.buf, self.mode = self.buf[i + len("<|message|>") :], "body"
            if self.kind == "call":
                out.append(ToolCallChunk(index=self.n_calls, id=self.family.call_id(), name=self._name))
            return True
        found = [(i, m) for m in _H_END if (i := self.buf.find(m)) >= 0]
        if found:
            i, marker = min(found)
            self._body(out, self.buf[:i])
            self.buf = self.buf[i + (len(marker) if marker != "<|start|>" else 0) :]
            if self.kind == "call":
                self.n_calls += 1
            self.mode = "header"
            return True
        if not final:
            keep = _held(self.buf, _H_END)
            self._body(out, self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _body_kind(self, header: str) -> None:
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        to = re.search(r"to=([^\s<]+)", header)
        if to and to.group(1).startswith("functions."):
            self.kind, self._name = "call", to.group(1)[len("functions.") :]
        elif channel and channel.group(1) == "analysis":
            self.kind = "reasoning"
        else:
            self.kind = "content"

    def _body(self, out: list[ReplyChunk], text: str) -> None:
        if not text:
            return
        if self.kind == "reasoning":
            out.append(ReasoningChunk(text=text))
        elif self.kind == "call":
            out.append(ToolCallChunk(index=self.n_calls, arguments=text))
        else:
            out.append(TextChunk(text=text))
