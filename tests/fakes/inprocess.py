"""`selfhost serve` in this process, on a thread, so that what a test monkeypatched (the fake engine of
tests/fakes/engine.py) reaches it.

It runs the real selfhost.serve.server.serve: the socket bound on 127.0.0.1, the models preloaded through
the model manager, the FastAPI app, uvicorn. Only its last step differs: instead of serving until SIGINT
or SIGTERM (signals reach the main thread only), uvicorn serves until `stop()`. Same face as
servehelp.Server (url, headers, health, stop) for the helpers the serve tests share.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest


class InProcessServer:
    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        models: Sequence[str | Path] = (),
        *,
        api_key: str | None = None,
        **options: Any,
    ) -> None:
        from selfhost.models.resolve import resolve_model
        from selfhost.serve import server
        from selfhost.serve.server import ServeOptions

        self.api_key = api_key
        self.lines: list[str] = []
        self.url = ""
        self._uvicorn: Any = None
        self._error: BaseException | None = None
        self._ended = threading.Event()

        def run_until_stopped(uvicorn_server: Any, sock: Any) -> None:
            self._uvicorn = uvicorn_server
            uvicorn_server.run(sockets=[sock])

        def ready(lines: list[str], url: str) -> None:
            self.lines, self.url = lines, url.removesuffix("/v1")

        monkeypatch.setattr(server, "_run_until_signal", run_until_stopped)
        opts = ServeOptions(models=[str(m) for m in models], port=0, api_key=api_key, **options)
        preload = [resolve_model(str(m)) for m in models]  # what the CLI hands down: resolved once

        def main() -> None:
            try:
                server.serve(opts, ready, preload=preload)
            except BaseException as exc:  # a failed start is raised in the test's thread
                self._error = exc
            finally:
                self._ended.set()

        self._thread = threading.Thread(target=main, name="selfhost-serve", daemon=True)
        self._thread.start()
        while not self._ended.wait(0.02):
            if self._uvicorn is not None and self._uvicorn.started:
                return
        raise RuntimeError("serve stopped before it started") from self._error

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self, timeout: float = 30) -> None:
        """Stop uvicorn as a signal would (in-flight requests finish), then the models close."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "serve did not stop"
        if self._error is not None:
            raise self._error
