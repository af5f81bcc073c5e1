"""OpenAI's Responses API (`POST /v1/responses`), stateless, over the one chat path.

`input` (a string or items: messages, function_call, function_call_output) and `instructions`
become the internal chat request; `tools` are function tools, `text.format` the JSON grammar. The
result goes back as output items, the stream as typed events. Nothing is stored: `store` is
answered `false`, and `previous_response_id` is refused (send the whole conversation as `input`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from pydantic import Discriminator, Field, Tag
from sse_starlette import EventSourceResponse

from selfhost.serve import runner
from selfhost.serve.runner import Served
from selfhost.serve.schemas import MAX_MESSAGES, MAX_TEXT, Lenient
from selfhost.serve.service import ApiError, Completed

Text = Annotated[str, Field(max_length=MAX_TEXT)]


class InputText(Lenient):
    type: Literal["input_text", "output_text", "text"]
    text: Text


class MessageItem(Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: Text | list[InputText]


class ReasoningItem(Lenient):
    """Earlier reasoning, sent back by clients: not part of the next prompt."""

    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    return (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "message"


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(Lenient):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Lenient):
    type: Literal["function"]
    name: str


class TextFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(Lenient):
    format: TextFormat | None = None


class ResponsesRequest(Lenient):
    model: str | None = None
    input: Text | Annotated[list[Item], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: Text | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    text: TextConfig | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stream: bool = False
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # nothing is stored: answered `false`
    previous_response_id: str | None = None
    background: Literal[False] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    grammar: Annotated[str, Field(max_length=100_000)] | None = None  # llama-server's extension (GBNF)


def register(app: FastAPI, served: Served) -> None:
    @app.post("/v1/responses", dependencies=[served.auth])
    async def responses(req: ResponsesRequest, request: Request) -> Any:
        if req.previous_response_id:
            raise ApiError(
                400,
                "previous_response_id: this server stores no responses; send the conversation as `input`",
                param="previous_response_id",
            )
        reply = runner.start(await runner.plan(served, runner.chat_request(_translate(req))))
        head = _head(reply, req)
        if req.stream:
            events = _events(head, runner.stream(reply))
            return EventSourceResponse(events, ping=15, sep="\n", shutdown_grace_period=served.grace)
        result = await runner.collect(reply, request)
        return None if result is None else _done(head, result, _output(result, _id("msg"), _id("rs")))


# ----------------------------------------------------------------- requests
def _translate(req: ResponsesRequest) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    data: dict[str, Any] = {
        "model": req.model,
        "grammar": req.grammar,
        "messages": messages,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    if req.reasoning and req.reasoning.get("effort"):  # thinking models: the template's reasoning switch
        data["reasoning_effort"] = req.reasoning["effort"]
    if req.tools:
        data["tools"] = [
            {
                "type": "function",
                "function": t.model_dump(include={"name", "description", "parameters"}, exclude_none=True),
            }
            for t in req.tools
        ]
    if isinstance(req.tool_choice, NamedFunction):
        data["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        data["tool_choice"] = req.tool_choice
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        data["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": fmt.schema_ or {}},
        }
    elif fmt is not None:
        data["response_format"] = {"type": fmt.type}
    return data


# ---------------------------------------------------------------- responses
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _head(reply: runner.Reply, req: ResponsesRequest) -> dict[str, Any]:
    """The response object's fields that echo the request."""
    fmt = (
        req.text.format.model_dump(by_alias=True, exclude_none=True)
        if req.text and req.text.format
        else {"type": "text"}
    )
    return {
        "id": _id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "model": reply.model_id,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "tool_choice": req.tool_choice.model_dump()
        if isinstance(req.tool_choice, NamedFunction)
        else req.tool_choice or "auto",
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "text": {"format": fmt},
        "store": False,
        "previous_response_id": None,
        "metadata": req.metadata or {},
        "reasoning": {"effort": None, "summary": None},
        "truncation": "disabled",
        "error": None,
        "incomplete_details": None,
        "usage": None,
    }


def _message(msg_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": msg_id, "status": status, "role": "assistant", "content": [part]}


def _reasoning(rs_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": rs_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _output(result: Completed, msg_id: str, rs_id: str) -> list[dict[str, Any]]:
    """Output items in order: reasoning (thinking models), the message, function calls."""
    items: list[dict[str, Any]] = []
    thinking = runner.reasoning(result)
    if thinking:
        items.append(_reasoning(rs_id, thinking))
    if result.content or not result.tool_calls:
        items.append(_message(msg_id, result.content or ""))
    for call in result.tool_calls or []:
        items.append(
            {
                "type": "function_call",
                "id": _id("fc"),
                "call_id": call["id"],
                "status": "completed",
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
            }
        )
    return items


def _done(head: dict[str, Any], result: Completed, output: list[dict[str, Any]]) -> dict[str, Any]:
    u = result.usage
    usage = {
        "input_tokens": u["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u["total_tokens"],
    }
    cut = result.finish_reason == "length"
    return {
        **head,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": output,
        "usage": usage,
    }


async def _events(
    head: dict[str, Any], parts: AsyncGenerator[runner.Part, None]
) -> AsyncIterator[dict[str, str]]:
    """The typed event sequence: reasoning and text items streamed as they come, items read whole
    (function calls) at the end, then response.completed (or response.incomplete)."""
    seq = iter(range(1 << 62))

    def event(kind: str, **data: Any) -> dict[str, str]:
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": next(seq), **data})}

    started = {**head, "status": "in_progress", "output": []}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    ids = {"message": _id("msg"), "reasoning": _id("rs")}
    opened: list[str] = []  # item types streamed, in output order
    try:
        async for part in parts:
            if isinstance(part, Completed):
                result = part
                continue
            kind = {"text": "message", "reasoning": "reasoning"}.get(part.kind)
            if kind is None:
                continue  # function calls come whole from the result
            if kind not in opened:
                opened.append(kind)
                empty = (
                    _message(ids[kind], "", "in_progress") if kind == "message" else _reasoning(ids[kind], "")
                )
                index = len(opened) - 1
                yield event("response.output_item.added", output_index=index, item={**empty, "content": []})
                where = {"item_id": ids[kind], "output_index": index, "content_index": 0}
                yield event("response.content_part.added", **where, part=empty["content"][0])
            where = {"item_id": ids[kind], "output_index": opened.index(kind), "content_index": 0}
            delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
            yield event(delta, **where, delta=part.text, **({"logprobs": []} if kind == "message" else {}))
    except ApiError as exc:
        yield event("error", code=exc.code, message=str(exc), param=exc.param)
        return
    finally:
        await parts.aclose()  # a client that went away frees its slot now
    output = _output(result, ids["message"], ids["reasoning"])
    for index, item in enumerate(output):
        if item["type"] in opened:
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            whole = item["content"][0]
            if item["type"] == "message":
                yield event("response.output_text.done", **where, text=whole["text"], logprobs=[])
            else:
                yield event("response.reasoning_text.done", **where, text=whole["text"])
            yield event("response.content_part.done", **where, part=whole)
        else:
            async for e in _whole_item(event, index, item):
                yield e
        yield event("response.output_item.done", output_index=index, item=item)
    done = _done(head, result, output)
    yield event(
        "response.incomplete" if done["status"] == "incomplete" else "response.completed", response=done
    )


async def _whole_item(event: Any, index: int, item: dict[str, Any]) -> AsyncIterator[dict[str, str]]:
    """An output item read whole: added, its one delta and done."""
    if item["type"] == "function_call":
        yield event(
            "response.output_item.added",
            output_index=index,
            item={**item, "arguments": "", "status": "in_progress"},
        )
        where = {"item_id": item["id"], "output_index": index}
        yield event("response.function_call_arguments.delta", **where, delta=item["arguments"])
        yield event(
            "response.function_call_arguments.done", **where, arguments=item["arguments"], name=item["name"]
        )
    elif item["type"] == "message":
        yield event(
            "response.output_item.added",
            output_index=index,
            item={**item, "content": [], "status": "in_progress"},
        )
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        whole = item["content"][0]
        yield event("response.content_part.added", **where, part={**whole, "text": ""})
        yield event("response.output_text.delta", **where, delta=whole["text"], logprobs=[])
        yield event("response.output_text.done", **where, text=whole["text"], logprobs=[])
        yield event("response.content_part.done", **where, part=whole)
    else:
        yield event("response.output_item.added", output_index=index, item=item)
