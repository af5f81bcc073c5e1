"""What every protocol adapter shares: the serving context, and running one planned reply.

Each protocol (OpenAI in app.py, Anthropic, Responses, Ollama) only translates: its request into a
ChatCompletionRequest (Service.plan_chat, the one generation path), and the stream below back into
its own shapes: the model family parser's typed chunks as they come (`kind` "text": the answer;
"reasoning": a thinking model's reasoning; "tool_call": pieces of calls), then the Completed result
(answer, reasoning, tool calls, usage). The adapters take tool calls whole from the result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from selfhost.chat.messages import ReplyChunk
from selfhost.chat.model import ChatModel
from selfhost.runtime.jobs import Job, JobEnd, JobText, QueueFullError
from selfhost.serve.manager import Managed, ModelManager
from selfhost.serve.schemas import ChatCompletionRequest, CompletionRequest
from selfhost.serve.service import ApiError, Completed, Planned, Service

# an error body per URL prefix (Anthropic's, Ollama's); OpenAI's error object elsewhere
ErrorShape = Callable[[ApiError], dict[str, Any]]


@dataclass
class Served:
    """What a protocol module needs to register its routes."""

    manager: ModelManager  # every local model, loaded on demand
    auth: Any  # a FastAPI dependency checking the API key
    grace: float = 8.0
    error_shapes: list[tuple[str, ErrorShape]] = field(default_factory=list)


def chat_request(data: dict[str, Any], where: str = "") -> ChatCompletionRequest:
    """A protocol's request translated to the internal chat request; a bad field is a 400."""
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(400, f"{where}{loc}: {first['msg']}", param=loc or None) from exc


@dataclass
class Reply:
    """One request's reply: the service (loaded model) that runs it, its plan, and its job once started."""

    service: Service
    planned: Planned
    release: Callable[[], None]  # hands the model back to the manager (keep_alive starts); once
    job: Job | None = None

    @property
    def model_id(self) -> str:
        return self.service.model_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.planned.prepared.job.prompt)


async def plan(served: Served, req: ChatCompletionRequest | CompletionRequest) -> Reply:
    """Plan a request on the service of the model it names (loaded if needed, held until released)."""
    manager = served.manager
    manager.check_keep_alive(req.keep_alive)
    managed = await manager.acquire(req.model, "chat")
    release = _once(manager, managed, req.keep_alive)
    try:
        service = managed.service
        assert service is not None
        planner = service.plan_chat if isinstance(req, ChatCompletionRequest) else service.plan_text
        return Reply(service, await run_in_threadpool(planner, req), release)
    except BaseException:
        release()
        raise


@contextlib.asynccontextmanager
async def chat_model(served: Served, name: str | None) -> AsyncIterator[ChatModel]:
    """The chat model a request names (loaded if needed), held while it is used."""
    manager = served.manager
    managed = await manager.acquire(name, "chat")
    try:
        assert managed.chat is not None
        yield managed.chat
    finally:
        manager.release(managed)


def _once(manager: ModelManager, managed: Managed, keep_alive: str | float | None) -> Callable[[], None]:
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            manager.release(managed, keep_alive)

    return release


def start(reply: Reply) -> Reply:
    """Submit the job now, so a full queue is a 503 before any streaming starts."""
    try:
        reply.job = reply.service.model.engine.submit(reply.planned.prepared.job)
    except QueueFullError as exc:
        reply.release()
        raise ApiError(503, f"the server is busy: {exc}", type="server_error", code="queue_full") from exc
    return reply


def discard(reply: Reply) -> None:
    """A planned reply that is never run (count_tokens, apply-template): close its history, release."""
    store = reply.planned.session.log.store
    if store is not None:
        store.close()
    reply.release()


Part = ReplyChunk | Completed  # what `stream` yields; adapters read a chunk's `kind`


async def stream(reply: Reply) -> AsyncGenerator[Part, None]:
    """Reply chunks as they come, then the Completed result."""
    job, end = reply.job, None
    assert job is not None, "start the reply first"
    try:
        async for item in job.achunks():  # through the model family's parser: answer, reasoning, calls
            if isinstance(item, JobText | JobEnd):
                end = item if isinstance(item, JobEnd) else None
                for piece in reply.service.deltas(reply.planned, item.text if end is None else None):
                    yield piece
        result = await run_in_threadpool(reply.service.finish, reply.planned, end)
    finally:
        if end is None:  # client disconnected or server shutting down: free the slot at the next step
            job.cancel()
        reply.release()  # the model may unload (keep_alive) only once the reply is over
    yield result


async def collect(reply: Reply, request: Request) -> Completed | None:
    """The whole reply; None when the client hung up (its slot is freed)."""
    job, end = reply.job, None
    assert job is not None, "start the reply first"
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        async for chunk in job.achunks():
            if isinstance(chunk, JobEnd):
                end = chunk
        assert end is not None
        if end.finish_reason == "cancelled" and await request.is_disconnected():
            return None
        return await run_in_threadpool(reply.service.finish, reply.planned, end)
    finally:
        watcher.cancel()
        if end is None:
            job.cancel()
        reply.release()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """A non-streaming client that hangs up frees its slot too (checked twice a second)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    job.cancel()


def reasoning(result: Completed) -> str | None:
    """The reply's reasoning text (thinking models), apart from the answer."""
    return result.reasoning or None
