"""The web chat page of `selfhost serve`: static files at `/` and its JSON API under `/ui/api/`.

The page is the browser face of the REPL: every conversation it has is a ChatSession over the
served model, logged to the same SQLite history as `selfhost chat` (so `selfhost history` lists
what the page wrote and the page continues what the REPL wrote). The reply is one job in the
model's BatchEngine, like every other request of the server; it is streamed as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.gzip import GZipMiddleware

from selfhost.chat.history import ChatLog, HistoryStore
from selfhost.chat.messages import Message, ReasoningChunk, TextChunk
from selfhost.chat.session import ChatSession, PreparedReply, Sampling
from selfhost.errors import HistoryBusyError, HistoryError, NotFoundError, UsageError
from selfhost.runtime.jobs import JobEnd, JobText, QueueFullError
from selfhost.serve.service import ApiError, Service

if TYPE_CHECKING:
    from selfhost.serve.manager import ModelManager

WEB = Path(__file__).parent / "web"
# The page runs only its own files: no inline script, nothing from elsewhere, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class UiSampling(BaseModel):
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None


class UiChatRequest(BaseModel):
    """One turn from the page: send a message, regenerate the last reply, or edit the last message."""

    conversation_id: int | None = None
    action: Literal["send", "regenerate", "edit"] = "send"
    content: str | None = None
    system: str | None = None  # None: keep the conversation's
    sampling: UiSampling = Field(default_factory=UiSampling)
    json_schema: dict[str, Any] | None = None  # JSON-schema mode: the reply is constrained to it
    model: str | None = None


class UiUpdate(BaseModel):
    title: str | None = Field(None, max_length=1000)
    system: str | None = None


Release = Callable[[], None]
Acquire = Callable[[str | None], Awaitable[tuple[Service, Release]]]


def managed_models(manager: ModelManager) -> Acquire:
    """The page's model through the server's model manager: loaded on first use, held until the reply
    ends (a model that fails to load is the manager's one-line error)."""

    async def acquire(name: str | None) -> tuple[Service, Release]:
        managed = await manager.acquire(name or None, "chat")
        if managed.service is None:  # pragma: no cover - the manager gives chat models for "chat"
            manager.release(managed)
            raise ApiError(400, f"{managed.name} cannot chat", code="model_not_chat", param="model")
        return managed.service, lambda: manager.release(managed)

    return acquire


def register(app: FastAPI, acquire: Acquire, auth: Callable[..., Any]) -> None:
    """Add the page and its API to the server's app. `acquire(model)` gives the Service of a model and
    its release (called when the reply ends); `auth` is the API-key check of /v1."""
    guarded = [Depends(auth)]
    # the assets gzipped (~3.5x smaller); only here, never around the API's streams
    app.mount("/ui/static", GZipMiddleware(StaticFiles(directory=WEB), minimum_size=1024), name="ui-static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers=PAGE_HEADERS)

    @app.get("/ui/api/conversations", dependencies=guarded)
    async def conversations(q: str = "", limit: int = 200) -> dict[str, Any]:
        return {"data": await run_in_threadpool(_history, _listing, q.strip(), min(max(limit, 1), 1000))}

    @app.get("/ui/api/conversations/{conversation_id}", dependencies=guarded)
    async def conversation(conversation_id: int) -> dict[str, Any]:
        found = await run_in_threadpool(_history, lambda store: store.get(conversation_id))
        hidden = {"messages": {"__all__": {"tool_calls", "tool_call_id"}}}
        return found.model_dump(mode="json", exclude=hidden)

    @app.patch("/ui/api/conversations/{conversation_id}", dependencies=guarded)
    async def update(conversation_id: int, body: UiUpdate) -> dict[str, Any]:
        def change(store: HistoryStore) -> None:
            store.update(conversation_id, title=body.title, system=body.system)

        await run_in_threadpool(_history, change)
        return {"ok": True}

    @app.delete("/ui/api/conversations/{conversation_id}", dependencies=guarded)
    async def delete(conversation_id: int) -> dict[str, Any]:
        await run_in_threadpool(_history, lambda store: store.delete(conversation_id))
        return {"ok": True}

    @app.get("/ui/api/conversations/{conversation_id}/export", dependencies=guarded)
    async def export(conversation_id: int) -> PlainTextResponse:
        from selfhost.chat.export import to_markdown

        found = await run_in_threadpool(_history, lambda store: store.get(conversation_id))
        headers = {"Content-Disposition": f'attachment; filename="conversation-{conversation_id}.md"'}
        return PlainTextResponse(to_markdown(found), media_type="text/markdown", headers=headers)

    @app.post("/ui/api/chat", dependencies=guarded)
    async def chat(body: UiChatRequest) -> EventSourceResponse:
        service, release = await acquire(body.model)
        try:
            session, prepared = await run_in_threadpool(_plan, service, body)
            job = service.model.engine.submit(prepared.job)
        except QueueFullError as exc:
            release()
            raise ApiError(503, f"the server is busy: {exc}", type="server_error", code="queue_full") from exc
        except BaseException:
            release()
            raise
        return EventSourceResponse(_events(session, prepared, job, release), ping=15, sep="\n")


# ------------------------------------------------------------------ history
def _history(work: Callable[[HistoryStore], Any], *args: Any) -> Any:
    """Run `work` on a store opened in this thread (SQLite connections belong to their thread)."""
    store = HistoryStore()
    try:
        return work(store, *args)
    except NotFoundError as exc:
        raise ApiError(404, str(exc), code="not_found") from exc
    except HistoryBusyError as exc:
        raise ApiError(503, str(exc), type="server_error", code="history_busy") from exc
    except HistoryError as exc:
        raise ApiError(500, str(exc), type="server_error", code="history_error") from exc
    finally:
        store.close()


def _listing(store: HistoryStore, q: str, limit: int) -> list[dict[str, Any]]:
    """The conversation list, newest first; with `q`, the conversations whose title or text has it."""
    rows = store.list()
    if not q:
        return [r.model_dump(mode="json") for r in rows[:limit]]
    snippets: dict[int, str] = {}
    for hit in store.search(q, limit=500):
        snippets.setdefault(hit.conversation_id, hit.snippet)
    wanted = q.lower()
    found = [
        {**r.model_dump(mode="json"), "snippet": snippets.get(r.id)}
        for r in rows
        if r.id in snippets or wanted in r.title.lower()
    ]
    return found[:limit]


# ------------------------------------------------------------------ one turn
def _plan(service: Service, body: UiChatRequest) -> tuple[ChatSession, PreparedReply]:
    """The session of the conversation with the new turn in it, saved, and the job of its reply."""
    if service.model.template is None:
        raise ApiError(400, f"{service.model_id} has no chat template, so it cannot chat", param="model")
    store = HistoryStore()
    try:
        session = _session(service, body, store)
        _apply(session, body)
        session.save()  # the conversation exists (and has an id) before the reply starts
        return session, session.prepare(trim=True)
    except UsageError as exc:
        context = "does not fit" in str(exc)
        raise ApiError(400, str(exc), code="context_length_exceeded" if context else None) from exc
    except NotFoundError as exc:
        raise ApiError(404, str(exc), code="not_found") from exc
    except HistoryError as exc:
        raise ApiError(500, str(exc), type="server_error", code="history_error") from exc
    finally:
        store.close()  # reopened by the thread that records the reply


def _session(service: Service, body: UiChatRequest, store: HistoryStore) -> ChatSession:
    sampling = Sampling(**body.sampling.model_dump(exclude_none=True))  # unset: the REPL's defaults
    session = ChatSession(
        service.model, sampling=sampling, schema=body.json_schema, log=ChatLog(store, body.conversation_id)
    )
    if body.conversation_id is not None:
        session.load_conversation(store.get(body.conversation_id))
    if body.system is not None:
        session.system = body.system or None
    return session


def _apply(session: ChatSession, body: UiChatRequest) -> None:
    """Put the turn into the session's messages: a new message, a retry, or an edited last message."""
    messages = session.messages
    if body.action == "send":
        if not (body.content or "").strip():
            raise ApiError(400, "the message is empty", param="content")
    elif messages and messages[-1].role == "assistant":
        messages.pop()  # regenerate/edit replace the last reply
    if body.action == "edit":
        if not messages or messages[-1].role != "user" or not (body.content or "").strip():
            raise ApiError(400, "there is no last message to edit, or the new text is empty", param="content")
        messages.pop()
    if body.action in ("send", "edit"):
        text = body.content or ""
        messages.append(Message(role="user", content=text, tokens=session.model.count_tokens(text)))
    elif not messages or messages[-1].role != "user":
        raise ApiError(400, "there is no message to answer again", param="action")


def _event(kind: str, **data: Any) -> dict[str, str]:
    return {"data": json.dumps({"type": kind, **data})}


_finishing: set[asyncio.Task] = set()  # replies stopped by the page, recorded once their job ends


async def _events(
    session: ChatSession, prepared: PreparedReply, job: Any, release: Release
) -> AsyncIterator[dict[str, str]]:
    """start, the reply's deltas, then done (the turn as recorded, with its usage) or error."""
    end: JobEnd | None = None
    try:
        yield _event("start", conversation_id=session.log.conversation_id, title=session.title)
        async for item in job.achunks():
            if isinstance(item, JobText):  # the model family's parser splits reasoning from the answer
                for chunk in prepared.parser.feed(item.text):
                    if event := _chunk_event(chunk):
                        yield event
            elif isinstance(item, JobEnd):
                end = item
                for chunk in prepared.parser.finish():
                    if event := _chunk_event(chunk):
                        yield event
    finally:
        if end is None:  # the page stopped (Esc) or went away: stop at the next step, keep what was said
            job.cancel()
            task = asyncio.ensure_future(_record_when_ended(session, prepared, job, release))
            _finishing.add(task)
            task.add_done_callback(_finishing.discard)
    assert end is not None  # the loop ends on JobEnd, or the finally above has run
    try:
        recorded = await run_in_threadpool(_record, session, prepared, end)
    finally:
        release()
    if end.finish_reason == "error":
        yield _event("error", message=f"the model failed: {end.error or 'generation failed'}")
    else:
        yield _event("done", **recorded)


def _chunk_event(chunk: Any) -> dict[str, str] | None:
    """A parsed piece of the reply as the page's event: answer text or reasoning (tool calls: none here)."""
    if isinstance(chunk, TextChunk):
        return _event("delta", content=chunk.text)
    if isinstance(chunk, ReasoningChunk):
        return _event("reasoning", content=chunk.text)
    return None


async def _record_when_ended(
    session: ChatSession, prepared: PreparedReply, job: Any, release: Release
) -> None:
    try:
        async for item in job.achunks():
            if isinstance(item, JobEnd):
                await run_in_threadpool(_record, session, prepared, item)
    finally:
        release()


def _record(session: ChatSession, prepared: PreparedReply, end: JobEnd) -> dict[str, Any]:
    """Record the reply in the session and the history (the REPL's own path); what the page shows."""
    try:
        done = session.record(prepared, end)
    finally:
        if session.log.store is not None:
            session.log.store.close()
    return {
        "conversation_id": session.log.conversation_id,
        "message": done.message.model_dump(
            mode="json", include={"id", "content", "reasoning", "tokens", "finish_reason"}
        ),
        "usage": done.usage.model_dump(mode="json"),
        "schema_valid": done.schema_valid,
        "schema_error": done.schema_error,
        "unsaved": str(session.unsaved) if session.unsaved else None,
    }


class OriginCheck:
    """A browser's cross-site request that changes state (POST, PATCH, DELETE, PUT) is refused (403)
    unless its Origin was allowed with --cors-origin; non-browser clients send no Origin. Plain ASGI:
    an http middleware of Starlette's would hide a client's disconnect from the endpoints."""

    def __init__(self, app: Any, allowed: list[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = dict(scope.get("headers") or [])
            origin = headers.get(b"origin", b"").decode("latin-1")
            own = f"{scope.get('scheme', 'http')}://{headers.get(b'host', b'').decode('latin-1')}"
            if origin and origin != own and origin not in self.allowed and "*" not in self.allowed:
                error = ApiError(403, f"cross-site request from {origin} refused", code="cross_site")
                await JSONResponse(error.body(), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
