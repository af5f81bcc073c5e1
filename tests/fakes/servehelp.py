"""Start `selfhost serve` from this checkout in a subprocess on a free 127.0.0.1 port, and stop it.

The one way tests start a server: `with Server(model, home, *flags) as srv:` (or a fixture that yields
inside that `with`) stops it at the end and checks that it exited 0, its log shown if not."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path | None, home: Path, *args: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.home = home  # the server's SELFHOST_HOME (its store and history.db)
        env = {**os.environ, "SELFHOST_HOME": str(home), "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
        env.pop("SELFHOST_API_KEY", None)
        models = [str(model)] if model is not None else []  # None: no preload, every model on demand
        command = [sys.executable, "-m", "selfhost", "serve", *models, "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        self.log = home.parent / f"serve-{self.port}.log"
        home.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Server:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        code = self.stop()
        if error_type is None:  # a failing test keeps its own error; otherwise the exit must be clean
            assert code == 0, f"serve exited with {code}:\n{self.output()}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"serve did not start:\n{self.output()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


# A tool's parameters, as JSON schema: the served tool-call tests validate arguments against it.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
