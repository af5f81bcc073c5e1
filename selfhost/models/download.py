"""Resumable, verified downloads into huggingface-hub's cache.

huggingface-hub (2.x) downloads into a process-unique `<etag>.<uuid>.incomplete` file and deletes it
when the transfer fails, so a killed or interrupted `hf download` starts again from zero. Here the
partial bytes live in `blobs/<etag>.incomplete` (one name per blob, guarded by huggingface-hub's own
lock file), the next run continues with an HTTP Range request, the sha256 is computed while the
bytes arrive (the bytes already on disk are hashed first), and only a file whose size and sha256
match the Hub's metadata is renamed onto `blobs/<etag>`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from selfhost.errors import DownloadError, IntegrityError
from selfhost.events import Notice, Progress
from selfhost.models import hub
from selfhost.units import human_bytes

CHUNK = 1 << 20
PROGRESS_EVERY = 1 << 20  # bytes between Progress events


def _progress(remote: hub.RemoteFile, done: int, total: int | None, resumed_from: int) -> Progress:
    """`done` of `total` bytes of the file on disk (`resumed_from` came from an earlier run)."""
    return Progress(remote.name, done, total, unit="B", metrics={"resumed_from": resumed_from})


def fetch_blob(
    url: str,
    layout: hub.CacheLayout,
    remote: hub.RemoteFile,
    *,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> Iterator[Progress | Notice]:
    """Download `url` into `layout`'s blob for `remote` (resuming a partial file); returns the sha256.

    Yields Progress (unit "B", metrics["resumed_from"]) and Notices (resuming, retrying). Raises
    DownloadError when the transfer keeps failing (the partial bytes stay for the next run) and
    IntegrityError when the finished file does not match the Hub (the partial file is deleted).
    """
    from filelock import FileLock

    etag = remote.etag
    if not etag:
        raise DownloadError(f"the Hub gave no checksum or blob id for {remote.name}")
    blob, part = layout.blob(etag), layout.incomplete(etag)
    lock_path = layout.lock(etag)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path)):
        if blob.exists():
            return (yield from _verify_existing(blob, remote))
        digest = yield from _transfer(url, part, remote, retries=retries, backoff_s=backoff_s)
        os.replace(part, blob)
    return digest


def _verify_existing(blob: Path, remote: hub.RemoteFile) -> Iterator[Progress]:
    size = blob.stat().st_size
    h = hashlib.sha256()
    done = 0
    with open(blob, "rb") as fh:
        while block := fh.read(CHUNK * 8):
            h.update(block)
            done += len(block)
    yield _progress(remote, size, size, size)
    _check(blob, remote, size, h.hexdigest(), delete=True)
    return h.hexdigest()


def _transfer(
    url: str, part: Path, remote: hub.RemoteFile, *, retries: int, backoff_s: float
) -> Iterator[Progress | Notice]:
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    http = hub.http_module()

    total = remote.size
    have, h = _bytes_on_disk(part, total)
    resumed_from = have
    started = False

    headers = build_hf_headers(token=hub.token())
    headers["Accept-Encoding"] = "identity"
    attempt = 0
    while total is None or have < total:
        request_headers = dict(headers)
        if have:
            request_headers["Range"] = f"bytes={have}-"
        progressed = False
        try:
            with get_session().stream(
                "GET", url, headers=request_headers, timeout=http.Timeout(60.0, connect=15.0)
            ) as response:
                if response.status_code == 416 and total is not None and have >= total:
                    break
                if response.status_code >= 400:
                    response.read()
                    try:
                        hf_raise_for_status(response)
                    except Exception as exc:
                        raise hub.hub_error(exc, _repo_of(url)) from exc
                if have and response.status_code == 200:  # the server ignored Range: start over
                    have, h = 0, hashlib.sha256()
                    part.write_bytes(b"")
                if total is None:
                    length = response.headers.get("Content-Length")
                    total = have + int(length) if length and length.isdigit() else None
                if not started:  # first answer accepted: the bar (and "resuming from") can show
                    started = True
                    if resumed_from and have:
                        yield Notice(f"resuming {remote.name} from {human_bytes(have)} already on disk")
                    yield _progress(remote, have, total, resumed_from)
                sink = _Sink(part, h)
                try:
                    reported = have
                    for chunk in response.iter_bytes():  # as received: a cut loses nothing
                        if not chunk:
                            continue
                        sink.put(chunk)
                        have += len(chunk)
                        progressed = True
                        if have - reported >= PROGRESS_EVERY or have == total:
                            reported = have
                            yield _progress(remote, have, total, resumed_from)
                finally:
                    sink.close()  # the bytes received so far reach the disk, even on a cut or Ctrl-C
                if total is None:
                    total = have
        except http.TransportError as exc:
            attempt = 0 if progressed else attempt + 1
            if attempt > retries:
                raise DownloadError(
                    f"download of {remote.name} failed at {human_bytes(have)}"
                    f"{' of ' + human_bytes(total) if total else ''} ({type(exc).__name__})",
                    hint="run the same command again: it resumes from the bytes on disk",
                ) from exc
            reason = type(exc).__name__
            yield Notice(f"connection lost ({reason}); retrying {remote.name} (attempt {attempt})", "warning")
            time.sleep(backoff_s * max(attempt, 1))
    digest = h.hexdigest()
    _check(part, remote, have, digest, delete=True)
    return digest


def _bytes_on_disk(part: Path, total: int | None) -> tuple[int, hashlib._Hash]:
    """The partial download's size and its sha256 so far (junk longer than the file: deleted)."""
    have = part.stat().st_size if part.exists() else 0
    if total is not None and have > total:  # junk from some other transfer: start over
        part.unlink()
        have = 0
    h = hashlib.sha256()
    if have:
        with open(part, "rb") as fh:
            while block := fh.read(CHUNK * 8):
                h.update(block)
    return have, h


class _Sink:
    """Appends chunks to a file and hashes them on a worker thread (hashlib and write release the GIL),
    so hashing overlaps with receiving the next chunk."""

    def __init__(self, path: Path, hasher: hashlib._Hash) -> None:
        self._file = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._hasher = hasher
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="selfhost-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._file.write(chunk)
                    self._hasher.update(chunk)
                except BaseException as exc:  # reported by put()/close() on the main thread
                    self._error = exc

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if self._error is not None:
            raise self._error


def _check(path: Path, remote: hub.RemoteFile, size: int, digest: str, *, delete: bool) -> None:
    problem = None
    if remote.size is not None and size != remote.size:
        problem = f"size {size} != {remote.size} expected"
    elif remote.sha256 and digest != remote.sha256:
        problem = f"sha256 {digest[:12]}... != {remote.sha256[:12]}... expected"
    if problem:
        if delete:
            path.unlink(missing_ok=True)
        raise IntegrityError(
            f"{remote.name} is corrupt ({problem}); the bad copy was deleted",
            hint="run the command again to download it afresh",
        )


def _repo_of(url: str) -> str:
    """'https://host/owner/name/resolve/...' -> 'owner/name' (for error messages)."""
    path = url.split("://", 1)[-1].split("/", 1)[-1]
    return "/".join(path.split("/")[:2])
