"""`selfhost serve` core: bind, preload the models named at start, serve every local model on demand
through the model manager (selfhost/serve/manager.py), run uvicorn.

SIGINT/SIGTERM: uvicorn stops accepting, gives in-flight requests a few seconds to finish, then
cancels the rest (their slots are freed at the next step); the engine stops and the process exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, field_validator

from selfhost.chat.model import EngineOptions
from selfhost.errors import UsageError
from selfhost.serve.defaults import field

if TYPE_CHECKING:
    from selfhost.models.resolve import ResolvedModel
    from selfhost.runtime.embed import Embedder
    from selfhost.serve.config import ModelSettings
    from selfhost.serve.manager import ModelManager


class ServeOptions(BaseModel):
    """Every `selfhost serve` setting; defaults and bounds from selfhost.serve.defaults (the CLI's too).
    Slots, context and GPU layers are per-model defaults (selfhost.serve.config overrides them)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key in a --config file's [serve] is an error

    models: list[str] = []  # names given at start (loaded then; the rest load on first use)
    host: str = field("host")
    port: int = field("port")
    parallel: int | None = field("parallel")
    ctx: int | None = field("ctx")
    gpu_layers: int | None = field("gpu_layers")
    threads: int | None = field("threads")
    api_key: str | None = None
    log: bool = False
    max_queue: int | None = field("max_queue")
    max_body: int = field("max_body")
    embedding_model: str | None = None
    prefill_chunk: int = field("prefill_chunk")
    graceful_seconds: int = 10
    keep_alive: str = field("keep_alive")
    max_models: int | None = field("max_models")
    cors_origins: list[str] = []  # --cors-origin: browser origins allowed to call the API
    pull: bool = False  # pull a requested model that is not downloaded yet
    engine: EngineOptions = EngineOptions(cache_ram_mb=1024)  # KV types, speculation, prompt cache
    metrics_public: bool = False  # /metrics without the API key

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: object) -> str:
        from selfhost.serve.config import parse_keep_alive

        parse_keep_alive(value)  # type: ignore[arg-type]
        return str(value)


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket first, so a busy port is one clear error before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="choose another --port"
        ) from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(
    options: ServeOptions,
    on_ready: Callable[[list[str], str], None],
    preload: Sequence[ResolvedModel] = (),
    embedding: ResolvedModel | None = None,
    settings: dict[str, ModelSettings] | None = None,
    reranker: ResolvedModel | None = None,
) -> None:
    """Bind, load the `preload` models (resolved by the caller), serve until SIGINT/SIGTERM.
    on_ready(start lines, url) is called before serving."""
    # llama.cpp's OpenMP workers keep spinning between two decode steps instead of sleeping: a server
    # decodes back to back, and waking them each step cost a third of single-stream speed on 2 cores
    # (bench/serve.py). Read by libgomp when llama.cpp loads, so before the first llama_cpp import.
    if "llama_cpp" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    import uvicorn

    from selfhost.chat.history import HistoryStore
    from selfhost.serve.app import create_app
    from selfhost.serve.manager import ModelManager

    sock = bind(options.host, options.port)
    port = sock.getsockname()[1]
    if options.log:
        history = HistoryStore()
        history.schema_version()  # a broken history database stops us before the model loads
        history.close()
    manager = ModelManager(options, settings)
    ranker = None
    try:
        lines = _preload(manager, preload, embedding)
        if reranker is not None:  # --rerank-model: read with rank pooling, beside the managed models
            ranker = _reranker(reranker, options)
            lines.append(f"{ranker.name} · reranker")
        app = create_app(
            manager,
            api_key=options.api_key,
            max_body=options.max_body,
            shutdown_grace=max(1.0, options.graceful_seconds - 2.0),
            metrics_public=options.metrics_public,
            reranker=ranker,
            cors_origins=options.cors_origins,
        )
        shown = f"[{options.host}]" if ":" in options.host else options.host
        on_ready(lines, f"http://{shown}:{port}/v1")
        config = uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=options.graceful_seconds,
            access_log=False,
            lifespan="off",
        )
        _run_until_signal(uvicorn.Server(config), sock)
    finally:
        manager.close()
        if ranker is not None:
            ranker.close()
        sock.close()


def _preload(
    manager: ModelManager, preload: Sequence[ResolvedModel], embedding: ResolvedModel | None
) -> list[str]:
    """Load the models named at start; the first answers requests that name no model."""
    from selfhost.models.embedded import DEFAULT_MODEL

    lines = []
    for resolved in preload:
        managed = manager.load_now(resolved)
        chat = managed.chat
        lines.append(chat.summary.line() if chat is not None else f"{managed.name} · embedding")
    if embedding is not None:
        managed = manager.load_now(embedding)
        manager.default_embedding = managed.name
        lines.append(f"{managed.name} · embeddings")
    manager.default = preload[0].name if preload else DEFAULT_MODEL
    if not preload:
        lines.append("no model loaded yet: every model `selfhost models list` shows loads on first use")
    return lines


def _run_until_signal(server: object, sock: socket.socket) -> None:
    """Serve until SIGINT/SIGTERM. uvicorn shuts down gracefully, then re-raises the signal it caught:
    our handlers turn that into a normal return, so the caller cleans up and the process exits 0."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])  # type: ignore[attr-defined]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _reranker(resolved: ResolvedModel, options: ServeOptions) -> Embedder:
    """The --rerank-model reranker: a model read with llama.cpp's rank pooling."""
    from selfhost.runtime import gguf_info
    from selfhost.runtime.embed import Embedder
    from selfhost.runtime.llama_backend import load_model

    info = gguf_info.inspect(Path(resolved.path))
    llm, report = load_model(
        resolved.path, n_ctx=64, n_gpu_layers=options.gpu_layers or 0, n_threads=options.threads, info=info
    )
    n_ctx = min(info.context_length or 2048, 8192)
    return Embedder(llm, resolved.name, n_ctx=n_ctx, threads=report.n_threads, rank=True)
