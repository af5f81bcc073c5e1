"""The server's model manager (its scheduler, as Ollama has one): the one place `selfhost serve` turns a
request's `model` into a loaded model.

- A name is read with the one name grammar (selfhost.models.resolve), once per request, and answered by
  exactly that model: not here -> 404 `model_not_found` naming `selfhost pull NAME` (or, with `--pull`,
  pulled in the background, its progress in the log and in /v1/status); an embedding model asked to
  chat -> 400 naming its kind.
- A model loads on first use on a worker thread while the loaded ones keep streaming; concurrent first
  requests wait for that one load. A failed load is an error for those requests; the server stays up.
- After its last request a model stays loaded for its keep-alive (server `--keep-alive`, per-model
  settings, the request's `keep_alive`; -1 forever, 0 unload right after the reply). Before a load, the
  least recently used idle models are unloaded while `--max-models` or the memory budget (free RAM /
  VRAM against the GGUF's weights + KV cache) would be passed; a model with requests in flight is
  never unloaded: the load waits for it.

All state lives on the event loop's thread; loads, unloads and resolution run on worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from selfhost.errors import SelfhostError, UsageError
from selfhost.serve.config import ModelSettings, parse_keep_alive
from selfhost.serve.service import ApiError

if TYPE_CHECKING:
    from selfhost.chat.model import ChatModel
    from selfhost.models.resolve import ResolvedModel
    from selfhost.runtime.embed import Embedder
    from selfhost.runtime.gguf_info import GGUFInfo
    from selfhost.runtime.jobs import JobEnd
    from selfhost.serve.server import ServeOptions
    from selfhost.serve.service import Service

Purpose = Literal["chat", "embedding"]
REAP_SECONDS = 1.0


@dataclass(eq=False)
class Managed:
    """One loaded model: a chat model (with its Service) or an embedding-only model."""

    name: str
    resolved: ResolvedModel
    info: GGUFInfo
    kind: str  # "chat" | "embedding"
    estimate: int  # bytes: weights + KV cache
    chat: ChatModel | None = None
    service: Service | None = None
    embedder: Embedder | None = None
    llm: Any = None  # the embedding model's Llama
    backend: str = "CPU"
    layers: tuple[int, int] = (0, 0)
    active: int = 0  # requests in flight
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = field(default_factory=time.time)
    expires_at: float | None = None  # wall clock; None: never (keep-alive -1) or in use
    keep_alive: float = 300.0
    load_seconds: float = 0.0  # how long the load took (metrics)

    def embedder_for(self) -> Embedder:
        """The model's embedder (a chat model's is made on first use)."""
        if self.embedder is None:
            from selfhost.runtime.embed import Embedder

            assert self.chat is not None
            chat = self.chat
            n_ctx, threads = min(chat.n_ctx, 2048), chat.summary.threads
            self.embedder = Embedder(chat.llm, self.name, n_ctx=n_ctx, threads=threads)
        return self.embedder

    def status(self) -> dict[str, Any]:
        busy, queued = self.chat.engine.busy() if self.chat is not None else (0, 0)
        summary = self.chat.summary if self.chat is not None else None
        return {
            "name": self.name,
            "kind": self.kind,
            "path": str(self.resolved.path),
            "size": self.info.size,
            "memory": self.estimate,
            "quant": self.info.quant,
            "slots": summary.slots if summary else 1,
            "slots_busy": busy if self.chat is not None else min(self.active, 1),
            "queued": queued,
            "requests": self.active,
            "context": summary.n_ctx if summary else (self.embedder.n_ctx if self.embedder else 0),
            "backend": self.backend,
            "layers_offloaded": self.layers[0],
            "layers": self.layers[1],
            "loaded_at": self.loaded_at,
            "expires_at": self.expires_at,
            "keep_alive": self.keep_alive,
            **(self.chat.engine.counters() if self.chat is not None else {}),  # speculation, prompt cache
        }


class ModelManager:
    def __init__(
        self,
        options: ServeOptions,
        settings: dict[str, ModelSettings] | None = None,
        on_log: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.settings = settings or {}
        self.keep_alive = parse_keep_alive(options.keep_alive)
        self.loaded: dict[str, Managed] = {}  # by resolved name: a name is answered by its own model
        self.known: dict[str, ResolvedModel] = {}  # names loaded before -> their resolved model
        self.default: str | None = None  # a chat request without `model` gets this one
        self.default_embedding: str | None = None  # and an embedding request, this one
        self.loads: dict[str, int] = {}  # model name -> loads so far (a model is never loaded twice at once)
        self.failures: dict[str, str] = {}
        self.pulling: dict[str, dict[str, Any]] = {}
        self._loading: dict[str, asyncio.Future[Managed]] = {}
        self._changed: asyncio.Condition | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._log = on_log or (lambda line: print(f"selfhost serve: {line}", file=sys.stderr, flush=True))
        self._lock = threading.Lock()  # load/unload bodies: one llama.cpp load at a time
        self.observers: list[Callable[[JobEnd], None]] = []  # told of every finished job (metrics)

    # ------------------------------------------------------------ resolving
    def resolve(self, name: str | None, purpose: Purpose) -> ResolvedModel:
        """The model a request names, or the ApiError that refuses it (run on a worker thread)."""
        from selfhost.models.resolve import NotDownloaded, resolve_model

        ref = name or (self.default_embedding if purpose == "embedding" else None) or self.default
        if ref is None:
            message = "name a model: `model` is required (GET /v1/models lists them)"
            raise ApiError(400, message, param="model")
        resolved = self.known.get(ref)  # a model served before (a command-line path keeps its short name)
        if resolved is not None and Path(resolved.path).exists():
            self._check_kind(resolved, purpose)
            return resolved
        try:
            resolved = resolve_model(ref, purpose="embedding")  # every kind: the kind check follows
        except NotDownloaded as missing:
            if self.options.pull:
                return self._pull(str(missing.name), purpose)
            raise ApiError(
                404,
                f"model '{ref}' is not downloaded: run `selfhost pull {missing.name}` "
                "(or start the server with --pull)",
                code="model_not_found",
                param="model",
            ) from None
        except UsageError as exc:
            raise ApiError(400, f"model '{ref}': {exc}", param="model") from None
        except SelfhostError as exc:
            raise ApiError(
                404, f"model '{ref}' was not found: {exc}", code="model_not_found", param="model"
            ) from None
        self._check_kind(resolved, purpose)
        return resolved

    def _check_kind(self, resolved: ResolvedModel, purpose: Purpose) -> None:
        from selfhost.models.resolve import model_kind

        if purpose == "chat" and model_kind(resolved) == "embedding":
            raise ApiError(
                400,
                f"{resolved.name} is an embedding model (kind: embedding): it cannot chat; "
                "use it with /v1/embeddings",
                code="model_kind",
                param="model",
            )

    def _pull(self, name: str, purpose: Purpose) -> ResolvedModel:
        """--pull: download on a worker thread, progress in the log and in /v1/status."""
        from selfhost.events import Notice, Progress, run_to_end
        from selfhost.models.pull import pull
        from selfhost.models.resolve import resolve_model

        self.pulling[name] = {"name": name, "done": 0, "total": None}

        def on_event(event: object) -> None:
            if isinstance(event, Notice):
                self._log(f"pull {name}: {event.message}")
            elif isinstance(event, Progress):
                self.pulling[name] = {"name": name, "done": event.done, "total": event.total}

        try:
            self._log(f"pulling {name}")
            record = run_to_end(pull(name), on_event).record
        except SelfhostError as exc:
            message = f"could not pull {name}: {exc}"
            raise ApiError(502, message, type="server_error", code="pull_failed") from None
        finally:
            self.pulling.pop(name, None)
        self._log(f"pulled {record.name}")
        return self.resolve(record.name, purpose) if record.name != name else resolve_model(record.name)

    # ------------------------------------------------------------- leasing
    async def acquire(self, name: str | None, purpose: Purpose) -> Managed:
        """The loaded model for a request, counted in flight until `release`. Loads it if needed."""
        from starlette.concurrency import run_in_threadpool

        self._start_reaper()
        resolved = await run_in_threadpool(self.resolve, name, purpose)
        key = resolved.name
        while True:
            managed = self.loaded.get(key)
            if managed is not None:
                managed.active += 1
                managed.expires_at = None
                managed.last_used = time.monotonic()
                return managed
            pending = self._loading.get(key)
            if pending is not None:
                with contextlib.suppress(Exception):  # the loader reports the failure to its request
                    await asyncio.shield(pending)
                if pending.exception() is not None:
                    raise _load_error(resolved.name, pending.exception())
                continue
            await self._load(resolved)

    def release(self, managed: Managed, keep_alive: str | float | None = None) -> None:
        """A request is done with `managed`; its keep-alive starts (0: unload now)."""
        managed.active -= 1
        managed.last_used = time.monotonic()
        seconds = self._keep_alive_for(managed.name, keep_alive)
        managed.keep_alive = seconds
        if managed.active == 0:
            managed.expires_at = None if seconds < 0 else time.time() + seconds
            if seconds == 0:
                asyncio.get_running_loop().create_task(self._unload(managed))
        self._notify()

    def _keep_alive_for(self, name: str, requested: str | float | None) -> float:
        try:
            seconds = parse_keep_alive(requested)
        except ValueError as exc:
            raise ApiError(400, f"keep_alive: {exc}", param="keep_alive") from None
        if seconds is None:
            seconds = parse_keep_alive(self._settings(name).keep_alive)
        return self.keep_alive if seconds is None else seconds  # type: ignore[return-value]

    def check_keep_alive(self, requested: str | float | None) -> None:
        """Refuse a bad `keep_alive` before any work."""
        self._keep_alive_for("", requested)

    # ------------------------------------------------------------- loading
    async def _load(self, resolved: ResolvedModel) -> None:
        from starlette.concurrency import run_in_threadpool

        key = resolved.name
        future: asyncio.Future[Managed] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" warning
        self._loading[key] = future
        try:
            info, estimate = await run_in_threadpool(self._estimate, resolved)
            await self._make_room(estimate)
            managed = await run_in_threadpool(self.load_now, resolved, info, estimate)
        except BaseException as exc:
            if isinstance(exc, SelfhostError):
                self.failures[resolved.name] = str(exc)
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            self._loading.pop(key, None)
            self._notify()
            if isinstance(exc, ApiError | asyncio.CancelledError):
                raise
            raise _load_error(resolved.name, exc) from None
        self._loading.pop(key, None)
        future.set_result(managed)
        self._notify()

    def _estimate(self, resolved: ResolvedModel) -> tuple[GGUFInfo, int]:
        """The GGUF's metadata (validated) and its weights + KV cache in bytes."""
        from selfhost.runtime import gguf_info
        from selfhost.runtime.memory import CONTEXT_CEILING, kv_bytes_per_token

        info = gguf_info.inspect(resolved.path)
        settings = self._settings(resolved.name)
        ctx = settings.ctx or self.options.ctx or min(info.context_length or 2048, CONTEXT_CEILING)
        slots = settings.parallel or self.options.parallel or 1
        return info, info.size + kv_bytes_per_token(info) * ctx * slots

    async def _make_room(self, estimate: int) -> None:
        """Unload least recently used idle models until the new one fits; wait while the ones that
        would have to go still have requests in flight."""
        from starlette.concurrency import run_in_threadpool

        limit = self.options.max_models
        while True:
            idle = sorted((m for m in self.loaded.values() if m.active == 0), key=lambda m: m.last_used)
            count = len(self.loaded)
            too_many = limit is not None and count >= limit
            free = await run_in_threadpool(_free_memory, self.options.gpu_layers)
            too_big = free is not None and estimate > free and count > 0
            if not (too_many or too_big):
                return
            if idle:
                reason = f"--max-models {limit}" if too_many else "memory"
                await self._unload(idle[0], reason=f"to make room ({reason})")
                continue
            await self._wait_for_change()

    def load_now(
        self, resolved: ResolvedModel, info: GGUFInfo | None = None, estimate: int | None = None
    ) -> Managed:
        """Load `resolved` on this thread and register it (the preload of `serve MODEL...` and the body
        of every load). Raises SelfhostError."""
        from selfhost.models.resolve import model_kind

        if info is None or estimate is None:
            info, estimate = self._estimate(resolved)
        settings = self._settings(resolved.name)
        kind = "embedding" if model_kind(resolved) == "embedding" or not info.chat_template else "chat"
        started = time.perf_counter()
        with self._lock:
            managed = self._load_chat(resolved, info, estimate, settings) if kind == "chat" else (
                self._load_embedding(resolved, info, estimate, settings))
        self.loads[managed.name] = self.loads.get(managed.name, 0) + 1
        self.failures.pop(managed.name, None)
        managed.keep_alive = self._keep_alive_for(managed.name, None)
        managed.expires_at = None if managed.keep_alive < 0 else time.time() + managed.keep_alive
        managed.load_seconds = time.perf_counter() - started
        self.loaded[managed.name] = managed
        self.known[managed.name] = resolved
        self._log(f"loaded {managed.name} ({kind}) in {managed.load_seconds:.1f} s")
        return managed

    def _load_chat(
        self, resolved: ResolvedModel, info: GGUFInfo, estimate: int, settings: ModelSettings
    ) -> Managed:
        from selfhost.chat.model import ChatModel
        from selfhost.serve.service import Service

        o = self.options
        chat = ChatModel.load(
            resolved,
            ctx=settings.ctx or o.ctx,
            threads=o.threads,
            gpu_layers=_first(settings.gpu_layers, o.gpu_layers),
            raw=False,
            parallel=settings.parallel or o.parallel,
            prefill_chunk=o.prefill_chunk,
            max_queue=o.max_queue,
            options=o.engine,
        )
        if chat.engine.prompt_cache is not None:  # a foreign or corrupt cache file was ignored
            for notice in chat.engine.prompt_cache.take_notices():
                print(f"selfhost serve: {notice.message}", file=sys.stderr)
        chat.engine.start()
        s = chat.summary
        service = Service(chat, log=o.log)
        service.observers = self.observers  # one list for every model: metrics see every reply
        return Managed(
            name=resolved.name, resolved=resolved, info=info, kind="chat", estimate=estimate, chat=chat,
            service=service, backend=s.backend, layers=(s.layers_offloaded, s.n_layers),
        )  # fmt: skip

    def _load_embedding(
        self, resolved: ResolvedModel, info: GGUFInfo, estimate: int, settings: ModelSettings
    ) -> Managed:
        from selfhost.runtime.embed import Embedder
        from selfhost.runtime.llama_backend import default_gpu_layers, load_model

        gpu_layers = _first(settings.gpu_layers, self.options.gpu_layers)
        llm, report = load_model(
            resolved.path,
            n_ctx=64,
            n_gpu_layers=default_gpu_layers() if gpu_layers is None else gpu_layers,
            n_threads=self.options.threads,
            info=info,
        )
        n_ctx = settings.ctx or min(info.context_length or 2048, 8192)
        embedder = Embedder(llm, resolved.name, n_ctx=n_ctx, threads=report.n_threads)
        return Managed(
            name=resolved.name, resolved=resolved, info=info, kind="embedding", estimate=estimate,
            embedder=embedder, llm=llm, backend=report.backend,
            layers=(report.layers_offloaded, report.n_layers),
        )  # fmt: skip

    def _settings(self, name: str) -> ModelSettings:
        """Per-model settings: by the resolved name, else by the name without its quant (an alias)."""
        base = name.split(":", 1)[0]
        return self.settings.get(name) or self.settings.get(base) or ModelSettings()

    # ----------------------------------------------------------- unloading
    async def _unload(self, managed: Managed, reason: str = "") -> None:
        from starlette.concurrency import run_in_threadpool

        key = managed.name
        if self.loaded.get(key) is not managed or managed.active > 0:
            return  # in use again, or gone already
        del self.loaded[key]
        await run_in_threadpool(self.close_model, managed)
        self._log(f"unloaded {managed.name}" + (f" {reason}" if reason else ""))
        self._notify()

    def close_model(self, managed: Managed) -> None:
        with self._lock:
            if managed.chat is not None:
                managed.chat.close()
            if managed.embedder is not None:
                managed.embedder.close()
            llm = managed.llm or (managed.chat.llm if managed.chat is not None else None)
            if llm is not None:
                llm.close()
            managed.chat = managed.embedder = managed.llm = None
        import gc

        gc.collect()

    def close(self) -> None:
        """Stop every model (server shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
        for managed in list(self.loaded.values()):
            self.close_model(managed)
        self.loaded.clear()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Unload models whose keep-alive ran out."""
        while True:
            await asyncio.sleep(REAP_SECONDS)
            now = time.time()
            for managed in list(self.loaded.values()):
                if managed.active == 0 and managed.expires_at is not None and managed.expires_at <= now:
                    await self._unload(managed, reason="(keep-alive ran out)")

    def _notify(self) -> None:
        if self._changed is None:
            return
        loop = asyncio.get_running_loop()

        async def notify() -> None:
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()

        loop.create_task(notify())

    async def _wait_for_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=1.0)

    # -------------------------------------------------------------- views
    def status(self) -> dict[str, Any]:
        return {
            "models": [m.status() for m in self.loaded.values()],
            "loading": sorted(self._loading),
            "pulling": list(self.pulling.values()),
            "loads": dict(self.loads),
            "failures": dict(self.failures),
            "max_models": self.options.max_models,
            "keep_alive": self.keep_alive,
        }

    def listing(self) -> list[dict[str, Any]]:
        """Every servable model for /v1/models: loaded or not, kind, context length, size."""
        from selfhost.models.local import local_models
        from selfhost.models.resolve import EMBEDDING_ARCHITECTURES

        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for managed in self.loaded.values():
            status = managed.status()
            rows.append({"id": managed.name, "loaded": True, "kind": managed.kind,
                         "context_length": status["context"], "size": managed.info.size})  # fmt: skip
            seen.add(managed.name)
        try:
            local = local_models()
        except SelfhostError:  # a broken store must not break the API: the loaded models still answer
            local = []
        for model in local:
            if model.name in seen:
                continue
            seen.add(model.name)
            row: dict[str, Any] = {"id": model.name, "loaded": False, "size": model.size}
            try:
                info = _info_cached(Path(model.path))
            except SelfhostError:
                row.update(kind="unknown", context_length=None)
            else:
                embedding = info.architecture in EMBEDDING_ARCHITECTURES or not info.chat_template
                row.update(kind="embedding" if embedding else "chat", context_length=info.context_length)
            rows.append(row)
        return rows


_INFO_CACHE: dict[tuple[Path, float], GGUFInfo] = {}


def _info_cached(path: Path) -> GGUFInfo:
    from selfhost.runtime import gguf_info

    key = (path, path.stat().st_mtime)
    if key not in _INFO_CACHE:
        _INFO_CACHE[key] = gguf_info.inspect(path)
    return _INFO_CACHE[key]


def _free_memory(gpu_layers: int | None) -> int | None:
    """Bytes a new model may take: free VRAM when layers go to a GPU, else free RAM (None: unknown)."""
    from selfhost.models.catalog import memory_budget
    from selfhost.runtime.llama_backend import default_gpu_layers

    budget = memory_budget()
    offload = default_gpu_layers() if gpu_layers is None else gpu_layers
    if offload != 0 and budget.vram is not None:
        return budget.vram
    return budget.ram


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _load_error(name: str, exc: BaseException | None) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    message = f"{name} could not be loaded: {exc}"
    if isinstance(exc, SelfhostError) and exc.hint:
        message += f" ({exc.hint})"
    return ApiError(500, message, type="server_error", code="model_load_failed", param="model")
