"""The job stream of the batch engine: a `Job` goes in, `JobText` chunks and one `JobEnd` come out.

Every reply, in the REPL, in one-shot mode and in the server, is a `Job`. Its consumer reads the
chunks either synchronously (`chunks()`, which drives an inline engine itself) or from asyncio
(`achunks()`, while the engine runs on its own thread).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from selfhost.errors import SelfhostError
from selfhost.runtime.sampler import SamplingParams

if TYPE_CHECKING:
    from selfhost.runtime.batch import BatchEngine

JobFinish = Literal["stop", "length", "context", "cancelled", "error"]


class QueueFullError(SelfhostError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class JobText:
    """Text decoded from the reply so far (stop strings already cut out)."""

    text: str


@dataclass
class JobEnd:
    """The last chunk of a job: why it ended and what it cost."""

    finish_reason: JobFinish
    text: str
    generated_tokens: int
    prompt_tokens: int
    reused_tokens: int  # prompt prefix found in the slot's KV cache
    queued_s: float
    time_to_first_token_s: float
    total_s: float
    error: str | None = None
    context_used: int = 0  # tokens of this job in its slot's KV cache at the end
    drafted_tokens: int = 0  # speculative decoding: tokens drafted for this job
    accepted_tokens: int = 0  # ... and of those, the ones the model kept
    restored_tokens: int = 0  # of reused_tokens, those restored from the prompt cache
    stop_sequence: str | None = None  # the job's stop string that ended it (finish_reason "stop")


JobChunk = JobText | JobEnd


@dataclass
class Job:
    """One generation request: prompt tokens in, text chunks and one JobEnd out."""

    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int  # the engine also stops at the slot's context end ("context")
    grammar: str | None = None  # GBNF text, root rule "root"
    stop: list[str] = field(default_factory=list)
    special: bool = False  # render control tokens as text (chat markers: <|channel|>, [TOOL_CALLS])
    id: int = field(default_factory=itertools.count(1).__next__)
    cancelled: bool = False
    end: JobEnd | None = None
    t_submit: float = 0.0
    _chunks: deque[JobChunk] = field(default_factory=deque)
    _engine: BatchEngine | None = None
    _waker: Any = None  # (loop, asyncio.Event) of an async consumer

    def cancel(self) -> None:
        """Stop generating at the next step (a client went away, Ctrl-C, shutdown)."""
        self.cancelled = True
        if self._engine is not None:
            self._engine.wake()

    def chunks(self) -> Iterator[JobChunk]:
        """Chunks as they come; in inline mode this drives the engine itself."""
        engine = self._engine
        assert engine is not None, "submit the job first"
        while not (yield from self._drain()):
            engine.wait_for(self)

    async def achunks(self) -> AsyncIterator[JobChunk]:
        """The same chunks for an asyncio consumer (the engine runs on its thread)."""
        event = asyncio.Event()
        self._waker = (asyncio.get_running_loop(), event)
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                yield chunk
                if isinstance(chunk, JobEnd):
                    return
            await event.wait()  # async generators cannot `yield from`: the loop above mirrors _drain
            event.clear()

    def _drain(self) -> Generator[JobChunk, None, bool]:
        """Yield the chunks ready now; return True once the last one (JobEnd) went out."""
        while self._chunks:
            chunk = self._chunks.popleft()
            yield chunk
            if isinstance(chunk, JobEnd):
                return True
        return False

    def _emit(self, chunk: JobChunk) -> None:
        self._chunks.append(chunk)
        if self._waker is not None:
            loop, event = self._waker
            loop.call_soon_threadsafe(event.set)
