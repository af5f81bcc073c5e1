"""A fake batch engine, for the tests where llama.cpp adds nothing (CLI, session, output, history).

`use_fake_engine(monkeypatch)` (the `fake_model` fixture) puts a FakeModel where ChatModel.load meets
llama.cpp (selfhost.chat.model.open_engine). Everything else runs for real: the GGUF is read and checked,
the context sized, the chat template rendered by selfhost's Jinja, the session, history and CLI. Like
`llm`'s mock model, what the model says is scripted: queued replies first, then `default(prompt)`.

What it keeps of BatchEngine's contract (selfhost/runtime/batch.py), so that callers break the same way:
- a vocabulary: `tokenize` / `detokenize` / `piece` / `n_vocab` / `adds_bos` / `special_text`. Words,
  single punctuation marks and runs of whitespace are tokens (ids given on first sight; lossless);
  control-token text (`<|im_start|>`) is one token only with special=True, and shows as text only in
  a job with `special`;
- `submit` refuses an empty prompt or one that does not fit the slot (ValueError) and a full queue
  (QueueFullError); a job streams JobText token by token and ends with one JobEnd: "stop" (the reply's
  end-of-generation token or a stop string), "length" (max_tokens), "context" (the slot is full),
  "cancelled"; prompt, generated, reused (the prefix the slot holds) and context-used counts follow
  the real engine's rules;
- inline mode (a job's `chunks()` runs `step()`, Ctrl-C held back during a step) and the server's
  background thread (`start()`), sync and async consumers.
What it does not do, so real-model tests keep them: sample (temperature, seed and penalties change
nothing), follow a grammar (`check_grammar` only wants a `root` rule), speculate, cache prompts.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from selfhost.errors import UsageError
from selfhost.runtime.batch import _step_atomically
from selfhost.runtime.defaults import SLOT_QUEUE
from selfhost.runtime.jobs import Job, JobEnd, JobFinish, JobText, QueueFullError
from selfhost.runtime.llama_backend import LoadReport
from selfhost.runtime.text_stream import TextStream

CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # tests/tinygguf.py's control tokens
_PIECES = re.compile(r" ?\w+| ?[^\w\s]|\s+")


def numbered(prompt: str, n: int) -> str:
    """The default reply: seven tokens, numbered, so that two replies differ."""
    return f"Reply {n} from the fake model."


class FakeVocab:
    """A lossless word-level vocabulary; ids 0.. are the control tokens, then pieces in order seen."""

    def __init__(
        self,
        control: Iterable[str] = CONTROL,
        bos: str = "<|endoftext|>",
        eos: str = "<|im_end|>",
        eog: Iterable[str] = ("<|endoftext|>", "<|im_end|>"),  # tokens that end a reply
    ) -> None:
        self.pieces: list[bytes] = [c.encode() for c in control]
        self.n_control = len(self.pieces)
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.bos, self.eos = self.ids[bos.encode()], self.ids[eos.encode()]
        self.eog = {self.ids[e.encode()] for e in eog}
        self._control = re.compile("(" + "|".join(re.escape(c) for c in control) + ")")
        self._lock = threading.Lock()

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        parts = self._control.split(text) if special else [text]
        out = [self.bos] if add_bos else []
        for i, part in enumerate(parts):
            if i % 2:  # a control token's text (the split's captured group)
                out.append(self.ids[part.encode()])
            else:
                out += [self._id(piece.encode()) for piece in _PIECES.findall(part)]
        return out

    def _id(self, piece: bytes) -> int:
        with self._lock:
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            return self.ids[piece]

    def piece(self, token: int, special: bool = False) -> bytes:
        if token < self.n_control:
            return self.pieces[token] if special else b""
        return self.pieces[token]

    def is_eog(self, token: int) -> bool:
        return token in self.eog


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens "in the KV cache", position = index
    job: Job | None = None
    reply: deque[int] = field(default_factory=deque)  # what the model will say, then end-of-generation
    next_token: int | None = None  # sampled, to be evaluated in the next step
    generated: list[int] = field(default_factory=list)
    text: TextStream = field(default_factory=lambda: TextStream([]))
    reused: int = 0
    t_admit: float = 0.0
    t_first: float = 0.0


class FakeEngine:
    """BatchEngine's interface over a scripted model: no weights, no llama.cpp."""

    def __init__(self, model: FakeModel, *, slots: int, ctx_per_slot: int, max_queue: int | None = None):
        self.model = model
        self.vocab = model.vocab
        self.llm = None  # no weights: embeddings need a real model
        self.draft_llm = None
        self.prompt_cache = None
        self.n_slots = slots
        self.ctx_per_slot = ctx_per_slot
        self.max_queue = SLOT_QUEUE * slots if max_queue is None else max_queue
        self.slots = [_Slot(i) for i in range(slots)]
        self.waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.closed = False

    # ---------------------------------------------------------- the vocabulary
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self.vocab.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> bytes:
        return b"".join(self.vocab.piece(t) for t in tokens)

    def piece(self, token: int, special: bool = False) -> bytes:
        return self.vocab.piece(token, special)

    @property
    def n_vocab(self) -> int:
        return len(self.vocab.pieces)

    @property
    def adds_bos(self) -> bool:
        return self.model.adds_bos

    def special_text(self, which: Literal["bos", "eos"]) -> str:
        return self.vocab.pieces[self.vocab.bos if which == "bos" else self.vocab.eos].decode()

    # ------------------------------------------------------------------ public
    def submit(self, job: Job) -> Job:
        if not job.prompt:
            raise ValueError("a job needs at least one prompt token")
        if len(job.prompt) >= self.ctx_per_slot:
            raise ValueError("the prompt does not fit the slot's context")
        with self._cond:
            busy = sum(1 for s in self.slots if s.job is not None)
            if busy + len(self.waiting) >= self.n_slots + self.max_queue:
                raise QueueFullError(
                    f"all {self.n_slots} slots are busy and {len(self.waiting)} requests are waiting"
                )
            job._engine = self  # type: ignore[assignment]
            job.t_submit = time.perf_counter()
            self.waiting.append(job)
            self._cond.notify_all()
        return job

    def busy(self) -> tuple[int, int]:
        with self._cond:
            return sum(1 for s in self.slots if s.job is not None), len(self.waiting)

    def counters(self) -> dict[str, Any]:
        return {}  # no speculation, no prompt cache

    def check_grammar(self, grammar: str) -> None:
        if not re.search(r"^\s*root\s*::=", grammar, re.MULTILINE):
            raise UsageError("llama.cpp could not compile the grammar (GBNF, root rule `root`)")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fake-batch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self.waiting) + [s.job for s in self.slots if s.job]:
                job.cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self.step()
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, job: Job) -> None:
        if self._thread is None:
            _step_atomically(self.step)
            return
        with self._cond:
            self._cond.wait_for(lambda: bool(job._chunks), timeout=0.5)

    def clear_cache(self) -> None:
        with self._cond:
            for slot in self.slots:
                if slot.job is None:
                    slot.cached = []

    # --------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self.waiting or any(s.job for s in self.slots))
                if self._stopping and not self.waiting and not any(s.job for s in self.slots):
                    return
            self.step()
            with self._cond:
                self._cond.notify_all()

    def step(self) -> None:
        """Admit waiting jobs (reading a whole prompt in one step), then one token for every active job."""
        with self._cond:
            for slot in self.slots:
                if slot.job is not None and slot.job.cancelled:
                    self._finish(slot, "cancelled")
            while self.waiting and self.waiting[0].cancelled:
                self._reject(self.waiting.popleft(), "cancelled")
            while self.waiting and any(s.job is None for s in self.slots):
                self._admit(self.waiting.popleft())
        active = [s for s in self.slots if s.job is not None]
        if not active:
            return
        self.steps += 1
        if self.model.step_seconds:
            time.sleep(self.model.step_seconds)
        for slot in active:
            if slot.next_token is not None:  # the last sampled token is evaluated: it joins the cache
                slot.cached.append(slot.next_token)
                slot.next_token = None
            self._take_token(slot, slot.reply.popleft() if slot.reply else self.vocab.eos)

    def _admit(self, job: Job) -> None:
        """The free slot sharing the longest prefix with the prompt (else the lowest) reads the rest."""
        shared, _, slot = max(
            (_common_prefix(s.cached, job.prompt), -s.seq_id, s) for s in self.slots if s.job is None
        )
        keep = min(shared, len(job.prompt) - 1)  # at least one token is evaluated, for its logits
        slot.cached = list(job.prompt)
        prompt = b"".join(self.vocab.piece(t, special=True) for t in job.prompt).decode("utf-8", "replace")
        said = self.tokenize(self.model.reply_for(prompt), add_bos=False, special=True)
        slot.job, slot.reply, slot.next_token = job, deque(said), None
        slot.generated, slot.text, slot.reused = [], TextStream(job.stop), keep
        slot.t_admit, slot.t_first = time.perf_counter(), 0.0

    def _take_token(self, slot: _Slot, token: int) -> None:
        """The real engine's rules: end of generation, stop strings, max_tokens, the slot's end."""
        job = slot.job
        assert job is not None
        if not slot.generated:
            slot.t_first = time.perf_counter()
        if self.vocab.is_eog(token):
            self._finish(slot, "stop")
            return
        slot.generated.append(token)
        text = slot.text.feed(self.vocab.piece(token, special=job.special))
        if text:
            job._emit(JobText(text))
        if slot.text.stopped:
            self._finish(slot, "stop")
        elif len(slot.generated) >= job.max_tokens:
            self._finish(slot, "length")
        elif len(slot.cached) + 1 >= self.ctx_per_slot:
            self._finish(slot, "context")
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot, reason: JobFinish) -> None:
        job = slot.job
        assert job is not None
        tail = slot.text.feed(b"", final=True)
        if tail:
            job._emit(JobText(tail))
        now = time.perf_counter()
        job.end = JobEnd(
            finish_reason=reason,
            text=slot.text.full,
            generated_tokens=len(slot.generated),
            prompt_tokens=len(job.prompt),
            reused_tokens=slot.reused,
            queued_s=slot.t_admit - job.t_submit,
            time_to_first_token_s=(slot.t_first or now) - slot.t_admit,
            total_s=now - slot.t_admit,
            context_used=len(slot.cached),
            stop_sequence=slot.text.matched,
        )
        slot.job, slot.next_token, slot.reply = None, None, deque()
        job._emit(job.end)

    def _reject(self, job: Job, reason: JobFinish) -> None:
        job.end = JobEnd(reason, "", 0, len(job.prompt), 0, time.perf_counter() - job.t_submit, 0.0, 0.0)
        job._emit(job.end)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class FakeModel:
    """What `open_engine` loads instead of a GGUF's weights: a vocabulary and a script of replies.

    `replies` are said in order (a reply may end early with `<|im_end|>`); once they run out, each reply
    is `default(prompt_text, n)` (n counts the replies, from 1). `prompts` keeps every prompt as the
    model read it (control tokens as text); `engines` every engine opened. `step_seconds` slows each
    step, for tests that need a reply in flight."""

    def __init__(
        self,
        replies: Iterable[str] = (),
        default: Callable[[str, int], str] = numbered,
        *,
        adds_bos: bool = False,
        step_seconds: float = 0.0,
    ) -> None:
        self.vocab = FakeVocab()
        self.replies = deque(replies)
        self.default = default
        self.adds_bos = adds_bos
        self.step_seconds = step_seconds
        self.prompts: list[str] = []
        self.engines: list[FakeEngine] = []
        self._lock = threading.Lock()

    def enqueue(self, *replies: str) -> None:
        with self._lock:
            self.replies.extend(replies)

    def reply_for(self, prompt: str) -> str:
        with self._lock:
            self.prompts.append(prompt)
            return self.replies.popleft() if self.replies else self.default(prompt, len(self.prompts))

    def open_engine(
        self,
        path: Path,
        info: Any,
        *,
        slots: int,
        ctx_per_slot: int,
        gpu_layers: int | None,
        threads: int | None,
        prefill_chunk: int,
        max_queue: int | None,
        options: Any,
    ) -> tuple[FakeEngine, LoadReport]:
        """selfhost.chat.model.open_engine's signature and result, without llama.cpp."""
        if options.spec.mode != "none":
            raise NotImplementedError("the fake engine does not speculate: test that on a real model")
        engine = FakeEngine(self, slots=slots, ctx_per_slot=ctx_per_slot, max_queue=max_queue)
        self.engines.append(engine)
        report = LoadReport(
            path=Path(path), n_ctx=ctx_per_slot, n_ctx_train=info.context_length or 0,
            n_layers=info.n_layers or 0, layers_offloaded=0, backend="fake", devices=[],
            n_threads=threads or 1,
        )  # fmt: skip
        return engine, report


def use_fake_engine(monkeypatch: pytest.MonkeyPatch, model: FakeModel | None = None) -> FakeModel:
    """Make every ChatModel.load in this test open `model` (a new FakeModel by default)."""
    from selfhost.chat import model as chat_model

    fake = model or FakeModel()
    monkeypatch.setattr(chat_model, "open_engine", fake.open_engine)
    return fake
