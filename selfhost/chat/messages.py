"""Typed chat messages and the typed chunks the engine streams to its renderers."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Role = Literal["system", "user", "assistant", "tool"]  # "tool": results of tool calls (server only)
FinishReason = Literal["stop", "length", "context", "interrupted", "tool_calls"]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    role: Role
    content: str
    tokens: int | None = None  # tokens of `content` (generated tokens for a reply)
    created_at: datetime = Field(default_factory=utc_now)
    model: str | None = None  # which model wrote a reply
    finish_reason: FinishReason | None = None  # replies only
    id: int | None = None  # row id once written to the history database
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls, OpenAI's shape (server)
    tool_call_id: str | None = None  # which call a "tool" message answers
    reasoning: str | None = None  # a thinking model's reasoning, apart from the answer in `content`

    def template_dict(self) -> dict[str, Any]:
        """What a chat template sees of this message (reasoning under the names templates read:
        Qwen3 `reasoning_content`, gpt-oss `thinking`; templates that drop old reasoning do)."""
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning:
            data["reasoning_content"] = data["thinking"] = self.reasoning
        if self.tool_calls:
            data["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            data["tool_call_id"] = self.tool_call_id
        return data


class Usage(BaseModel):
    """What one turn cost, measured (llama.cpp's own counters and wall-clock time)."""

    prompt_tokens: int  # tokens of the whole rendered prompt
    reused_tokens: int  # prompt prefix already in the KV cache (not evaluated again)
    evaluated_tokens: int  # prompt tokens llama.cpp actually evaluated this turn
    generated_tokens: int
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    time_to_first_token_s: float
    total_s: float
    finish_reason: FinishReason
    context_used: int  # tokens in the KV cache after the turn
    context_size: int
    dropped_turns: int = 0  # oldest turns trimmed to make this one fit
    restored_tokens: int = 0  # of reused_tokens, those restored from the prompt cache
    drafted_tokens: int = 0  # speculative decoding: tokens drafted
    accepted_tokens: int = 0  # ... and kept by the model
    reasoning_tokens: int = 0  # generated tokens that were reasoning (estimated by re-tokenizing it)


class TextChunk(BaseModel):
    """A piece of the answer (content)."""

    kind: Literal["text"] = "text"
    text: str


class ReasoningChunk(BaseModel):
    """A piece of a thinking model's reasoning (never part of the answer)."""

    kind: Literal["reasoning"] = "reasoning"
    text: str


class ToolCallChunk(BaseModel):
    """A piece of a tool call, as OpenAI streams them: the first chunk of call `index` carries its
    id and name (arguments ""), the following ones argument fragments that concatenate to the
    call's JSON arguments text."""

    kind: Literal["tool_call"] = "tool_call"
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


ReplyChunk = TextChunk | ReasoningChunk | ToolCallChunk  # what a family parser yields


class TrimChunk(BaseModel):
    """Sent before generation when the oldest turns were dropped to fit the context."""

    kind: Literal["trim"] = "trim"
    dropped_turns: int
    dropped_total: int  # turns out of the context window so far in this conversation


class DoneChunk(BaseModel):
    kind: Literal["done"] = "done"
    message: Message
    usage: Usage
    schema_valid: bool | None = None  # with --schema: does the reply parse and validate?
    schema_error: str | None = None


Chunk = TextChunk | ReasoningChunk | ToolCallChunk | TrimChunk | DoneChunk


def conversation_title(messages: Iterable[Message]) -> str:
    """A conversation's title: its first user message on one line, at most 80 characters."""
    first = next((m.content for m in messages if m.role == "user"), "")
    return " ".join(first.split())[:80]


class Conversation(BaseModel):
    """A whole conversation as stored in the history database and in exports."""

    id: int | None = None
    title: str = ""
    model: str | None = None
    system: str | None = None
    created_at: datetime = Field(default_factory=utc_now)
    updated_at: datetime = Field(default_factory=utc_now)
    messages: list[Message] = Field(default_factory=list)
