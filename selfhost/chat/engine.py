"""ChatEngine: a conversation with a llama.cpp model, streamed as typed chunks.

The engine renders the conversation with the model's own chat template (llama-cpp-python's
sandboxed Jinja formatter), tokenizes it itself and drives `Llama.generate`, which keeps the
longest common prefix of the previous tokens in the KV cache: a second turn evaluates only the
new tokens. llama.cpp's own counters measure how many were evaluated. The engine never sends
llama.cpp more tokens than fit in n_ctx: it trims the oldest turns before a turn and stops a
reply before the context is full.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from selfhost.chat.context import default_context, fit_window, reply_reserve
from selfhost.chat.messages import (
    Chunk,
    Conversation,
    DoneChunk,
    FinishReason,
    Message,
    TextChunk,
    TrimChunk,
    Usage,
)
from selfhost.errors import ModelLoadError, UsageError
from selfhost.gguf_info import GGUFInfo


class Sampling(BaseModel):
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None  # None: until the model stops or the context is full


class ModelSummary(BaseModel):
    """What was loaded and how: the start-up line."""

    name: str
    path: Path
    quant: str
    n_ctx: int
    n_ctx_train: int | None
    backend: str
    layers_offloaded: int
    n_layers: int
    threads: int
    raw: bool

    def line(self) -> str:
        trained = f" (trained {self.n_ctx_train})" if self.n_ctx_train else ""
        mode = " · raw completion" if self.raw else ""
        threads = f"{self.threads} thread" + ("s" if self.threads != 1 else "")
        return (
            f"{self.name} · {self.quant} · context {self.n_ctx}{trained} · {self.backend} · "
            f"{self.layers_offloaded}/{self.n_layers} layers offloaded · {threads}{mode}"
        )


class ChatEngine:
    """Holds the conversation and the loaded model; `chat()` yields TextChunk.../DoneChunk."""

    def __init__(
        self,
        llm: Any,
        info: GGUFInfo,
        summary: ModelSummary,
        *,
        sampling: Sampling | None = None,
        system: str | None = None,
        raw: bool = False,
        schema: dict[str, Any] | None = None,
    ) -> None:
        from selfhost.llama_backend import llama

        self.lib = llama()
        self.llm = llm
        self.info = info
        self.summary = summary
        self.sampling = sampling or Sampling()
        self.system = system or None
        self.raw = raw
        self.schema = schema
        self.messages: list[Message] = []
        self.window_start = 0  # messages before it no longer fit in the context
        self.last_usage: Usage | None = None
        self.totals = {"turns": 0, "generated": 0, "evaluated": 0, "reused": 0}
        self._vocab = llm._model.vocab
        self._grammar = None
        if schema is not None:
            from selfhost.chat.schema import grammar_for

            self._grammar = grammar_for(schema)
        self._formatter = None if raw else self._make_formatter()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        ref: str | None = None,
        *,
        ctx: int | None = None,
        threads: int | None = None,
        gpu_layers: int | None = None,
        raw: bool = False,
        sampling: Sampling | None = None,
        system: str | None = None,
        schema: dict[str, Any] | None = None,
    ) -> ChatEngine:
        """Resolve, validate and load a model. Raises NotFoundError/GGUFError/UsageError/ModelLoadError."""
        from selfhost import gguf_info
        from selfhost.llama_backend import backend_info, load_model
        from selfhost.resolve import resolve_model

        resolved = resolve_model(ref)
        info = gguf_info.inspect(resolved.path)  # before llama.cpp ever touches the file
        if not raw and not info.chat_template:
            raise UsageError(
                f"{resolved.name} has no chat template in its GGUF, so selfhost cannot format a chat for it",
                hint="use --raw for plain text completion",
            )
        if info.chat_template:
            _check_template(info.chat_template)  # llama-cpp-python compiles it at load, even for --raw
        if ctx is not None and ctx < 16:
            raise UsageError(f"--ctx {ctx} is too small", hint="use at least 16 tokens")
        n_ctx = ctx or default_context(info)
        if gpu_layers is None:
            gpu_layers = -1 if backend_info().gpu_offload else 0
        llm, report = load_model(resolved.path, n_ctx=n_ctx, n_gpu_layers=gpu_layers, n_threads=threads)
        llm.verbose = False  # llama-cpp-python would print cache notes on stderr at every turn
        summary = ModelSummary(
            name=resolved.name,
            path=resolved.path,
            quant=info.quant,
            n_ctx=min(n_ctx, report.n_ctx),  # llama.cpp may pad its KV cache; we stay within what was asked
            n_ctx_train=report.n_ctx_train or info.context_length,
            backend=report.backend,
            layers_offloaded=report.layers_offloaded,
            n_layers=report.n_layers or (info.n_layers or 0),
            threads=report.n_threads,
            raw=raw,
        )
        return cls(llm, info, summary, sampling=sampling, system=system, raw=raw, schema=schema)

    def _make_formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos = self.llm.token_eos()
        bos = self.llm.token_bos()
        try:
            return Jinja2ChatFormatter(
                template=self.info.chat_template or "",
                eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
                add_generation_prompt=True,
            )
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise ModelLoadError(f"the model's chat template is invalid: {exc}") from exc

    @property
    def n_ctx(self) -> int:
        return self.summary.n_ctx

    # ------------------------------------------------------------- the prompt
    def render(self, window: Sequence[Message]) -> str:
        """The prompt text for a window of messages (system prompt included)."""
        if self.raw:
            head = f"{self.system}\n\n" if self.system else ""
            return head + "".join(m.content for m in window)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": m.role, "content": m.content} for m in window]
        try:
            return self._formatter(messages=messages).prompt  # type: ignore[misc]
        except Exception as exc:  # the template's raise_exception(), sandbox violations, ...
            raise ModelLoadError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from exc

    def prompt_tokens(self, window: Sequence[Message]) -> list[int]:
        text = self.render(window).encode("utf-8")
        if self.raw:
            add_bos = bool(self.lib.llama_vocab_get_add_bos(self._vocab))
            return self.llm.tokenize(text, add_bos=add_bos, special=False)
        return self.llm.tokenize(text, add_bos=False, special=True)  # the template writes BOS itself

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    # ------------------------------------------------------- conversation API
    def chat(self, text: str) -> Iterator[Chunk]:
        """Add a user message and stream the reply. The reply is appended when it ends."""
        self.messages.append(Message(role="user", content=text, tokens=self.count_tokens(text)))
        try:
            tokens, dropped = self._fit()
        except BaseException:  # refused (does not fit) or interrupted: the message is not kept
            self.messages.pop()
            raise
        yield from self._reply(tokens, dropped)

    def retry(self) -> Iterator[Chunk]:
        """Drop the last reply and generate a new one for the same message."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1].role != "user":
            raise UsageError("nothing to retry yet")
        tokens, dropped = self._fit()
        yield from self._reply(tokens, dropped)

    def undo(self) -> int:
        """Remove the last turn (reply and the message before it). Returns messages removed."""
        removed = 0
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
            removed += 1
        if self.messages and self.messages[-1].role == "user":
            self.messages.pop()
            removed += 1
        self.window_start = min(self.window_start, len(self.messages))
        return removed

    def reset(self) -> None:
        self.messages = []
        self.window_start = 0
        self.last_usage = None

    def load_conversation(self, conversation: Conversation, keep_system: bool = False) -> None:
        self.messages = [m.model_copy() for m in conversation.messages if m.role != "system"]
        if not keep_system:
            self.system = conversation.system
        self.window_start = 0

    def conversation(self) -> Conversation:
        title = next((m.content for m in self.messages if m.role == "user"), "")
        return Conversation(
            title=" ".join(title.split())[:80],
            model=self.summary.name,
            system=self.system,
            messages=list(self.messages),
        )

    # ---------------------------------------------------------------- internals
    def _fit(self) -> tuple[list[int], int]:
        """Trim the oldest turns until the prompt and the reply budget fit; return prompt tokens."""
        cache: dict[int, list[int]] = {}

        def measure(window: Sequence[Message]) -> int:
            cache[len(window)] = self.prompt_tokens(window)
            return len(cache[len(window)])

        reserve = reply_reserve(self.n_ctx, self.sampling.max_tokens)
        start, dropped, _ = fit_window(self.messages, self.window_start, measure, self.n_ctx, reserve)
        self.window_start = start
        return cache[len(self.messages) - start], dropped

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _reply(self, tokens: list[int], dropped: int) -> Iterator[Chunk]:
        lib, llm, s = self.lib, self.llm, self.sampling
        room = self.n_ctx - len(tokens)  # a reply may fill the context, never pass it
        budget, limit_reason = room, "context"
        if s.max_tokens is not None and s.max_tokens <= room:
            budget, limit_reason = s.max_tokens, "length"
        llm.set_seed(s.seed if s.seed is not None else lib.LLAMA_DEFAULT_SEED)  # default: random per reply
        lib.llama_perf_context_reset(llm._ctx.ctx)

        out: list[int] = []
        pieces: list[bytes] = []
        sampled = 0
        finish: FinishReason = "interrupted"
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        t0 = time.perf_counter()
        t_first: float | None = None
        gen = llm.generate(
            tokens,
            top_k=s.top_k,
            top_p=s.top_p,
            temp=s.temperature,
            repeat_penalty=s.repeat_penalty,
            grammar=self._grammar,
        )
        try:  # from here on, however the stream ends, the (partial) reply is recorded
            if dropped:
                yield TrimChunk(dropped_turns=dropped, dropped_total=self._turns_before(self.window_start))
            for token in gen:
                sampled += 1
                if t_first is None:
                    t_first = time.perf_counter()
                if lib.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                out.append(token)
                piece = self._piece(token)
                pieces.append(piece)
                text = decoder.decode(piece)
                if text:
                    yield TextChunk(text=text)
                if len(out) >= budget:  # the next step would evaluate this token: stop first
                    finish = limit_reason  # type: ignore[assignment]
                    break
        finally:
            gen.close()
            self._record(tokens, out, pieces, sampled, finish, dropped, t0, t_first, time.perf_counter())
        tail = decoder.decode(b"", final=True)
        if tail:
            yield TextChunk(text=tail)
        assert self.last_usage is not None
        done = DoneChunk(message=self.messages[-1], usage=self.last_usage)
        if self.schema is not None:
            from selfhost.chat.schema import check_reply

            check = check_reply(done.message.content, self.schema)
            done.schema_valid, done.schema_error = check.valid, check.error
        yield done

    def _record(
        self,
        tokens: list[int],
        out: list[int],
        pieces: list[bytes],
        sampled: int,
        finish: FinishReason,
        dropped: int,
        t0: float,
        t_first: float | None,
        t_end: float,
    ) -> None:
        """Append the (possibly partial) reply and measure the turn."""
        perf = self.lib.llama_perf_context(self.llm._ctx.ctx)
        llama_evaluated = int(perf.n_p_eval) + int(perf.n_eval)
        evaluated = max(0, llama_evaluated - max(sampled - 1, 0))  # generated tokens fed back, minus
        ttft = (t_first or t_end) - t0
        gen_time = t_end - (t_first or t_end)
        reply = Message(
            role="assistant",
            content=b"".join(pieces).decode("utf-8", "replace"),
            tokens=len(out),
            model=self.summary.name,
            finish_reason=finish,
        )
        self.messages.append(reply)
        self.last_usage = Usage(
            prompt_tokens=len(tokens),
            reused_tokens=max(0, len(tokens) - evaluated),
            evaluated_tokens=evaluated,
            generated_tokens=len(out),
            prompt_tokens_per_s=evaluated / ttft if ttft > 0 else 0.0,
            generation_tokens_per_s=(sampled - 1) / gen_time if sampled > 1 and gen_time > 0 else 0.0,
            time_to_first_token_s=ttft,
            total_s=t_end - t0,
            finish_reason=finish,
            context_used=int(self.llm.n_tokens),
            context_size=self.n_ctx,
            dropped_turns=dropped,
        )
        self.totals["turns"] += 1
        self.totals["generated"] += len(out)
        self.totals["evaluated"] += evaluated
        self.totals["reused"] += self.last_usage.reused_tokens

    def _turns_before(self, index: int) -> int:
        return sum(1 for m in self.messages[:index] if m.role == "user")


def _check_template(template: str) -> None:
    """Compile a GGUF chat template in Jinja's sandbox; a broken one is one clear error."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().from_string(template)
    except TemplateError as exc:
        raise ModelLoadError(f"the model's chat template is invalid: {exc}") from exc
