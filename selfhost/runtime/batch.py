"""Continuous batching over N slots of one llama.cpp context: the one generation loop of selfhost.

Every reply, in the REPL, in one-shot mode and in the server, is a `Job` (runtime/jobs.py) run by a
`BatchEngine`, the scheduler:

- one llama.cpp context holds N sequences (slots), each with its own stream of the KV cache;
- each `step()` builds one batch: the last sampled token of every generating slot, then prompt
  tokens of slots still reading their prompt, up to `prefill_chunk` tokens, so a long new prompt
  is read over several steps instead of stalling the replies in flight (chunked prefill);
- new jobs take a free slot between two steps (the one whose cached tokens share the longest
  prefix with the prompt: that prefix is not evaluated again); finished or cancelled jobs leave;
- each job samples with its own llama.cpp sampler chain (runtime/sampler.py); with speculative
  decoding a slot verifies drafted tokens in the same batch (runtime/speculative.py);
- a slot given to another prompt first keeps its state in the prompt cache (runtime/prompt_cache.py).

The REPL drives `step()` itself (`run_inline`); the server runs it on one background thread
(`start()`), and a job's consumer reads its chunks either way. llama.cpp aborts the process when a
sequence passes its context, so a job never holds more than `ctx_per_slot` tokens.
"""

from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections import deque
from typing import Any, Literal

from selfhost.errors import SelfhostError
from selfhost.runtime.defaults import DEFAULT_PREFILL_CHUNK, SLOT_QUEUE
from selfhost.runtime.jobs import Job, JobEnd, JobFinish, JobText, QueueFullError
from selfhost.runtime.kvcache import KVSettings
from selfhost.runtime.llama_context import open_context, set_token
from selfhost.runtime.prompt_cache import PromptCache
from selfhost.runtime.sampler import check_grammar, make_sampler
from selfhost.runtime.speculative import DraftPace, ModelDrafter, NgramDrafter, SpecSettings
from selfhost.runtime.text_stream import TextStream, token_piece
from selfhost.runtime.tokens import common_prefix

RESTORE_MIN_GAIN = 32  # restore from the prompt cache only when it gives this many more tokens


class _Slot:
    """One sequence of the context: the tokens its KV cache holds, and the job using it."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.cached: list[int] = []  # tokens whose K/V are in the cache, position = index
        self.job: Job | None = None
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.next_token: int | None = None  # sampled, to be evaluated in the next step
        self.sampler: Any = None
        self.batch_index: int | None = None  # where its logits are in the current batch
        self.drafts: list[int] = []  # drafted tokens in the current batch, after next_token
        self.ngram: NgramDrafter | None = None
        self.pace = DraftPace(0)  # how many tokens to draft next
        self.drafted = self.accepted = self.restored = 0
        self.generated: list[int] = []
        self.text = TextStream([])
        self.reused = 0
        self.t_admit = self.t_first = 0.0


class BatchEngine:
    """N slots over one llama.cpp context; `step()` is one decode of every active job."""

    def __init__(
        self,
        llm: Any,
        *,
        slots: int,
        ctx_per_slot: int,
        threads: int,
        n_batch: int = 512,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_queue: int | None = None,
        kv: KVSettings | None = None,
        spec: SpecSettings | None = None,
        draft_llm: Any = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        from selfhost.runtime import llama_private
        from selfhost.runtime.llama_backend import llama

        self.lib = llama()
        self.llm = llm
        self.vocab = llama_private.vocab(llm)
        self.n_slots = slots
        self.ctx_per_slot = ctx_per_slot
        self.kv = (kv or KVSettings()).check()
        self.spec = spec or SpecSettings()
        if self.spec.mode != "none" and (
            self.lib.llama_model_is_recurrent(llm.model) or self.lib.llama_model_is_hybrid(llm.model)
        ):  # rejected drafts must leave the cache, and a recurrent state cannot be cut back
            raise SelfhostError("speculative decoding needs a transformer: this model's state is recurrent")
        self.n_batch = max(n_batch, slots * (1 + self.spec.draft_max) if self.spec.mode != "none" else slots)
        self.prefill_chunk = max(1, min(prefill_chunk, self.n_batch))
        self.max_queue = SLOT_QUEUE * slots if max_queue is None else max_queue
        self.ctx = self._slots_context(llm.model, threads)
        self.memory = self.lib.llama_get_memory(self.ctx)
        self.drafter: ModelDrafter | None = None
        if self.spec.mode == "draft":
            assert draft_llm is not None, "draft mode needs the draft model"
            draft_ctx = self._slots_context(draft_llm.model, threads)
            self.drafter = ModelDrafter(draft_llm, draft_ctx, slots, self.n_batch)
        self.draft_llm = draft_llm  # the draft model's weights (whoever loaded them closes them)
        self.prompt_cache = prompt_cache
        self.stats = {"drafted": 0, "accepted": 0}
        self.batch = self.lib.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [_Slot(i) for i in range(slots)]
        self.waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    def _slots_context(self, model: Any, threads: int) -> Any:
        """A context on `model` (the target's or the draft's) with one KV sequence per slot."""
        n_ctx = self.n_slots * self.ctx_per_slot
        return open_context(
            model, n_ctx=n_ctx, n_seq_max=self.n_slots, n_batch=self.n_batch, threads=threads, kv=self.kv
        )

    # ------------------------------------------------------------------ public
    def submit(self, job: Job) -> Job:
        """Queue a job. Raises QueueFullError when every slot is busy and the queue is full."""
        if not job.prompt:
            raise ValueError("a job needs at least one prompt token")
        if len(job.prompt) >= self.ctx_per_slot:
            raise ValueError("the prompt does not fit the slot's context")  # callers check first
        with self._cond:
            busy = sum(1 for s in self.slots if s.job is not None)
            if busy + len(self.waiting) >= self.n_slots + self.max_queue:
                raise QueueFullError(
                    f"all {self.n_slots} slots are busy and {len(self.waiting)} requests are waiting"
                )
            job._engine = self
            job.t_submit = time.perf_counter()
            self.waiting.append(job)
            self._cond.notify_all()
        return job

    def busy(self) -> tuple[int, int]:
        """(slots generating, jobs waiting)."""
        with self._cond:
            return sum(1 for s in self.slots if s.job is not None), len(self.waiting)

    def counters(self) -> dict[str, Any]:
        """Speculative decoding and prompt cache counters since start (for /health and metrics)."""
        out: dict[str, Any] = {}
        if self.spec.mode != "none":
            drafted, accepted = self.stats["drafted"], self.stats["accepted"]
            out["speculative"] = {
                "mode": self.spec.mode,
                "drafted_tokens": drafted,
                "accepted_tokens": accepted,
                "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
            }
        if self.prompt_cache is not None:
            out["prompt_cache"] = {**self.prompt_cache.stats, "entries": len(self.prompt_cache.entries)}
        return out

    # ---------------------------------------------------------- the vocabulary
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        """Token ids of `text`; `special`: control-token text (`<|im_start|>`) becomes those tokens."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> bytes:
        return self.llm.detokenize(tokens)

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes one token stands for (control tokens only with `special`)."""
        return token_piece(self.lib, self.vocab, token, special)

    @property
    def n_vocab(self) -> int:
        return self.lib.llama_vocab_n_tokens(self.vocab)

    @property
    def adds_bos(self) -> bool:
        """Does plain text start with the vocabulary's BOS token (raw completion)?"""
        return bool(self.lib.llama_vocab_get_add_bos(self.vocab))

    def special_text(self, which: Literal["bos", "eos"]) -> str:
        """The BOS or EOS token as the vocabulary spells it, for chat templates ('' when there is none)."""
        from selfhost.runtime.llama_private import token_text

        token = self.llm.token_bos() if which == "bos" else self.llm.token_eos()
        return token_text(self.llm, token) if token != -1 else ""

    def check_grammar(self, grammar: str) -> None:
        """Compile a GBNF grammar once, to refuse a broken one before a job carries it."""
        check_grammar(self.lib, self.vocab, grammar)

    # ----------------------------------------------------------------- running
    def start(self) -> None:
        """Run the scheduler on a background thread (the server's mode)."""
        self._thread = threading.Thread(target=self._loop, name="selfhost-batch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel everything still running or waiting, stop the thread, free llama.cpp's memory."""
        with self._cond:
            self._stopping = True
            for job in list(self.waiting) + [s.job for s in self.slots if s.job]:
                job.cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self.step()  # inline mode: finish the cancelled jobs
        self.close()

    def close(self) -> None:
        if self.ctx is not None:
            if self.prompt_cache is not None and self.prompt_cache.directory is not None:
                for slot in self.slots:  # kept on disk: the next process starts from here
                    self._save_slot(slot)
            if self.drafter is not None:
                self.drafter.close()
            for slot in self.slots:
                self._free_sampler(slot)
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, job: Job) -> None:
        """Block until `job` has news: run a step ourselves inline, else wait for the thread."""
        if self._thread is None:
            _step_atomically(self.guarded_step)
            return
        with self._cond:
            self._cond.wait_for(lambda: bool(job._chunks), timeout=0.5)

    def clear_cache(self) -> None:
        """Forget every slot's cached prefix (benchmarks: measure cold prompts)."""
        with self._cond:
            for slot in self.slots:
                if slot.job is None:
                    self.lib.llama_memory_seq_rm(self.memory, slot.seq_id, 0, -1)
                    slot.cached = []
                    if self.drafter is not None:
                        self.drafter.forget(slot.seq_id)

    # --------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self.waiting or any(s.job for s in self.slots))
                if self._stopping and not self.waiting and not any(s.job for s in self.slots):
                    return
            self.guarded_step()
            with self._cond:
                self._cond.notify_all()  # sync consumers waiting in wait_for

    def guarded_step(self) -> None:
        """`step`, where an unexpected error ends the jobs it hit with that error instead of ending the
        engine thread (or the REPL) and leaving their clients waiting."""
        try:
            self.step()
        except Exception as exc:
            self._fail_active(exc)

    def step(self) -> None:
        """Admit waiting jobs, decode one batch, sample one token for every slot that has logits."""
        with self._cond:
            for slot in self.slots:
                if slot.job is not None and slot.job.cancelled:
                    self._finish(slot, "cancelled")
            while self.waiting and self.waiting[0].cancelled:
                self._reject(self.waiting.popleft(), "cancelled")
            while self.waiting and any(s.job is None for s in self.slots):
                job = self.waiting.popleft()
                try:
                    self._admit(job)
                except Exception as exc:  # only this job fails; the engine goes on
                    self._fail_admission(job, exc)
        active = [s for s in self.slots if s.job is not None]
        n_tokens, members = self._fill_batch(active)
        if n_tokens == 0:
            return
        self.batch.n_tokens = n_tokens
        rc = self.lib.llama_decode(self.ctx, self.batch)
        self.steps += 1
        if rc != 0:  # every slot with tokens in this batch: its cache no longer says what it holds
            for slot in members:
                self._drop_cache(slot)
                self._finish(slot, "error", error=f"llama.cpp could not decode the batch (code {rc})")
            return
        for slot in active:
            if slot.batch_index is not None and slot.job is not None:
                self._sample(slot)

    # -------------------------------------------------------------- internals
    def _admit(self, job: Job) -> None:
        try:
            sampler = make_sampler(self.lib, self.vocab, job.sampling, job.grammar)
        except SelfhostError as exc:
            self._reject(job, "error", error=str(exc))
            return
        slot, shared, restored = self._take_slot(job.prompt)
        keep = min(shared, len(job.prompt) - 1)  # at least one token is evaluated, for its logits
        if not self.lib.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1):
            keep = 0  # recurrent / sliding-window caches cannot cut a sequence in the middle
            self.lib.llama_memory_seq_rm(self.memory, slot.seq_id, 0, -1)
        slot.cached = slot.cached[:keep]
        slot.job, slot.pending, slot.next_token = job, job.prompt[keep:], None
        slot.generated, slot.text, slot.reused = [], TextStream(job.stop), keep
        slot.t_admit, slot.t_first = time.perf_counter(), 0.0
        slot.sampler = sampler
        slot.drafts, slot.drafted, slot.accepted, slot.restored = [], 0, 0, min(restored, keep)
        slot.pace = DraftPace(self.spec.draft_max)
        if self.spec.mode == "ngram":
            slot.ngram = NgramDrafter(self.spec.ngram)
            slot.ngram.reset(job.prompt)

    def _take_slot(self, prompt: list[int]) -> tuple[_Slot, int, int]:
        """A free slot for `prompt`: (slot, prefix it holds, tokens of it restored from the prompt cache).

        The free slot caching the longest prefix, else the lowest: active slots stay adjacent, which
        lets llama.cpp put all their tokens in one micro-batch. What the slot held is kept in the
        prompt cache before it is overwritten; a longer prefix there is restored into the slot."""
        shared, _, slot = max(
            (common_prefix(s.cached, prompt), -s.seq_id, s) for s in self.slots if s.job is None
        )
        cache = self.prompt_cache
        if cache is None:
            return slot, shared, 0
        hit = cache.best(prompt)
        if hit is None or hit[0] <= shared + RESTORE_MIN_GAIN:
            if len(slot.cached) - min(shared, len(prompt) - 1) >= RESTORE_MIN_GAIN:
                self._save_slot(slot)
            return slot, shared, 0
        self._save_slot(slot)
        entry = hit[1]
        state = cache.state_of(entry)
        if state is None or not self._restore_slot(slot, entry.tokens, state):
            if state is not None:
                cache.reject(entry, "llama.cpp could not restore it")
            return slot, 0, 0
        cache.restored(hit[0])
        return slot, hit[0], hit[0]

    def _save_slot(self, slot: _Slot) -> None:
        """Copy the slot's sequence state into the prompt cache (when it holds enough to be worth it)."""
        from selfhost.runtime.prompt_cache import MIN_TOKENS

        cache = self.prompt_cache
        if cache is None or len(slot.cached) < MIN_TOKENS or tuple(slot.cached) in cache.entries:
            return
        size = self.lib.llama_state_seq_get_size(self.ctx, slot.seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = self.lib.llama_state_seq_get_data(self.ctx, buf, size, slot.seq_id)
        if n:
            cache.put(slot.cached, ctypes.string_at(buf, n))

    def _restore_slot(self, slot: _Slot, tokens: tuple[int, ...], state: bytes) -> bool:
        """Load a cached sequence state into the slot; False (slot emptied) when llama.cpp refuses it."""
        self._drop_cache(slot)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not self.lib.llama_state_seq_set_data(self.ctx, buf, len(state), slot.seq_id):
            self._drop_cache(slot)
            return False
        slot.cached = list(tokens)
        return True

    def _fill_batch(self, active: list[_Slot]) -> tuple[int, list[_Slot]]:
        """Generating slots first (one token each), then prompt chunks within the prefill budget.
        Returns the tokens in the batch and the slots that put them there."""
        n = 0
        members = []
        for slot in active:
            slot.batch_index = None
            if slot.next_token is not None:
                slot.drafts = self._draft(slot)
                slot.batch_index = n
                for token in [slot.next_token, *slot.drafts]:  # every one with logits: each is verified
                    self._add(n, token, len(slot.cached), slot.seq_id, True)
                    slot.cached.append(token)
                    n += 1
                slot.next_token = None
                members.append(slot)
        budget = min(self.prefill_chunk, self.n_batch - n)
        for slot in active:
            if not slot.pending or budget <= 0:
                continue
            members.append(slot)
            take = slot.pending[:budget]
            for i, token in enumerate(take):
                last = len(take) == len(slot.pending) and i == len(take) - 1
                self._add(n, token, len(slot.cached), slot.seq_id, last)
                slot.cached.append(token)
                if last:
                    slot.batch_index = n
                n += 1
            slot.pending = slot.pending[len(take) :]
            budget -= len(take)
        return n, members

    def _add(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        set_token(self.batch, i, token, pos, seq_id, logits)

    def _draft(self, slot: _Slot) -> list[int]:
        """Tokens to verify after the slot's next token (none without speculation, or no room)."""
        job = slot.job
        assert job is not None and slot.next_token is not None
        room = min(
            slot.pace.budget(),  # 0 while backing off after rejected drafts
            self.ctx_per_slot - len(slot.cached) - 2,  # every drafted position stays inside the slot
            job.max_tokens - len(slot.generated) - 1,
        )
        if room <= 0:
            return []
        if slot.ngram is not None:
            return slot.ngram.draft(room)
        if self.drafter is not None:
            history = [*slot.cached, slot.next_token]
            return self.drafter.draft(slot.seq_id, history, room, self.spec.p_min)
        return []

    def _sample(self, slot: _Slot) -> None:
        """Sample at the slot's next token and at each drafted one while the draft holds."""
        lib = self.lib
        drafts, slot.drafts = slot.drafts, []
        out = []
        for j in range(len(drafts) + 1):
            token = lib.llama_sampler_sample(slot.sampler, self.ctx, slot.batch_index + j)
            out.append(token)
            if j == len(drafts) or token != drafts[j] or lib.llama_vocab_is_eog(self.vocab, token):
                break
        if drafts:  # the rejected drafts leave the cache: it holds the next token and the kept drafts
            accepted = len(out) - 1
            keep = len(slot.cached) - len(drafts) + accepted
            lib.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1)
            del slot.cached[keep:]
            slot.drafted += len(drafts)
            slot.accepted += accepted
            slot.pace.update(len(drafts), accepted)
            self.stats["drafted"] += len(drafts)
            self.stats["accepted"] += accepted
        for i, token in enumerate(out):
            if not self._take_token(slot, token, last=i == len(out) - 1):
                return

    def _take_token(self, slot: _Slot, token: int, last: bool) -> bool:
        """Emit one sampled token; False once the job has finished. The last one is evaluated next."""
        job = slot.job
        assert job is not None
        lib = self.lib
        if not slot.generated:
            slot.t_first = time.perf_counter()
        if lib.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, "stop")
            return False
        slot.generated.append(token)
        if slot.ngram is not None:
            slot.ngram.extend([token])
        text = slot.text.feed(token_piece(lib, self.vocab, token, special=job.special))
        if text:
            job._emit(JobText(text))
        if slot.text.stopped:
            self._finish(slot, "stop")
        elif len(slot.generated) >= job.max_tokens:
            self._finish(slot, "length")
        elif last and len(slot.cached) + 1 >= self.ctx_per_slot:
            self._finish(slot, "context")  # evaluating this token would pass the slot's context
        else:
            if last:
                slot.next_token = token
            return True
        return False

    def _finish(self, slot: _Slot, reason: JobFinish, error: str | None = None) -> None:
        job = slot.job
        assert job is not None
        tail = slot.text.feed(b"", final=True)
        if tail:
            job._emit(JobText(tail))
        now = time.perf_counter()
        slot.pending = []  # cancelled while reading the prompt: what was read stays cached
        end = JobEnd(
            finish_reason=reason,
            text=slot.text.full,
            generated_tokens=len(slot.generated),
            prompt_tokens=len(job.prompt),
            reused_tokens=slot.reused,
            queued_s=slot.t_admit - job.t_submit,
            time_to_first_token_s=(slot.t_first or now) - slot.t_admit,
            total_s=now - slot.t_admit,
            error=error,
            context_used=len(slot.cached),
            drafted_tokens=slot.drafted,
            accepted_tokens=slot.accepted,
            restored_tokens=slot.restored,
            stop_sequence=slot.text.matched,
        )
        self._free_sampler(slot)
        slot.job, slot.next_token, slot.batch_index, slot.drafts, slot.ngram = None, None, None, [], None
        job.end = end
        job._emit(end)

    def _fail_admission(self, job: Job, exc: Exception) -> None:
        slot = next((s for s in self.slots if s.job is job), None)
        if slot is not None:
            self._drop_cache(slot)
            self._finish(slot, "error", error=_internal_error(exc))
        else:
            self._reject(job, "error", error=_internal_error(exc))

    def _fail_active(self, exc: Exception) -> None:
        """An unexpected error in a step: every job in a slot ends with it (their caches are dropped: what
        they hold is unknown); waiting jobs and the engine go on."""
        with self._cond:
            for slot in self.slots:
                if slot.job is not None:
                    self._drop_cache(slot)
                    self._finish(slot, "error", error=_internal_error(exc))

    def _reject(self, job: Job, reason: JobFinish, error: str | None = None) -> None:
        """End a job that never got a slot."""
        queued = time.perf_counter() - job.t_submit
        job.end = JobEnd(reason, "", 0, len(job.prompt), 0, queued, 0.0, 0.0, error=error)
        job._emit(job.end)

    def _drop_cache(self, slot: _Slot) -> None:
        self.lib.llama_memory_seq_rm(self.memory, slot.seq_id, 0, -1)
        slot.cached = []

    def _free_sampler(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            self.lib.llama_sampler_free(slot.sampler)
            slot.sampler = None


def _internal_error(exc: Exception) -> str:
    return f"internal error in the batch engine: {type(exc).__name__}: {exc}"


def _step_atomically(step: Any) -> None:
    """Run one step with Ctrl-C held back until it ends, so slots never describe a half-done decode."""
    if threading.current_thread() is not threading.main_thread():
        step()
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        step()
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt
