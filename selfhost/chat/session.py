"""ChatSession: one conversation with a ChatModel, and its history log.

The REPL, one-shot mode and the server all talk to a model through a session: it renders the
conversation with the model's template, fits it into the slot's context (trimming the oldest turns
in a chat, refusing in the server, where the client owns the history), builds the job (sampling,
grammar, stop strings), streams the reply as typed chunks, records it with its measured usage and
writes the conversation to the history database when there is a log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfhost.chat.context import fit_window, reply_reserve
from selfhost.chat.families import ReplyParser
from selfhost.chat.history import ChatLog
from selfhost.chat.messages import (
    Chunk,
    Conversation,
    DoneChunk,
    FinishReason,
    Message,
    TrimChunk,
    Usage,
    conversation_title,
)
from selfhost.chat.model import ChatModel
from selfhost.chat.schema import grammar_for
from selfhost.errors import HistoryError, UsageError
from selfhost.runtime.jobs import Job, JobEnd, JobText
from selfhost.runtime.sampler import SamplingParams

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
    parser: ReplyParser  # the model family's reader of this reply (reasoning, answer, tool calls)


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
        think: bool | None = None,
        effort: str | None = None,
        grammar: str | None = None,
    ) -> None:
        """`grammar`: GBNF text constraining the whole reply, markup included (llama.cpp's format);
        unlike a schema's grammar the reply is still read by the model family's parser."""
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
        self.grammar = grammar
        if grammar is not None:
            model.engine.check_grammar(grammar)
        self.think, self.effort = think, effort  # None: the template's default
        self.template_vars()  # a switch the model's template does not have is refused now

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
        think: bool | None = None,
        grammar: str | None = None,
        **load_options: Any,
    ) -> ChatSession:
        """Load a model for one conversation (one slot); load_options go to ChatModel.load."""
        model = ChatModel.load(ref, raw=raw, **load_options)
        try:
            return cls(
                model, sampling=sampling, system=system, raw=raw, schema=schema, log=log, think=think,
                grammar=grammar,
            )
        except BaseException:
            model.close()
            raise

    @property
    def summary(self) -> Any:
        return self.model.summary

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    # ------------------------------------------------------------- the prompt
    def template_vars(self) -> dict[str, Any]:
        """The think switch as the model's template spells it (UsageError where it has none)."""
        if self.raw or (self.think is None and self.effort is None and not self.model.family.switch):
            return {}
        return self.model.family.template_vars(self.think, self.effort)

    def render(self, window: Sequence[Message], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for a window of messages (system prompt included)."""
        head: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        fmt = self.model.family.tools
        if tools and fmt is not None and fmt.in_system:  # Phi-4-mini: tools ride on the system message
            listed = json.dumps([t["function"] for t in tools])
            head = [{"role": "system", "content": self.system or "", "tools": listed}]
        messages = head + [m.template_dict() for m in window]
        return self.model.render(messages, raw=self.raw, tools=tools, extra=self.template_vars())

    def prompt_tokens(
        self, window: Sequence[Message], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self._prompt(window, tools)[1]

    def _prompt(self, window: Sequence[Message], tools: list[dict[str, Any]] | None) -> tuple[str, list[int]]:
        text = self.render(window, tools)
        return text, self.model.tokenize_prompt(text, raw=self.raw)

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
        plain: bool | None = None,
        parser: ReplyParser | None = None,
        calls: bool | None = None,
    ) -> PreparedReply:
        """Render and fit the conversation; build the job that generates the next reply.

        trim=True drops the oldest turns until the prompt and the reply budget fit (chat);
        trim=False refuses with ContextLengthError instead (server: the client owns the history).
        plain: read the reply as text only (default: when a schema's or a tool's grammar shapes it);
        parser: read it with this one instead (a forced tool call); calls: read tool calls in it
        (default: when tools are rendered into the prompt)."""
        max_tokens = self.sampling.max_tokens
        if trim:
            text, tokens, dropped = self._fit(tools)
        else:
            (text, tokens), dropped = self._prompt(self.messages, tools), 0
            if len(tokens) + 1 > self.n_ctx:
                raise ContextLengthError(
                    f"the prompt is {len(tokens)} tokens and the context holds {self.n_ctx}",
                    hint="send fewer or shorter messages",
                )
        if plain is None:  # under a schema's or a forced call's grammar the reply is that JSON only
            plain = grammar is not None or self._grammar is not None
        schema = self.schema if grammar is None else None
        grammar = grammar if grammar is not None else self._grammar or self.grammar
        calls = tools is not None if calls is None else calls
        parser = parser or self.model.family.parser(text, plain=self.raw or plain, calls=calls, tools=tools)
        job = Job(
            prompt=tokens,
            sampling=SamplingParams(**self.sampling.model_dump(exclude={"max_tokens"})),
            max_tokens=max_tokens if max_tokens is not None else self.n_ctx,
            grammar=grammar,
            stop=list(stop),
            special=self.model.family.special and not self.raw and not plain,
        )
        return PreparedReply(job=job, dropped=dropped, schema=schema, parser=parser)

    def stream(self, prepared: PreparedReply) -> Iterator[Chunk]:
        """Run a prepared reply in this thread and stream it; the (partial) reply is always recorded."""
        job = self.model.engine.submit(prepared.job)
        try:
            if prepared.dropped:
                yield TrimChunk(dropped_turns=prepared.dropped, dropped_total=self._turns_before())
            for chunk in job.chunks():
                if isinstance(chunk, JobText):
                    yield from prepared.parser.feed(chunk.text)
            yield from prepared.parser.finish()
        finally:
            if job.end is None:  # Ctrl-C or the consumer stopped reading: stop at the next step
                job.cancel()
                for _ in job.chunks():
                    pass
            done = self.record(prepared, job.end)  # type: ignore[arg-type]
        yield done

    def record(
        self,
        prepared: PreparedReply,
        end: JobEnd,
        tool_calls: list[dict] | None = None,
        content: str | None = None,
    ) -> DoneChunk:
        """Append the reply, measure the turn, write the history; return the DoneChunk.

        The reply is what the family parser read (answer, reasoning); the server passes the tool calls
        it accepts (and the content that goes with them)."""
        prepared.parser.finish()
        parsed = prepared.parser.result()
        finish = _finish_reason(end)
        if tool_calls and finish == "stop":
            finish = "tool_calls"
        reply = Message(
            role="assistant",
            content=parsed.content if content is None else content,
            tokens=end.generated_tokens,
            model=self.summary.name,
            finish_reason=finish,
            tool_calls=tool_calls,
            reasoning=parsed.reasoning,
        )
        self.messages.append(reply)
        self.last_usage = _usage(end, finish, prepared.dropped, self.n_ctx)
        if parsed.reasoning:
            counted = self.model.count_tokens(parsed.reasoning)
            self.last_usage.reasoning_tokens = min(counted, end.generated_tokens)
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

    def _fit(self, tools: list[dict[str, Any]] | None = None) -> tuple[str, list[int], int]:
        """Trim the oldest turns until the prompt and the reply budget fit; return the prompt."""
        cache: dict[int, tuple[str, list[int]]] = {}

        def measure(window: Sequence[Message]) -> int:
            cache[len(window)] = self._prompt(window, tools)
            return len(cache[len(window)][1])

        reserve = reply_reserve(self.n_ctx, self.sampling.max_tokens)
        start, dropped, _ = fit_window(self.messages, self.window_start, measure, self.n_ctx, reserve)
        self.window_start = start
        text, tokens = cache[len(self.messages) - start]
        return text, tokens, dropped

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
        restored_tokens=end.restored_tokens,
        drafted_tokens=end.drafted_tokens,
        accepted_tokens=end.accepted_tokens,
    )
