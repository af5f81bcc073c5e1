"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) over the one chat path.

A request becomes the internal chat request (system, text blocks, tool_use / tool_result blocks as
OpenAI tool calls and tool messages, tools, tool_choice); the result and the stream go back as
content blocks and Anthropic's event sequence. Errors use Anthropic's error shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from pydantic import Field
from sse_starlette import EventSourceResponse

from selfhost.serve import runner
from selfhost.serve.runner import Served
from selfhost.serve.schemas import MAX_MESSAGES, MAX_TEXT, Lenient
from selfhost.serve.service import ApiError, Completed

Text = Annotated[str, Field(max_length=MAX_TEXT)]


class TextBlock(Lenient):
    type: Literal["text"]
    text: Text


class ToolUseBlock(Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Text | list[TextBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(b.text for b in self.content)
        return self.content or ""


class ThinkingBlock(Lenient):
    """Earlier turns' thinking, sent back by clients: not part of the next prompt."""

    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class AnthropicMessage(Lenient):
    role: Literal["user", "assistant"]
    content: Text | list[Block]


class AnthropicTool(Lenient):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolChoice(Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class CountTokensRequest(Lenient):
    model: str | None = None
    messages: Annotated[list[AnthropicMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: Text | list[TextBlock] | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None
    grammar: Annotated[str, Field(max_length=100_000)] | None = None  # llama-server's extension (GBNF)


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    stream: bool = False


def register(app: FastAPI, served: Served) -> None:
    served.error_shapes.append(("/v1/messages", error_body))

    @app.post("/v1/messages", dependencies=[served.auth])
    async def messages(req: MessagesRequest, request: Request) -> Any:
        reply = runner.start(await runner.plan(served, runner.chat_request(_translate(req))))
        if req.stream:
            events = _events(reply, runner.stream(reply))
            return EventSourceResponse(events, ping=15, sep="\n", shutdown_grace_period=served.grace)
        result = await runner.collect(reply, request)
        return None if result is None else _message(reply, result)

    @app.post("/v1/messages/count_tokens", dependencies=[served.auth])
    async def count_tokens(req: CountTokensRequest) -> dict[str, int]:
        reply = await runner.plan(served, runner.chat_request({**_translate(req), "max_tokens": 1}))
        runner.discard(reply)
        return {"input_tokens": reply.prompt_tokens}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(exc: ApiError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": str(exc)}}


# ----------------------------------------------------------------- requests
def _translate(req: CountTokensRequest) -> dict[str, Any]:
    """Anthropic's request as the internal (OpenAI-shaped) chat request."""
    messages: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "\n\n".join(b.text for b in req.system)
        messages.append({"role": "system", "content": system})
    for m in req.messages:
        messages += _messages(m)
    data: dict[str, Any] = {"model": req.model, "messages": messages, "grammar": req.grammar}
    kind = (req.thinking or {}).get("type")
    if kind in ("enabled", "disabled"):  # the model's own think switch, where its template has one
        data["think"] = kind == "enabled"
    if isinstance(req, MessagesRequest):
        data.update(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stop=req.stop_sequences or None,
        )
    if req.tools:
        data["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool" and not choice.name:
            raise ApiError(400, "tool_choice.name: a tool choice of type `tool` names the tool")
        if choice.disable_parallel_tool_use:
            data["parallel_tool_calls"] = False
        data["tool_choice"] = {
            "auto": "auto",
            "any": "required",
            "none": "none",
            "tool": {"type": "function", "function": {"name": choice.name}},
        }[choice.type]
    return data


def _messages(m: AnthropicMessage) -> list[dict[str, Any]]:
    """One Anthropic message: tool results become tool messages, tool uses the assistant's calls."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    out: list[dict[str, Any]] = []
    texts, calls = [], []
    for block in m.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input)
            calls.append(
                {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}
            )
    if texts or calls or not out:
        message: dict[str, Any] = {"role": m.role, "content": "".join(texts)}
        if calls and m.role == "assistant":
            message["tool_calls"] = calls
        out.append(message)
    return out


# ---------------------------------------------------------------- responses
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _stop_reason(result: Completed) -> str:
    """Anthropic's stop_reason: "stop_sequence" when one of the request's stop_sequences ended the reply."""
    if result.stop_sequence is not None and result.finish_reason == "stop":
        return "stop_sequence"
    return _STOP.get(result.finish_reason, "end_turn")


def _blocks(result: Completed) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    thinking = runner.reasoning(result)
    if thinking:
        blocks.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if result.content or not result.tool_calls:
        blocks.append({"type": "text", "text": result.content or ""})
    for call in result.tool_calls or []:
        try:
            arguments = json.loads(call["function"]["arguments"])
        except json.JSONDecodeError:
            arguments = {}
        blocks.append(
            {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": arguments}
        )
    return blocks


def _head(reply: runner.Reply) -> dict[str, Any]:
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": reply.model_id}


def _usage(result: Completed) -> dict[str, int]:
    return {"input_tokens": result.usage["prompt_tokens"], "output_tokens": result.usage["completion_tokens"]}


def _message(reply: runner.Reply, result: Completed) -> dict[str, Any]:
    return {
        **_head(reply),
        "content": _blocks(result),
        "stop_reason": _stop_reason(result),
        "stop_sequence": result.stop_sequence,
        "usage": _usage(result),
    }


def _event(kind: str, **data: Any) -> dict[str, str]:
    return {"event": kind, "data": json.dumps({"type": kind, **data})}


async def _events(
    reply: runner.Reply, parts: AsyncGenerator[runner.Part, None]
) -> AsyncIterator[dict[str, str]]:
    """message_start; thinking and text blocks streamed as they come; tool_use blocks whole at the end;
    message_delta (stop_reason, usage) and message_stop."""
    usage = {"input_tokens": reply.prompt_tokens, "output_tokens": 0}
    start = {
        **_head(reply),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    yield _event("message_start", message=start)
    index, open_kind, streamed = 0, None, set()
    result: Completed | None = None
    try:
        async for part in parts:
            if isinstance(part, Completed):
                result = part
                continue
            kind = {"text": "text", "reasoning": "thinking"}.get(part.kind)
            if kind is None:
                continue  # tool calls come whole from the result
            if kind != open_kind:
                if open_kind is not None:
                    yield _event("content_block_stop", index=index)
                    index += 1
                block = {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})}
                yield _event("content_block_start", index=index, content_block=block)
                open_kind = kind
                streamed.add(kind)
            yield _event("content_block_delta", index=index, delta=_delta({"type": kind, kind: part.text}))
    except ApiError as exc:
        yield _event("error", error=error_body(exc)["error"])
        return
    finally:
        await parts.aclose()  # a client that went away frees its slot now
    assert result is not None
    if open_kind is not None:
        yield _event("content_block_stop", index=index)
        index += 1
    for block in [b for b in _blocks(result) if b["type"] not in streamed]:  # read whole: one delta each
        yield _event("content_block_start", index=index, content_block={**block, **_empty(block)})
        yield _event("content_block_delta", index=index, delta=_delta(block))
        yield _event("content_block_stop", index=index)
        index += 1
    stop = {"stop_reason": _stop_reason(result), "stop_sequence": result.stop_sequence}
    yield _event("message_delta", delta=stop, usage={"output_tokens": result.usage["completion_tokens"]})
    yield _event("message_stop")


def _empty(block: dict[str, Any]) -> dict[str, Any]:
    return {"tool_use": {"input": {}}, "text": {"text": ""}, "thinking": {"thinking": ""}}[block["type"]]


def _delta(block: dict[str, Any]) -> dict[str, Any]:
    if block["type"] == "tool_use":
        return {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
    if block["type"] == "thinking":
        return {"type": "thinking_delta", "thinking": block["thinking"]}
    return {"type": "text_delta", "text": block["text"]}
