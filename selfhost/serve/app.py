"""The HTTP layer of `selfhost serve`: FastAPI routes in OpenAI's shapes, auth, limits, SSE.

Everything a request means is decided in selfhost/serve/service.py; this module parses, checks the
API key, streams chunks as server-sent events (sse-starlette) and turns every error into OpenAI's
error object with a 4xx status -- never a traceback.
"""

from __future__ import annotations

import asyncio
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

from selfhost.runtime.batch import JobEnd, JobText, QueueFullError
from selfhost.runtime.embed import Embedder
from selfhost.serve.manager import ModelManager
from selfhost.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from selfhost.serve.service import ApiError, Completed, Planned, Service


def create_app(
    manager: ModelManager,
    *,
    api_key: str | None = None,
    max_body: int = 8 * 2**20,
    shutdown_grace: float = 8.0,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    from selfhost.serve import ui

    app = FastAPI(title="selfhost", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ui.OriginCheck, allowed=cors_origins or [])
    if cors_origins:  # closed by default: no CORS headers, so other sites' pages cannot read replies
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodyLimit, limit=max_body)
    _error_handlers(app)
    auth = Depends(_auth_check(api_key))
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
        return await _serve(manager, req, request, shutdown_grace, "chat")

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await _serve(manager, req, request, shutdown_grace, "text")

    @app.post("/v1/embeddings", dependencies=[auth])
    async def embeddings(req: EmbeddingRequest) -> Any:
        manager.check_keep_alive(req.keep_alive)
        managed = await manager.acquire(req.model, "embedding")
        try:
            return await run_in_threadpool(_embed, managed.embedder_for(), req)
        finally:
            manager.release(managed, req.keep_alive)

    return app


# ------------------------------------------------------------------ responses
async def _serve(
    manager: ModelManager, req: Any, request: Request, grace: float, kind: str
) -> Any:
    """One completion: the model the request names (loaded if needed), held until the reply ends."""
    manager.check_keep_alive(req.keep_alive)
    managed = await manager.acquire(req.model, "chat")
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            manager.release(managed, req.keep_alive)

    try:
        service = managed.service
        assert service is not None
        plan = service.plan_chat if kind == "chat" else service.plan_text
        planned = await run_in_threadpool(plan, req)
        response = await _respond(service, planned, request, req.stream, req.include_usage(), grace, release)
    except BaseException:
        release()
        raise
    if not req.stream:
        release()  # a stream releases when it ends
    return response


async def _respond(
    service: Service,
    planned: Planned,
    request: Request,
    stream: bool,
    include_usage: bool,
    grace: float,
    release: Any,
) -> Any:
    try:
        job = service.model.engine.submit(planned.prepared.job)
    except QueueFullError as exc:
        release()
        raise ApiError(503, f"the server is busy: {exc}", type="server_error", code="queue_full") from exc
    if stream:
        # on SIGINT/SIGTERM a reply in flight gets `grace` seconds to finish, then it is cancelled
        events = _events(service, planned, job, include_usage, release)
        return EventSourceResponse(events, ping=15, sep="\n", shutdown_grace_period=grace)
    end: JobEnd | None = None
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        async for chunk in job.achunks():
            if isinstance(chunk, JobEnd):
                end = chunk
    finally:
        watcher.cancel()
        if end is None:  # cancelled (shutdown): free the slot
            job.cancel()
    assert end is not None
    if end.finish_reason == "cancelled" and await request.is_disconnected():
        return None  # nobody to answer
    result = await run_in_threadpool(service.finish, planned, end)
    return _completion(service, planned, result)


async def _cancel_on_disconnect(request: Request, job: Any) -> None:
    """A non-streaming client that hangs up frees its slot too (checked twice a second)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    job.cancel()


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
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    choice = {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": result.usage}


async def _events(
    service: Service, planned: Planned, job: Any, include_usage: bool, release: Any
) -> AsyncIterator[dict]:
    """SSE events: deltas as they come, the finish, usage if asked, then [DONE]. Tool replies come whole."""
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

    try:
        holding = planned.tools.mode != "none"  # a tool call is parsed from the whole reply
        end: JobEnd | None = None
        try:
            if not text_kind:
                yield chunk({"role": "assistant", "content": ""})
            async for item in job.achunks():
                if isinstance(item, JobText) and not holding:
                    yield chunk(item.text if text_kind else {"content": item.text})
                elif isinstance(item, JobEnd):
                    end = item
        finally:
            if end is None:  # client disconnected or server shutting down: free the slot at the next step
                job.cancel()
        result = await run_in_threadpool(service.finish, planned, end)
        if holding:
            delta: dict[str, Any] = {"content": result.content}
            if result.tool_calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(result.tool_calls)]
            yield chunk(delta)
        yield chunk("" if text_kind else {}, result.finish_reason)
        if include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": result.usage})}
        yield {"data": "[DONE]"}
    finally:
        release()  # the model may unload (keep_alive) only once the stream is over


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
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(
                401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key"
            )

    return check


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413), declared or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(send, ApiError(413, f"the request body is over {self.limit} bytes"))
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


async def _send_error(send: Any, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        else:
            message = f"{where or 'body'}: {first['msg']}"
        return JSONResponse(ApiError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            ApiError(exc.status_code, str(exc.detail), code=kind).body(), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)  # the server's log, never the client
        message = f"internal error: {type(exc).__name__}"
        return JSONResponse(ApiError(500, message, type="server_error").body(), status_code=500)
