"""Ollama's API (`/api/...`) on the same port, over the one chat path.

`/api/chat` and `/api/generate` become the internal chat (or raw text) request: `options` map to our
sampling, `format` to the JSON grammar, `tools` to tool calls; replies stream as NDJSON lines. Models
are named as selfhost names them (`selfhost models list`). Errors are Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from selfhost import __version__
from selfhost.errors import SelfhostError
from selfhost.runtime.embed import Embedder
from selfhost.serve import runner
from selfhost.serve.runner import Served
from selfhost.serve.schemas import MAX_MESSAGES, MAX_TEXT, CompletionRequest, EmbeddingRequest, Lenient
from selfhost.serve.service import ApiError, Completed

Text = Annotated[str, Field(max_length=MAX_TEXT)]
NDJSON = "application/x-ndjson"


class Options(Lenient):
    """The `options` Ollama clients send; the ones that do not apply here (num_ctx, num_gpu) are ignored."""

    temperature: Annotated[float, Field(ge=0, le=2)] = 0.8
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.9
    top_k: Annotated[int, Field(ge=0)] = 40
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repeat_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    seed: int | None = None
    num_predict: int | None = None  # -1 or -2: until the model stops or the context is full
    stop: list[str] | None = None


class CallFunction(Lenient):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(Lenient):
    function: CallFunction


class OllamaMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class Common(Lenient):
    model: Annotated[str, Field(min_length=1)]
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    stream: bool = True
    keep_alive: str | int | float | None = None  # one model, always loaded: accepted, nothing to unload
    think: bool | Literal["low", "medium", "high"] | None = None
    grammar: Annotated[str, Field(max_length=100_000)] | None = None  # llama-server's extension (GBNF)


class ChatRequest(Common):
    messages: Annotated[list[OllamaMessage], Field(max_length=MAX_MESSAGES)] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(Common):
    prompt: Text = ""
    system: Text | None = None
    suffix: str | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(Lenient):
    model: str
    keep_alive: str | int | float | None = None
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=256)]
    dimensions: Annotated[int, Field(ge=1)] | None = None


class LegacyEmbedRequest(Lenient):
    model: str
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class NameRequest(Lenient):
    model: str | None = None
    name: str | None = None  # older clients
    stream: bool = True

    def ref(self) -> str:
        ref = self.model or self.name
        if not ref:
            raise ApiError(400, "model: a model name is required")
        return ref


def error_body(exc: ApiError) -> dict[str, Any]:
    return {"error": str(exc)}


def register(app: FastAPI, served: Served) -> None:
    served.error_shapes.append(("/api/", error_body))
    auth = [served.auth]

    @app.post("/api/chat", dependencies=auth)
    async def chat(req: ChatRequest, request: Request) -> Any:
        if not req.messages:  # Ollama's way to load (or, keep_alive 0, unload) a model
            await _load(served, req)
            message = {"role": "assistant", "content": ""}
            return _stamp(req.model, message=message, done=True, done_reason="load")
        reply = await runner.plan(served, runner.chat_request(_chat(req)))
        return await _answer(served, reply, req, request, "message")

    @app.post("/api/generate", dependencies=auth)
    async def generate(req: GenerateRequest, request: Request) -> Any:
        if req.images:
            raise ApiError(400, "images are not supported by this server")
        if req.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported by this server")
        if not req.prompt:
            await _load(served, req)
            return _stamp(req.model, response="", done=True, done_reason="load")
        if req.raw:
            fields = {**_sampling(req.options), "model": req.model, "keep_alive": req.keep_alive}
            text = CompletionRequest(prompt=req.prompt, stream=req.stream, **fields)
            reply = await runner.plan(served, text)
        else:
            messages = [{"role": "system", "content": req.system}] if req.system else []
            data = {**_common(req), "messages": [*messages, {"role": "user", "content": req.prompt}]}
            reply = await runner.plan(served, runner.chat_request(data))
        return await _answer(served, reply, req, request, "response")

    @app.post("/api/embed", dependencies=auth)
    async def embed(req: EmbedRequest) -> dict[str, Any]:
        from selfhost.serve.app import _embed

        started = time.perf_counter()
        openai = EmbeddingRequest(input=req.input, dimensions=req.dimensions)
        async with _embedder(served, req.model, req.keep_alive) as embedder:
            done = await run_in_threadpool(_embed, embedder, openai)
        return {
            "model": done["model"],
            "embeddings": [d["embedding"] for d in done["data"]],
            "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": done["usage"]["prompt_tokens"],
        }

    _register_models(app, served)


async def _load(served: Served, req: Common) -> None:
    """Load the named model and hand it back at once: its keep_alive (0: unload now) starts."""
    manager = served.manager
    manager.check_keep_alive(req.keep_alive)
    manager.release(await manager.acquire(req.model, "chat"), req.keep_alive)


@contextlib.asynccontextmanager
async def _embedder(served: Served, model: str | None, keep_alive: Any) -> AsyncIterator[Embedder]:
    """The embedder of the model a request names, held while it is used."""
    manager = served.manager
    manager.check_keep_alive(keep_alive)
    managed = await manager.acquire(model, "embedding")
    try:
        yield managed.embedder_for()
    finally:
        manager.release(managed, keep_alive)


def _register_models(app: FastAPI, served: Served) -> None:
    """The model endpoints: version, tags, ps, show, pull; what selfhost cannot do answers 501."""
    manager = served.manager
    auth = [served.auth]

    @app.get("/api/version", dependencies=auth)
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/api/tags", dependencies=auth)
    async def tags() -> dict[str, Any]:
        return {"models": await run_in_threadpool(_tags, served)}

    @app.get("/api/ps", dependencies=auth)
    async def ps() -> dict[str, Any]:
        return {"models": [_running(m) for m in list(manager.loaded.values())]}

    @app.post("/api/show", dependencies=auth)
    async def show(req: NameRequest) -> dict[str, Any]:
        ref = req.ref()
        managed = manager.loaded.get(ref)
        if managed is not None:
            return await run_in_threadpool(_show, managed.info, managed.kind)
        resolved = await run_in_threadpool(manager.resolve, ref, "embedding")  # 404 when unknown
        return await run_in_threadpool(_show, resolved.path, None)

    @app.post("/api/embeddings", dependencies=auth)
    async def embeddings(req: LegacyEmbedRequest) -> dict[str, Any]:
        """The older single-text endpoint some clients still call."""
        async with _embedder(served, req.model, None) as embedder:
            try:
                vector = await run_in_threadpool(lambda: embedder.embed(embedder.tokens(req.prompt)))
            except SelfhostError as exc:
                raise ApiError(400, f"prompt: {exc}", param="prompt") from exc
        return {"embedding": vector}

    @app.post("/api/pull", dependencies=auth)
    async def pull(req: NameRequest) -> Any:
        lines = _pull_lines(req.ref())
        if req.stream:
            return StreamingResponse(lines, media_type=NDJSON)
        last = await run_in_threadpool(lambda: [json.loads(line) for line in lines][-1])
        if "error" in last:
            raise ApiError(400, last["error"])
        return last

    for path in ("/api/create", "/api/push", "/api/copy", "/api/delete", "/api/blobs/{digest}"):
        app.add_api_route(path, _not_here, methods=["POST", "DELETE", "HEAD"], dependencies=auth)


async def _not_here(request: Request) -> None:
    what = request.url.path.split("/")[2]
    hint = {"create": "`selfhost quantize` or `selfhost train`", "delete": "`selfhost models rm`"}
    raise ApiError(
        501,
        f"/api/{what} is not supported by selfhost" + (f"; use {hint[what]}" if what in hint else ""),
        type="not_implemented",
    )


# ----------------------------------------------------------------- requests
def _sampling(options: Options) -> dict[str, Any]:
    limit = options.num_predict if options.num_predict is not None and options.num_predict > 0 else None
    fields = options.model_dump(exclude={"num_predict", "stop"})
    return {**fields, "max_tokens": limit, "stop": options.stop or None}


def _common(req: Common) -> dict[str, Any]:
    data = {
        **_sampling(req.options),
        "model": req.model,
        "keep_alive": req.keep_alive,
        "grammar": req.grammar,
    }
    if isinstance(req.think, bool):  # the model's think switch, where its template has one
        data["think"] = req.think
    elif req.think is not None:  # gpt-oss's levels
        data.update(think=True, reasoning_effort=req.think)
    if req.format == "json":
        data["response_format"] = {"type": "json_object"}
    elif isinstance(req.format, dict):
        data["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "format", "schema": req.format},
        }
    return data


def _chat(req: ChatRequest) -> dict[str, Any]:
    messages = []
    for m in req.messages:
        if m.images:
            raise ApiError(400, "images are not supported by this server")
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls and m.role == "assistant":
            message["tool_calls"] = [
                {
                    "id": f"call_{i}",
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.dumps(c.function.arguments)},
                }
                for i, c in enumerate(m.tool_calls)
            ]
        if m.role == "tool" and m.tool_name:
            message["name"] = m.tool_name
        messages.append(message)
    data = {**_common(req), "messages": messages}
    if req.tools:
        data["tools"] = req.tools
    return data


# ---------------------------------------------------------------- responses
def _stamp(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "created_at": datetime.now(UTC).isoformat(), **fields}


async def _answer(served: Served, reply: runner.Reply, req: Common, request: Request, key: str) -> Any:
    runner.start(reply)
    if req.stream:
        return StreamingResponse(_lines(reply, req, runner.stream(reply), key), media_type=NDJSON)
    result = await runner.collect(reply, request)
    if result is None:
        return None
    extra = {"thinking": runner.reasoning(result)} if key == "response" and runner.reasoning(result) else {}
    return _stamp(req.model, **{key: _payload(result, key)}, **extra, **_final(reply, result))


def _payload(result: Completed, key: str) -> Any:
    if key == "response":
        return result.content or ""
    message: dict[str, Any] = {"role": "assistant", "content": result.content or ""}
    thinking = runner.reasoning(result)
    if thinking:
        message["thinking"] = thinking
    if result.tool_calls:
        message["tool_calls"] = [
            {"function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
            for c in result.tool_calls
        ]
    return message


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _final(reply: runner.Reply, result: Completed) -> dict[str, Any]:
    """The last object's fields: why it stopped and what it cost (durations in nanoseconds)."""
    usage = reply.planned.session.last_usage
    ttft = usage.time_to_first_token_s if usage else 0.0
    total = usage.total_s if usage else 0.0
    return {
        "done": True,
        "done_reason": "length" if result.finish_reason == "length" else "stop",
        "total_duration": int(total * 1e9),
        "load_duration": 0,
        "prompt_eval_count": result.usage["prompt_tokens"],
        "prompt_eval_duration": int(ttft * 1e9),
        "eval_count": result.usage["completion_tokens"],
        "eval_duration": int(max(total - ttft, 0.0) * 1e9),
    }


async def _lines(
    reply: runner.Reply, req: Common, parts: AsyncGenerator[runner.Part, None], key: str
) -> AsyncIterator[str]:
    """NDJSON: answer (and thinking) pieces as they come, tool calls in one line, the final line."""
    streamed: set[str] = set()
    try:
        async for part in parts:
            if isinstance(part, Completed):
                whole = _payload(part, key)
                if key == "message":  # what was not streamed yet: tool calls, text read whole
                    whole = {**whole, "content": "" if "text" in streamed else whole["content"]}
                    if "reasoning" in streamed:
                        whole.pop("thinking", None)
                    if whole["content"] or whole.get("thinking") or whole.get("tool_calls"):
                        yield json.dumps(_stamp(req.model, message=whole, done=False)) + "\n"
                elif whole and "text" not in streamed:
                    yield json.dumps(_stamp(req.model, response=whole, done=False)) + "\n"
                last = {"role": "assistant", "content": ""} if key == "message" else ""
                yield json.dumps(_stamp(req.model, **{key: last}, **_final(reply, part))) + "\n"
            elif part.kind in ("text", "reasoning") and part.text:
                streamed.add(part.kind)
                yield json.dumps(_stamp(req.model, **_piece(part.kind, part.text, key), done=False)) + "\n"
    except ApiError as exc:
        yield json.dumps(error_body(exc)) + "\n"
    finally:
        await parts.aclose()  # a client that went away frees its slot now


def _piece(kind: str, text: str, key: str) -> dict[str, Any]:
    """One streamed piece: answer text in `content` / `response`, reasoning in `thinking`."""
    answer, thinking = (text, None) if kind == "text" else ("", text)
    if key == "message":
        message = {"role": "assistant", "content": answer}
        return {"message": {**message, "thinking": thinking} if thinking else message}
    return {"response": answer, "thinking": thinking} if thinking else {"response": answer}


def _details(quant: str | None, family: str = "", parameters: int = 0) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": _size_label(parameters) if parameters else "",
        "quantization_level": quant or "",
    }


def _size_label(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _running(managed: Any) -> dict[str, Any]:
    """One loaded model as /api/ps shows it: when it unloads, its memory, its context."""
    status, info = managed.status(), managed.info
    expires = status["expires_at"]  # None: in use or kept forever
    return {
        "name": managed.name,
        "model": managed.name,
        "size": status["memory"],
        "digest": "",
        "details": _details(info.quant, info.architecture, info.n_params),
        "expires_at": _iso(expires) if expires else (datetime.now(UTC) + timedelta(days=365)).isoformat(),
        "size_vram": status["memory"] if status["layers_offloaded"] else 0,
        "context_length": status["context"],
    }


def _tags(served: Served) -> list[dict[str, Any]]:
    """Every model the server can serve (loaded or not), as the model manager lists them."""
    from selfhost.models.names import split_tag

    loaded = served.manager.loaded
    models = []
    for row in served.manager.listing():
        managed = loaded.get(row["id"])
        info = managed.info if managed is not None else None
        quant = split_tag(row["id"])[1]  # unloaded: what its name says
        details = _details(info.quant, info.architecture, info.n_params) if info else _details(quant)
        modified = _iso(info.path.stat().st_mtime) if info else datetime.now(UTC).isoformat()
        models.append({"name": row["id"], "model": row["id"], "modified_at": modified,
                       "size": row.get("size") or 0, "digest": "", "details": details})  # fmt: skip
    return models


def _show(source: Any, kind: str | None) -> dict[str, Any]:
    """/api/show of a GGUF (its info when loaded, else its path): template, details, capabilities."""
    from selfhost.runtime import gguf_info
    from selfhost.runtime.template import ChatTemplate

    info = source if not isinstance(source, Path) else gguf_info.inspect(source)
    embedding = kind == "embedding" or not info.chat_template
    capabilities = ["embedding"] if embedding else ["completion"]
    if info.chat_template and ChatTemplate(info.chat_template).supports_tools:
        capabilities.append("tools")
    arch = info.architecture
    model_info = {
        "general.architecture": arch,
        "general.parameter_count": info.n_params,
        f"{arch}.context_length": info.context_length,
        f"{arch}.embedding_length": info.embedding_length,
        f"{arch}.block_count": info.n_layers,
    }
    return {
        "modelfile": "",
        "parameters": "",
        "template": info.chat_template or "",
        "details": _details(info.quant, arch, info.n_params),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": _iso(info.path.stat().st_mtime),
    }


def _pull_lines(ref: str) -> Iterator[str]:
    """`selfhost pull` as Ollama's NDJSON progress (run in a thread by the streaming response)."""
    from selfhost.events import Notice, Progress, Result
    from selfhost.models.pull import pull

    try:
        for event in pull(ref):
            if isinstance(event, Notice):
                yield json.dumps({"status": event.message}) + "\n"
            elif isinstance(event, Progress):
                line = {
                    "status": f"pulling {event.task}",
                    "digest": event.detail or event.task,
                    "completed": int(event.done),
                }
                if event.total is not None:
                    line["total"] = int(event.total)
                yield json.dumps(line) + "\n"
            elif isinstance(event, Result):
                yield json.dumps({"status": "success"}) + "\n"
    except SelfhostError as exc:
        yield json.dumps({"error": str(exc)}) + "\n"
