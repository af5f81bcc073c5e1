"""`selfhost serve` core: load the model once with N slots, start the batch engine, run uvicorn.

SIGINT/SIGTERM: uvicorn stops accepting, gives in-flight requests a few seconds to finish, then
cancels the rest (their slots are freed at the next step); the engine stops and the process exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from selfhost.errors import UsageError

if TYPE_CHECKING:
    from selfhost.chat.model import ChatModel
    from selfhost.runtime.embed import Embedder


class ServeOptions(BaseModel):
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    parallel: int | None = None  # None: sized from free memory
    ctx: int | None = None  # tokens per slot
    gpu_layers: int | None = None
    threads: int | None = None
    api_key: str | None = None
    log: bool = False
    max_queue: int | None = None
    max_body: int = 8 * 2**20
    embedding_model: str | None = None
    prefill_chunk: int = 256
    graceful_seconds: int = 10
    cors_origins: list[str] = []  # --cors-origin: browser origins allowed to call the API


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


def serve(options: ServeOptions, on_ready: Callable[[str, str], None]) -> None:
    """Load, bind and serve until SIGINT/SIGTERM. on_ready(start line, url) is called before serving."""
    # llama.cpp's OpenMP workers keep spinning between two decode steps instead of sleeping: a server
    # decodes back to back, and waking them each step cost a third of single-stream speed on 2 cores
    # (bench/serve.py). Read by libgomp when llama.cpp loads, so before the first llama_cpp import.
    if "llama_cpp" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    import uvicorn

    from selfhost.chat.history import HistoryStore
    from selfhost.chat.model import ChatModel
    from selfhost.models.resolve import resolve_model
    from selfhost.serve.app import create_app
    from selfhost.serve.service import Service

    resolved = resolve_model(options.model)  # an unknown model is one clear line before anything is bound
    sock = bind(options.host, options.port)
    port = sock.getsockname()[1]
    if options.log:
        history = HistoryStore()
        history.schema_version()  # a broken history database stops us before the model loads
        history.close()
    model = ChatModel.load(
        resolved,
        ctx=options.ctx,
        threads=options.threads,
        gpu_layers=options.gpu_layers,
        raw=False,
        parallel=options.parallel,  # None: sized from free memory
        prefill_chunk=options.prefill_chunk,
        max_queue=options.max_queue,
    )
    embedder = None
    try:
        embedder = _embedder(model, options)
        model.engine.start()
        app = create_app(
            Service(model, log=options.log),
            api_key=options.api_key,
            max_body=options.max_body,
            embedder=embedder,
            shutdown_grace=max(1.0, options.graceful_seconds - 2.0),
            cors_origins=options.cors_origins,
        )
        shown = f"[{options.host}]" if ":" in options.host else options.host
        on_ready(model.summary.line(), f"http://{shown}:{port}/v1")
        config = uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=options.graceful_seconds,
            access_log=False,
            lifespan="off",
        )
        _run_until_signal(uvicorn.Server(config), sock)
    finally:
        model.close()
        if embedder is not None:
            embedder.close()
        sock.close()


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


def _embedder(model: ChatModel, options: ServeOptions) -> Embedder:
    """Embeddings from --embedding-model, else from the chat model itself."""
    from selfhost.runtime.embed import Embedder

    if options.embedding_model is None:
        return Embedder(
            model.llm, model.summary.name, n_ctx=min(model.n_ctx, 2048), threads=model.summary.threads
        )
    from selfhost.models.resolve import resolve_model
    from selfhost.runtime import gguf_info
    from selfhost.runtime.llama_backend import load_model

    resolved = resolve_model(options.embedding_model, purpose="embedding")
    info = gguf_info.inspect(Path(resolved.path))
    llm, report = load_model(
        resolved.path, n_ctx=64, n_gpu_layers=options.gpu_layers or 0, n_threads=options.threads, info=info
    )
    n_ctx = min(info.context_length or 2048, 8192)
    return Embedder(llm, resolved.name, n_ctx=n_ctx, threads=report.n_threads)
