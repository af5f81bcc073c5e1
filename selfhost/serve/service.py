"""What `selfhost serve` does with a request, without HTTP: OpenAI request -> ChatSession -> job.

The FastAPI layer (selfhost/serve/app.py) only parses, authenticates and streams. Every request
becomes a ChatSession over the shared ChatModel -- the same templating, context check, sampling
and grammar code as `selfhost chat` -- and a job in the model's BatchEngine.

The interface every API shape (OpenAI chat, and adapters built on it) reads a reply through:
- `Service.plan_chat(req) -> Planned`; the job is `planned.prepared.job` (submit it to the engine);
- streaming: `Service.deltas(planned, text)` for each `JobText.text`, then `Service.deltas(planned, None)`
  at the end: typed chunks of the model family's parser (selfhost/chat/families.py), in order --
  `ReasoningChunk(text)`, `TextChunk(text)` (the answer), `ToolCallChunk(index, id, name, arguments)`
  (id and name on a call's first chunk, then argument fragments that concatenate to its JSON);
- `Service.finish(planned, end) -> Completed`: `content` (the answer only), `reasoning`, `tool_calls`
  (OpenAI's shape), `finish_reason`, `usage` (with `completion_tokens_details.reasoning_tokens`).
The non-streamed result is exactly what the streamed chunks add up to.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selfhost.chat.families import ReplyParser, forced_call_parser
from selfhost.chat.history import ChatLog, HistoryStore
from selfhost.chat.messages import Message, ReplyChunk, ToolCallChunk
from selfhost.chat.model import ChatModel
from selfhost.chat.schema import grammar_for
from selfhost.chat.session import ChatSession, ContextLengthError, PreparedReply, Sampling
from selfhost.errors import SelfhostError, UsageError
from selfhost.runtime.jobs import JobEnd
from selfhost.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    Tool,
)


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
    parallel: bool | None = None  # parallel_tool_calls: False keeps the first call only


@dataclass
class Planned:
    """A request turned into a prepared reply, with what the response needs."""

    session: ChatSession
    prepared: PreparedReply
    tools: ToolPlan
    id: str
    created: int
    kind: str  # "chat" | "text"
    fed: bool = False  # the reply's text went through `deltas` (streaming) as it came


@dataclass
class Completed:
    """A job's result in OpenAI's terms (content: the answer only; reasoning apart)."""

    content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str
    usage: dict[str, Any]
    reasoning: str | None = None
    stop_sequence: str | None = None  # the request's stop string that ended the reply


class Service:
    """The loaded model and the server's policies (history log)."""

    def __init__(self, model: ChatModel, *, log: bool = False) -> None:
        self.model = model
        self.log = log  # write each served conversation to the chat history
        self.started = int(time.time())
        self.load_seconds = 0.0  # how long the model took to load (serve measures it)
        self.observers: list[Callable[[JobEnd], None]] = []  # told of every finished job (metrics)

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
        session.think, session.effort = req.think, req.reasoning_effort
        plan = self._plan_tools(req)
        grammar = plan.grammar or _format_grammar(req)
        if req.grammar is not None and grammar is not None:
            raise ApiError(400, "grammar cannot be combined with response_format or a forced tool call")
        if plan.mode in ("named", "required") and plan.template_tools is None:
            session.system = _with_tool_instructions(session.system, plan)
        elif plan.mode == "auto" and plan.template_tools is None:  # a family whose template lists no tools
            session.system = _with_tool_list(session.system, plan, self.model.family.tools)
        if req.grammar is not None:
            try:
                self.model.engine.check_grammar(req.grammar)
            except UsageError as exc:
                raise ApiError(400, str(exc), param="grammar") from exc
        session.grammar = req.grammar
        forced = None
        if plan.mode in ("named", "required"):  # the grammar makes the reply one call: stream it as one
            forced = forced_call_parser(self.model.family, plan.forced_name)
        prepared = self._prepare(
            session, grammar, req.stop_list(), plan.template_tools, forced, calls=plan.mode == "auto"
        )
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
        self,
        session: ChatSession,
        grammar: str | None,
        stop: list[str],
        tools: list[dict[str, Any]] | None,
        parser: ReplyParser | None = None,
        calls: bool = False,
    ) -> PreparedReply:
        try:
            return session.prepare(
                trim=False, grammar=grammar, stop=stop, tools=tools, parser=parser, calls=calls
            )
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
        template_tools = [t.model_dump(exclude_none=True) for t in tools] if supports else None
        if isinstance(choice, str) and choice == "auto":
            if self.model.family.tools is None:
                raise ApiError(
                    400,
                    f"{self.model_id}'s chat template has no tool-call format selfhost can read, "
                    "so it cannot choose tools itself (tool_choice required or named still work)",
                    param="tool_choice",
                    code="tools_unsupported",
                )
            return ToolPlan("auto", tools, template_tools, parallel=req.parallel_tool_calls)
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
    def deltas(self, planned: Planned, text: str | None) -> list[ReplyChunk]:
        """A streamed reply's next text through the model family's parser (None: the end): typed
        reasoning, answer and tool-call chunks. Tool calls count only where tool_choice is auto."""
        planned.fed = True
        parser = planned.prepared.parser
        chunks = parser.feed(text) if text is not None else parser.finish()
        if planned.tools.mode == "none":
            chunks = [c for c in chunks if not isinstance(c, ToolCallChunk)]
        elif planned.tools.parallel is False:  # one call only, as the non-streamed reply keeps
            chunks = [c for c in chunks if not isinstance(c, ToolCallChunk) or c.index == 0]
        return chunks

    def finish(self, planned: Planned, end: JobEnd) -> Completed:
        """Record the reply in the session (and the history), in OpenAI's terms."""
        for observe in self.observers:
            observe(end)
        if end.finish_reason == "error":
            raise ApiError(500, end.error or "generation failed", type="server_error")
        if not planned.fed:
            planned.prepared.parser.feed(end.text)
        planned.prepared.parser.finish()
        parsed = planned.prepared.parser.result()
        content: str | None = parsed.content
        calls = parsed.tool_calls if planned.tools.mode != "none" else None
        if calls and planned.tools.mode == "auto" and planned.tools.parallel is False:
            calls = calls[:1]
        if calls and planned.tools.mode != "auto" and not _complete(calls):
            calls, content = None, end.text  # a forced call cut short (max_tokens): the text, "length"
        content = content or (None if calls else content)
        try:
            done = planned.session.record(planned.prepared, end, calls, content or "")
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
            "completion_tokens_details": {"reasoning_tokens": done.usage.reasoning_tokens},
        }
        if end.drafted_tokens:  # speculative decoding, in OpenAI's names for predicted tokens
            usage["completion_tokens_details"] |= {
                "accepted_prediction_tokens": end.accepted_tokens,
                "rejected_prediction_tokens": end.drafted_tokens - end.accepted_tokens,
            }
        return Completed(content, calls, finish, usage, done.message.reasoning, end.stop_sequence)


def _message(m: Any) -> Message:
    role = "system" if m.role == "developer" else m.role
    calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls else None
    if calls:
        for call in calls:  # templates expect arguments as an object
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except (json.JSONDecodeError, TypeError):
                pass
    return Message(
        role=role,
        content=m.text(),
        tool_calls=calls,
        tool_call_id=m.tool_call_id,
        reasoning=m.reasoning_content,
    )


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


def _with_tool_list(system: str | None, plan: ToolPlan, fmt: Any) -> str:
    """For a template that cannot list tools (DeepSeek-R1 distills): the tools, and how to call them."""
    specs = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in plan.tools)
    note = f"You may call these functions:\n{specs}"
    if fmt is not None and fmt.example:
        note += f"\nTo call one, reply with:\n{fmt.example}"
    return f"{system}\n\n{note}" if system else note


def _complete(calls: list[dict[str, Any]]) -> bool:
    """Are all calls' arguments whole JSON objects?"""
    try:
        return all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in calls)
    except json.JSONDecodeError:
        return False
