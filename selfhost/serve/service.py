"""What `selfhost serve` does with a request, without HTTP: OpenAI request -> ChatSession -> job.

The FastAPI layer (selfhost/serve/app.py) only parses, authenticates and streams. Every request
becomes a ChatSession over the shared ChatModel -- the same templating, context check, sampling
and grammar code as `selfhost chat` -- and a job in the model's BatchEngine.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from selfhost.chat.history import ChatLog, HistoryStore
from selfhost.chat.messages import Message
from selfhost.chat.model import ChatModel
from selfhost.chat.schema import grammar_for
from selfhost.chat.session import ChatSession, ContextLengthError, PreparedReply, Sampling
from selfhost.errors import SelfhostError, UsageError
from selfhost.runtime.batch import JobEnd
from selfhost.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    Tool,
)

_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ApiError(SelfhostError):
    """An error the client caused: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "code": self.code, "param": self.param}}


@dataclass
class ToolPlan:
    """How a request's tools shape the prompt, the grammar and the reading of the reply."""

    mode: str = "none"  # none | auto | named | required
    tools: list[Tool] = field(default_factory=list)
    template_tools: list[dict[str, Any]] | None = None  # what the chat template renders
    grammar: str | None = None
    forced_name: str | None = None


@dataclass
class Planned:
    """A request turned into a prepared reply, with what the response needs."""

    session: ChatSession
    prepared: PreparedReply
    tools: ToolPlan
    id: str
    created: int
    kind: str  # "chat" | "text"


@dataclass
class Completed:
    """A job's result in OpenAI's terms."""

    content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str
    usage: dict[str, Any]


class Service:
    """The loaded model and the server's policies (history log)."""

    def __init__(self, model: ChatModel, *, log: bool = False) -> None:
        self.model = model
        self.log = log  # write each served conversation to the chat history
        self.started = int(time.time())

    @property
    def model_id(self) -> str:
        return self.model.summary.name

    # ----------------------------------------------------------- planning
    def plan_chat(self, req: ChatCompletionRequest) -> Planned:
        if self.model.template is None:
            raise ApiError(400, f"{self.model_id} has no chat template: use /v1/completions", param="model")
        session = self._session(req, req.reply_limit(), raw=False)
        system_parts: list[str] = []
        for m in req.messages:
            if m.role in ("system", "developer") and not session.messages:
                system_parts.append(m.text())
            else:
                session.messages.append(_message(m))
        session.system = "\n\n".join(system_parts) or None
        plan = self._plan_tools(req)
        grammar = plan.grammar or _format_grammar(req)
        if plan.mode in ("named", "required") and plan.template_tools is None:
            session.system = _with_tool_instructions(session.system, plan)
        prepared = self._prepare(session, grammar, req.stop_list(), plan.template_tools)
        return Planned(session, prepared, plan, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), "chat")

    def plan_text(self, req: CompletionRequest) -> Planned:
        session = self._session(req, req.max_tokens, raw=True)
        session.messages.append(Message(role="user", content=req.prompt_text()))
        prepared = self._prepare(session, None, req.stop_list(), None)
        return Planned(session, prepared, ToolPlan(), f"cmpl-{uuid.uuid4().hex}", int(time.time()), "text")

    def _session(self, req: SamplingFields, max_tokens: int | None, raw: bool) -> ChatSession:
        sampling = Sampling(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repeat_penalty=req.repeat_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            max_tokens=max_tokens,
        )
        # a store per request: SQLite connections belong to the thread that opens them
        log = ChatLog(HistoryStore()) if self.log else None
        return ChatSession(self.model, sampling=sampling, raw=raw, log=log)

    def _prepare(
        self, session: ChatSession, grammar: str | None, stop: list[str], tools: list[dict[str, Any]] | None
    ) -> PreparedReply:
        try:
            return session.prepare(trim=False, grammar=grammar, stop=stop, tools=tools)
        except ContextLengthError as exc:
            raise ApiError(
                400,
                f"This model's context holds {self.model.n_ctx} tokens per request; {exc}",
                code="context_length_exceeded",
                param="messages",
            ) from exc
        except UsageError as exc:
            raise ApiError(400, str(exc)) from exc
        except SelfhostError as exc:  # the template failed on these messages
            raise ApiError(400, str(exc), param="messages") from exc

    def _plan_tools(self, req: ChatCompletionRequest) -> ToolPlan:
        tools = req.tools or []
        choice = req.tool_choice or ("auto" if tools else "none")
        if not tools or choice == "none":
            if not isinstance(choice, str) or choice == "required":
                raise ApiError(400, "tool_choice needs `tools`", param="tool_choice")
            return ToolPlan()
        supports = self.model.template is not None and self.model.template.supports_tools
        template_tools = [t.model_dump() for t in tools] if supports else None
        if isinstance(choice, str) and choice == "auto":
            if not supports:
                raise ApiError(
                    400,
                    f"{self.model_id}'s chat template has no tool support, so it cannot choose tools itself",
                    param="tool_choice",
                    code="tools_unsupported",
                )
            return ToolPlan("auto", tools, template_tools)
        if isinstance(choice, str):  # "required": any of the tools, by name
            options = [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters},
                    "required": ["name", "arguments"],
                }
                for t in tools
            ]
            schema: dict[str, Any] = {"anyOf": options} if len(options) > 1 else options[0]
            return ToolPlan("required", tools, template_tools, _grammar(schema, "tools"))
        wanted = next((t for t in tools if t.function.name == choice.function.name), None)
        if wanted is None:
            raise ApiError(
                400,
                f"tool_choice names '{choice.function.name}', which is not in `tools`",
                param="tool_choice",
            )
        grammar = _grammar(wanted.function.parameters, f"tools[{wanted.function.name}].parameters")
        return ToolPlan("named", tools, template_tools, grammar, wanted.function.name)

    # ----------------------------------------------------------- results
    def finish(self, planned: Planned, end: JobEnd) -> Completed:
        """Record the reply in the session (and the history), in OpenAI's terms."""
        if end.finish_reason == "error":
            raise ApiError(500, end.error or "generation failed", type="server_error")
        content: str | None = end.text
        calls = _tool_calls(planned.tools, end.text)
        if calls:
            content = (
                _TOOL_CALL_RE.sub("", end.text).strip() or None if planned.tools.mode == "auto" else None
            )
        try:
            done = planned.session.record(planned.prepared, end, calls)
        finally:
            if planned.session.log.store is not None:
                planned.session.log.store.close()
        if planned.session.unsaved is not None:  # --log failed: the client still gets its reply
            print(f"selfhost serve: {planned.session.unsaved}", file=sys.stderr)
        finish = {"context": "length", "interrupted": "stop"}.get(
            done.usage.finish_reason, done.usage.finish_reason
        )
        usage = {
            "prompt_tokens": end.prompt_tokens,
            "completion_tokens": end.generated_tokens,
            "total_tokens": end.prompt_tokens + end.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": end.reused_tokens},
        }
        return Completed(content, calls, finish, usage)


def _message(m: Any) -> Message:
    role = "system" if m.role == "developer" else m.role
    calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls else None
    if calls:
        for call in calls:  # templates expect arguments as an object
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except (json.JSONDecodeError, TypeError):
                pass
    return Message(role=role, content=m.text(), tool_calls=calls, tool_call_id=m.tool_call_id)


def _grammar(schema: dict[str, Any], where: str) -> str:
    try:
        return grammar_for(schema)
    except UsageError as exc:
        raise ApiError(400, f"{where}: {exc}", param=where) from exc


def _format_grammar(req: ChatCompletionRequest) -> str | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _grammar({"type": "object"}, "response_format")
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    return _grammar(fmt.json_schema.schema_, "response_format.json_schema.schema")


def _with_tool_instructions(system: str | None, plan: ToolPlan) -> str:
    """For templates without tool support: describe the function(s) the reply must call."""
    specs = [
        f"- {t.function.name}: {t.function.description or ''} parameters: {json.dumps(t.function.parameters)}"
        for t in plan.tools
        if plan.forced_name in (None, t.function.name)
    ]
    note = "Reply only with the JSON arguments of this function call:\n" + "\n".join(specs)
    return f"{system}\n\n{note}" if system else note


def _tool_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]] | None:
    """The tool calls in a reply: the whole reply (named/required) or <tool_call> blocks (auto)."""
    if plan.mode == "none":
        return None
    if plan.mode == "named":
        return [_call(plan.forced_name or "", text.strip())]
    if plan.mode == "required":
        try:
            data = json.loads(text)
            return [_call(data["name"], json.dumps(data["arguments"]))]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None  # cut short (max_tokens): the client sees the text and finish_reason "length"
    calls = []
    for block in _TOOL_CALL_RE.findall(text):
        try:
            data = json.loads(block)
            calls.append(_call(str(data["name"]), json.dumps(data.get("arguments", {}))))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return calls or None


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
