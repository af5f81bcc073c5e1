"""A fake Hugging Face Hub: a real threaded HTTP server on 127.0.0.1 for tests and benchmarks.

It speaks the subset of the Hub's HTTP API that huggingface-hub and selfhost use:

- `GET /api/models/{repo}[/revision/{rev}]`: model info with `sha` and `siblings` (sizes, blob ids and
  LFS sha256 when `?blobs=true`, as `model_info(files_metadata=True)` asks);
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with `Range` (206 + Content-Range, 416), and the headers
  huggingface-hub needs: X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size, Content-Length, Accept-Ranges;
- errors with `X-Error-Code` like the Hub: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo.

Switches for failure tests: `gate(repo, allowed_tokens)` (401 without a token, 403 with a wrong one),
`private` repos (401 on the API), `cut_at[(repo, file)] = N` (the body stops at absolute byte N and the
connection is dropped), `corrupt` (one byte flipped, metadata unchanged), `throttle_bps`; and counters:
`bytes_served`, `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class FakeRepo:
    files: dict[str, bytes] = field(default_factory=dict)
    commit: str = field(default_factory=lambda: secrets.token_hex(20))
    gated_tokens: set[str] | None = None  # None: not gated
    private: bool = False
    lfs_min_size: int = 0  # files at least this big are "LFS" (have a sha256 in the metadata)
    digests: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (sha256, git blob id)

    def digest(self, name: str) -> tuple[str, str]:
        if name not in self.digests:
            data = self.files[name]
            self.digests[name] = (hashlib.sha256(data).hexdigest(), git_blob_id(data))
        return self.digests[name]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.cut_at: dict[tuple[str, str], int] = {}
        self.cuts_left: int | None = None  # None: cut every time; N: only the next N transfers
        self.corrupt: set[tuple[str, str]] = set()
        self.throttle_bps: int | None = None
        self.ignore_range = False  # answer a Range request with 200 and the whole file
        self.range_status: int | None = None  # answer every Range request with this status (e.g. 416)
        self.bytes_served = 0
        self.active = 0  # transfers in progress
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content ---------------------------------------------------------------------------------
    def add_file(self, repo: str, name: str, data: bytes) -> FakeRepo:
        fake = self.repos.setdefault(repo, FakeRepo())
        fake.files[name] = data
        fake.digests.pop(name, None)
        fake.commit = secrets.token_hex(20)  # every upload is a new commit, like the Hub
        return fake

    def gate(self, repo: str, allowed_tokens: set[str]) -> None:
        self.repos[repo].gated_tokens = set(allowed_tokens)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no transfer is in progress (e.g. after killing a client)."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.02)

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served = 0
            self.requests.clear()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    # -- routing ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self._route(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._route(head=False)

    def _route(self, *, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        with self.fake._lock:
            self.fake.requests.append((self.command, path, self.headers.get("Range")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path)
        if api:
            return self._model_info(api.group(1), api.group(2) or "main", parse_qs(url.query), head)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            return self._resolve(resolve.group(1), resolve.group(2), resolve.group(3), head)
        self._error(404, "RepoNotFound", "not found")

    # -- helpers ---------------------------------------------------------------------------------
    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth.removeprefix("Bearer ").strip() or None

    def _repo(self, repo_id: str, revision: str) -> FakeRepo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if repo.private and self._token() not in (repo.gated_tokens or set()):
            self._error(401, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    # -- endpoints -------------------------------------------------------------------------------
    def _model_info(self, repo_id: str, revision: str, query: dict[str, list[str]], head: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, data in sorted(repo.files.items()):
            sib: dict[str, object] = {"rfilename": name}
            if blobs:
                sib["size"] = len(data)
                sha256, blob_id = repo.digest(name)
                sib["blobId"] = blob_id
                if len(data) >= repo.lfs_min_size:
                    sib["lfs"] = {"size": len(data), "sha256": sha256, "pointerSize": 134}
            siblings.append(sib)
        info = {
            "_id": repo_id,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": repo.commit,
            "private": repo.private,
            "gated": "manual" if repo.gated_tokens is not None and not repo.private else False,
            "disabled": False,
            "tags": ["gguf"],
            "siblings": siblings,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if repo.gated_tokens is not None and not repo.private:
            token = self._token()
            if token is None:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.", repo.commit)
            if token not in repo.gated_tokens:
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted.", repo.commit)
        data = repo.files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", repo.commit)
        key = (repo_id, filename)
        served = bytearray(data) if key in self.fake.corrupt else data
        if key in self.fake.corrupt and served:
            served[len(served) // 2] ^= 0xFF
        total = len(data)
        start, end = 0, total - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and not head and self.fake.range_status is not None:
            self.send_response(self.fake.range_status)
            self.send_header("Content-Range", f"bytes */{total}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rng and not head and not self.fake.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else total - 1, total - 1)
                if start >= total:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{total}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        sha256, blob_id = repo.digest(filename)
        etag = sha256 if len(data) >= repo.lfs_min_size else blob_id
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{etag}"')
        if len(data) >= repo.lfs_min_size:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(total))
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.end_headers()
        if head:
            return
        cut = self.fake.cut_at.get(key)
        if cut is not None and self.fake.cuts_left is not None:
            with self.fake._lock:
                if self.fake.cuts_left <= 0:
                    cut = None
                elif cut < end + 1:
                    self.fake.cuts_left -= 1
        self._send_body(bytes(served), start, end + 1, cut)

    def _send_body(self, data: bytes, start: int, stop: int, cut: int | None) -> None:
        pos = start
        limit = min(stop, cut) if cut is not None and cut >= start else stop
        step = 1024 * 1024
        view = memoryview(data)
        with self.fake._lock:
            self.fake.active += 1
        try:
            while pos < limit:
                chunk = view[pos : min(pos + step, limit)]
                self.wfile.write(chunk)
                pos += len(chunk)
                with self.fake._lock:
                    self.fake.bytes_served += len(chunk)
                if self.fake.throttle_bps:
                    time.sleep(len(chunk) / self.fake.throttle_bps)
            if limit < stop:  # drop the connection mid-body
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            with self.fake._lock:
                self.fake.active -= 1
