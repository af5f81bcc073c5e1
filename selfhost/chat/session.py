"""ChatSession: one conversation with a ChatModel, and its history log.

The REPL, one-shot mode and the server all talk to a model through a session: it renders the
conversation with the model's template, fits it into the slot's context (trimming the oldest turns
in a chat, refusing in the server, where the client owns the history), builds the job (sampling,
grammar, stop strings), streams the reply as typed chunks, records it with its measured usage and
writes the conversation to the history database when there is a log.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfhost.chat.context import fit_window, reply_reserve
from selfhost.chat.history import ChatLog
from selfhost.chat.messages import (
    Chunk,
    Conversation,
    DoneChunk,
    FinishReason,
    Message,
    TextChunk,
    TrimChunk,
    Usage,
    conversation_title,
)
from selfhost.chat.model import ChatModel
from selfhost.chat.schema import grammar_for
from selfhost.errors import HistoryError, UsageError
from selfhost.runtime.batch import Job, JobEnd, JobText, SamplingParams

if TYPE_CHECKING:
    from selfhost.models.resolve import ResolvedModel


class Sampling(SamplingParams):
    max_tokens: int | None = None  # None: until the model stops or the context is full


class ContextLengthError(UsageError):
    """The prompt alone (plus room for one token) does not fit the slot's context."""


@dataclass
class PreparedReply:
    """A reply about to be generated: its job, and what the turn needs to be recorded."""

    job: Job
    dropped: int  # oldest turns trimmed to fit
    schema: dict[str, Any] | None


class ChatSession:
    """A conversation (messages, system prompt, sampling) over a loaded ChatModel."""

    def __init__(
        self,
        model: ChatModel,
        *,
        sampling: Sampling | None = None,
        system: str | None = None,
        raw: bool = False,
        schema: dict[str, Any] | None = None,
        log: ChatLog | None = None,
    ) -> None:
        self.model = model
        self.sampling = sampling or Sampling()
        self.system = system or None
        self.raw = raw or model.template is None
        self.schema = schema
        self.log = log or ChatLog(None)
        self.messages: list[Message] = []
        self.window_start = 0  # messages before it no longer fit in the context
        self.last_usage: Usage | None = None
        self.totals = {"turns": 0, "generated": 0, "evaluated": 0, "reused": 0}
        self.unsaved: HistoryError | None = None  # why the last reply is not in the history, if so
        self._grammar = grammar_for(schema) if schema is not None else None  # GBNF text

    @classmethod
    def load(
        cls,
        ref: ResolvedModel | Path,
        *,
        raw: bool = False,
        sampling: Sampling | None = None,
        system: str | None = None,
        schema: dict[str, Any] | None = None,
        log: ChatLog | None = None,
        **load_options: Any,
    ) -> ChatSession:
        """Load a model for one conversation (one slot); load_options go to ChatModel.load."""
        model = ChatModel.load(ref, raw=raw, **load_options)
        return cls(model, sampling=sampling, system=system, raw=raw, schema=schema, log=log)

    @property
    def summary(self) -> Any:
        return self.model.summary

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    # ------------------------------------------------------------- the prompt
    def render(self, window: Sequence[Message], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for a window of messages (system prompt included)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.model.render(head + [m.template_dict() for m in window], raw=self.raw, tools=tools)

    def prompt_tokens(
        self, window: Sequence[Message], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self.model.tokenize_prompt(self.render(window, tools), raw=self.raw)

    # ------------------------------------------------------- conversation API
    def chat(self, text: str) -> Iterator[Chunk]:
        """Add a user message and stream the reply. The reply is appended when it ends."""
        self.messages.append(Message(role="user", content=text, tokens=self.model.count_tokens(text)))
        try:
            prepared = self.prepare(trim=True)
        except BaseException:  # refused (does not fit) or interrupted: the message is not kept
            self.messages.pop()
            raise
        yield from self.stream(prepared)

    def retry(self) -> Iterator[Chunk]:
        """Drop the last reply and generate a new one for the same message."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1].role != "user":
            raise UsageError("nothing to retry yet")
        yield from self.stream(self.prepare(trim=True))

    def undo(self) -> int:
        """Remove the last turn (reply and the message before it). Returns messages removed."""
        removed = 0
        for role in ("assistant", "user"):
            if self.messages and self.messages[-1].role == role:
                self.messages.pop()
                removed += 1
        self.window_start = min(self.window_start, len(self.messages))
        if removed:
            self.save()
        return removed

    def set_system(self, text: str) -> None:
        self.system = text or None
        self.save()

    def reset(self) -> None:
        self.messages = []
        self.window_start = 0
        self.last_usage = None
        self.log.start_new()

    def load_conversation(self, conversation: Conversation, keep_system: bool = False) -> None:
        self.messages = [m.model_copy() for m in conversation.messages if m.role != "system"]
        if not keep_system:
            self.system = conversation.system
        self.window_start = 0

    def conversation(self) -> Conversation:
        return Conversation(
            id=self.log.conversation_id,
            title=self.title,
            model=self.summary.name,
            system=self.system,
            messages=list(self.messages),
        )

    @property
    def title(self) -> str:
        return conversation_title(self.messages)

    def save(self) -> None:
        """Write the conversation to the history (no-op without a log). Tool results are not kept."""
        kept = [m for m in self.messages if m.role != "tool"]
        self.log.save(self.system, kept, self.summary.name)

    # ------------------------------------------------------------ generation
    def prepare(
        self,
        *,
        trim: bool,
        grammar: str | None = None,
        stop: Sequence[str] = (),
        tools: list[dict[str, Any]] | None = None,
    ) -> PreparedReply:
        """Render and fit the conversation; build the job that generates the next reply.

        trim=True drops the oldest turns until the prompt and the reply budget fit (chat);
        trim=False refuses with ContextLengthError instead (server: the client owns the history)."""
        max_tokens = self.sampling.max_tokens
        if trim:
            tokens, dropped = self._fit(tools)
        else:
            tokens, dropped = self.prompt_tokens(self.messages, tools), 0
            if len(tokens) + 1 > self.n_ctx:
                raise ContextLengthError(
                    f"the prompt is {len(tokens)} tokens and the context holds {self.n_ctx}",
                    hint="send fewer or shorter messages",
                )
        job = Job(
            prompt=tokens,
            sampling=SamplingParams(**self.sampling.model_dump(exclude={"max_tokens"})),
            max_tokens=max_tokens if max_tokens is not None else self.n_ctx,
            grammar=grammar if grammar is not None else self._grammar,
            stop=list(stop),
        )
        return PreparedReply(job=job, dropped=dropped, schema=self.schema if grammar is None else None)

    def stream(self, prepared: PreparedReply) -> Iterator[Chunk]:
        """Run a prepared reply in this thread and stream it; the (partial) reply is always recorded."""
        job = self.model.engine.submit(prepared.job)
        try:
            if prepared.dropped:
                yield TrimChunk(dropped_turns=prepared.dropped, dropped_total=self._turns_before())
            for chunk in job.chunks():
                if isinstance(chunk, JobText):
                    yield TextChunk(text=chunk.text)
        finally:
            if job.end is None:  # Ctrl-C or the consumer stopped reading: stop at the next step
                job.cancel()
                for _ in job.chunks():
                    pass
            done = self.record(prepared, job.end)  # type: ignore[arg-type]
        yield done

    def record(self, prepared: PreparedReply, end: JobEnd, tool_calls: list[dict] | None = None) -> DoneChunk:
        """Append the reply, measure the turn, write the history; return the DoneChunk."""
        finish = _finish_reason(end)
        if tool_calls and finish == "stop":
            finish = "tool_calls"
        reply = Message(
            role="assistant",
            content=end.text,
            tokens=end.generated_tokens,
            model=self.summary.name,
            finish_reason=finish,
            tool_calls=tool_calls,
        )
        self.messages.append(reply)
        self.last_usage = _usage(end, finish, prepared.dropped, self.n_ctx)
        self.totals["turns"] += 1
        self.totals["generated"] += end.generated_tokens
        self.totals["evaluated"] += self.last_usage.evaluated_tokens
        self.totals["reused"] += end.reused_tokens
        try:
            self.save()
        except HistoryError as exc:  # disk full, database locked: the reply stands, the log says so
            self.unsaved = exc
        done = DoneChunk(message=reply, usage=self.last_usage)
        if prepared.schema is not None:
            from selfhost.chat.schema import check_reply

            check = check_reply(reply.content, prepared.schema)
            done.schema_valid, done.schema_error = check.valid, check.error
        return done

    def _fit(self, tools: list[dict[str, Any]] | None = None) -> tuple[list[int], int]:
        """Trim the oldest turns until the prompt and the reply budget fit; return prompt tokens."""
        cache: dict[int, list[int]] = {}

        def measure(window: Sequence[Message]) -> int:
            cache[len(window)] = self.prompt_tokens(window, tools)
            return len(cache[len(window)])

        reserve = reply_reserve(self.n_ctx, self.sampling.max_tokens)
        start, dropped, _ = fit_window(self.messages, self.window_start, measure, self.n_ctx, reserve)
        self.window_start = start
        return cache[len(self.messages) - start], dropped

    def _turns_before(self) -> int:
        return sum(1 for m in self.messages[: self.window_start] if m.role == "user")


def _finish_reason(end: JobEnd) -> FinishReason:
    return {"cancelled": "interrupted", "error": "interrupted"}.get(end.finish_reason, end.finish_reason)  # type: ignore[return-value]


def _usage(end: JobEnd, finish: FinishReason, dropped: int, n_ctx: int) -> Usage:
    evaluated = end.prompt_tokens - end.reused_tokens
    ttft = end.time_to_first_token_s
    gen_time = end.total_s - ttft
    return Usage(
        prompt_tokens=end.prompt_tokens,
        reused_tokens=end.reused_tokens,
        evaluated_tokens=evaluated,
        generated_tokens=end.generated_tokens,
        prompt_tokens_per_s=evaluated / ttft if ttft > 0 else 0.0,
        generation_tokens_per_s=(end.generated_tokens - 1) / gen_time
        if end.generated_tokens > 1 and gen_time > 0
        else 0.0,
        time_to_first_token_s=ttft,
        total_s=end.total_s,
        finish_reason=finish,
        context_used=end.context_used,
        context_size=n_ctx,
        dropped_turns=dropped,
    )
