"""The HTTP layer of `selfhost serve`: FastAPI routes in OpenAI's shapes, auth, limits, SSE.

Everything a request means is decided in selfhost/serve/service.py; this module parses, checks the
API key, streams chunks as server-sent events (sse-starlette) and turns every error into OpenAI's
error object with a 4xx status -- never a traceback.
"""

from __future__ import annotations

import base64
import hmac
import json
import struct
import sys
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfhost.chat.messages import ReasoningChunk, ReplyChunk, ToolCallChunk
from selfhost.runtime.embed import Embedder
from selfhost.runtime.jobs import JobEnd, JobText
from selfhost.serve import runner
from selfhost.serve.manager import ModelManager
from selfhost.serve.runner import Served
from selfhost.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from selfhost.serve.service import ApiError, Completed, Planned, Service


def create_app(
    manager: ModelManager,
    *,
    api_key: str | None = None,
    max_body: int = 8 * 2**20,
    shutdown_grace: float = 8.0,
    metrics_public: bool = False,
    reranker: Embedder | None = None,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    from selfhost.serve import anthropic, metrics, ollama, rerank, responses, tools, ui

    app = FastAPI(title="selfhost", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ui.OriginCheck, allowed=cors_origins or [])
    if cors_origins:  # closed by default: no CORS headers, so other sites' pages cannot read replies
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"],
        )
    auth = Depends(_auth_check(api_key))
    served = Served(manager, auth, shutdown_grace)
    app.add_middleware(BodyLimit, limit=max_body, shapes=served.error_shapes)
    _error_handlers(app, served)
    started = int(time.time())
    ui.register(app, ui.managed_models(manager), _auth_check(api_key))  # the chat page at /, /ui/api

    @app.get("/health")
    async def health() -> dict[str, Any]:
        models = manager.status()["models"]
        return {
            "status": "ok",
            "model": manager.default,
            "models_loaded": len(models),
            "slots": sum(m["slots"] for m in models),
            "slots_busy": sum(m["slots_busy"] for m in models),
            "queued": sum(m["queued"] for m in models),
        }

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        entry = {"object": "model", "owned_by": "selfhost", "created": started}
        rows = await run_in_threadpool(manager.listing)
        return {"object": "list", "data": [{**entry, **row} for row in rows]}

    @app.get("/v1/status", dependencies=[auth])
    async def status() -> dict[str, Any]:
        return manager.status()

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        return await _serve(served, req, request)

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await _serve(served, req, request)

    @app.post("/v1/embeddings", dependencies=[auth])
    async def embeddings(req: EmbeddingRequest) -> Any:
        manager.check_keep_alive(req.keep_alive)
        managed = await manager.acquire(req.model, "embedding")
        try:
            return await run_in_threadpool(_embed, managed.embedder_for(), req)
        finally:
            manager.release(managed, req.keep_alive)

    # the other protocols: thin translations over the same services (one module each)
    for protocol in (anthropic, responses, ollama, tools):
        protocol.register(app, served)
    rerank.register(app, served, reranker)
    metrics.register(app, served, public=metrics_public)
    return app


# ------------------------------------------------------------------ responses
async def _serve(served: Served, req: ChatCompletionRequest | CompletionRequest, request: Request) -> Any:
    """One completion: the model the request names (loaded if needed), held until the reply ends."""
    reply = runner.start(await runner.plan(served, req))
    if req.stream:
        # on SIGINT/SIGTERM a reply in flight gets `grace` seconds to finish, then it is cancelled
        events = _events(reply, req.include_usage())
        return EventSourceResponse(events, ping=15, sep="\n", shutdown_grace_period=served.grace)
    result = await runner.collect(reply, request)
    if result is None:
        return None  # nobody to answer
    return _completion(reply.service, reply.planned, result)


def _completion(service: Service, planned: Planned, result: Completed) -> dict[str, Any]:
    head = {"id": planned.id, "created": planned.created, "model": service.model_id}
    if planned.kind == "text":
        choice = {
            "index": 0,
            "text": result.content or "",
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }
        return {**head, "object": "text_completion", "choices": [choice], "usage": result.usage}
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    choice = {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": result.usage}


async def _events(reply: runner.Reply, include_usage: bool) -> AsyncIterator[dict]:
    """SSE events: deltas as they come (reasoning_content, content, tool_calls as OpenAI streams them),
    the finish, usage if asked, then [DONE]."""
    service, planned, job = reply.service, reply.planned, reply.job
    assert job is not None
    text_kind = planned.kind == "text"
    head = {
        "id": planned.id,
        "created": planned.created,
        "model": service.model_id,
        "object": "text_completion" if text_kind else "chat.completion.chunk",
    }

    def chunk(delta: dict[str, Any] | str, finish: str | None = None) -> dict[str, str]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"text": delta} if text_kind else {"delta": delta})
        return {"data": json.dumps({**head, "choices": [choice]})}

    end: JobEnd | None = None
    try:
        try:
            if not text_kind:
                yield chunk({"role": "assistant", "content": ""})
            async for item in job.achunks():
                if isinstance(item, JobText | JobEnd):
                    end = item if isinstance(item, JobEnd) else None
                    for piece in service.deltas(planned, item.text if end is None else None):
                        yield chunk(piece.text if text_kind else _delta(piece))  # type: ignore[union-attr]
        finally:
            if end is None:  # client disconnected or server shutting down: free the slot at the next step
                job.cancel()
        result = await run_in_threadpool(service.finish, planned, end)
        yield chunk("" if text_kind else {}, result.finish_reason)
        if include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": result.usage})}
        yield {"data": "[DONE]"}
    finally:
        reply.release()  # the model may unload (keep_alive) only once the stream is over


def _delta(piece: ReplyChunk) -> dict[str, Any]:
    """One parser chunk as an OpenAI chat delta."""
    if isinstance(piece, ReasoningChunk):
        return {"reasoning_content": piece.text}
    if isinstance(piece, ToolCallChunk):
        call: dict[str, Any] = {"index": piece.index, "function": {"arguments": piece.arguments}}
        if piece.id is not None:
            call.update(id=piece.id, type="function")
            call["function"]["name"] = piece.name
        return {"tool_calls": [call]}
    return {"content": piece.text}


def _embed(embedder: Embedder, req: EmbeddingRequest) -> dict[str, Any]:
    data, total = [], 0
    for i, text in enumerate(req.inputs()):
        tokens = embedder.tokens(text)
        try:
            vector = embedder.embed(tokens)
        except Exception as exc:
            raise ApiError(400, f"input[{i}]: {exc}", param="input") from exc
        if req.dimensions is not None:
            vector = vector[: req.dimensions]
        encoded: list[float] | str = vector
        if req.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
        total += len(tokens)
    return {
        "object": "list",
        "data": data,
        "model": embedder.name,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }


# --------------------------------------------------------------- auth, limits
def _auth_check(api_key: str | None) -> Any:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send `x-api-key: KEY`
            token = request.headers.get("x-api-key", "")
        if not token or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(
                401,
                "missing or wrong API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
                code="invalid_api_key",
            )

    return check


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413), declared or streamed."""

    def __init__(self, app: Any, limit: int, shapes: list | None = None) -> None:
        self.app, self.limit, self.shapes = app, limit, shapes or []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            error = ApiError(413, f"the request body is over {self.limit} bytes")
            shape = next((s for prefix, s in self.shapes if scope["path"].startswith(prefix)), ApiError.body)
            await _send_error(send, error, shape)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Any, error: ApiError, shape: Any = ApiError.body) -> None:
    body = json.dumps(shape(error)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_handlers(app: FastAPI, served: Served) -> None:
    def respond(request: Request, exc: ApiError) -> JSONResponse:
        """The error in the shape of the protocol the path belongs to (OpenAI's by default)."""
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        path = request.url.path
        shape = next((s for prefix, s in served.error_shapes if path.startswith(prefix)), ApiError.body)
        return JSONResponse(shape(exc), status_code=exc.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        else:
            message = f"{where or 'body'}: {first['msg']}"
        return respond(request, ApiError(400, message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        return respond(request, ApiError(exc.status_code, str(exc.detail), code=kind))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)  # the server's log, never the client
        message = f"internal error: {type(exc).__name__}"
        return respond(request, ApiError(500, message, type="server_error"))
