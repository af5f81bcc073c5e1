"""MNIST data: the IDX reader on the real files and on corrupt ones; downloads from local mirrors."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from selfhost.errors import DownloadError, IntegrityError, NotFoundError
from selfhost.events import Notice, Progress
from selfhost.train.mnist import download as dl
from selfhost.train.mnist.idx import load_mnist, parse_idx, read_idx

# ---- IDX reader ---------------------------------------------------------------------------------


def test_real_files(mnist_dir: Path) -> None:
    data = load_mnist(mnist_dir)
    assert data.train_images.shape == (60000, 28, 28) and data.train_images.dtype == np.uint8
    assert data.train_labels.shape == (60000,)
    assert data.test_images.shape == (10000, 28, 28)
    assert data.test_labels.shape == (10000,)
    assert data.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert data.test_labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(data.test_labels).tolist()[:2] == [980, 1135]  # the known class counts
    assert data.train_images.max() == 255 and data.train_images.min() == 0


def test_raw_and_gz_read_the_same(mnist_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert np.array_equal(read_idx(raw), read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"))


def idx_bytes(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x00\x00", "only 2 bytes"),
        (b"\x08\x03\x08\x03" + bytes(16), "bad magic 08030803"),
        (idx_bytes(0x07, (2,), b"ab"), "unknown data type 0x07"),
        (struct.pack(">HBB", 0, 8, 0), "0 dimensions"),
        (struct.pack(">HBB", 0, 8, 3) + b"\x00\x00\x00\x05", "header needs 16 bytes"),
        (idx_bytes(0x08, (3, 28, 28), bytes(28 * 28 * 2)), "header says 3x28x28"),
        (idx_bytes(0x08, (2,), b"abc"), "the file has 11 bytes"),
    ],
)
def test_corrupt_headers_are_clear_errors(blob: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        parse_idx(blob, name="x")


def test_other_dtypes_decode_big_endian() -> None:
    array = parse_idx(idx_bytes(0x0C, (2, 2), struct.pack(">4i", 1, -2, 3, 70000)))
    assert array.tolist() == [[1, -2], [3, 70000]]
    assert array.dtype == np.int32


def test_corrupt_gzip_and_mismatched_files(mnist_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in mnist_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(
        (mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()[:5000]
    )
    with pytest.raises(IntegrityError, match="corrupt gzip"):
        load_mnist(bad)
    # Labels that do not match the images in number: the cross-check catches it.
    labels = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    (bad / "t10k-labels-idx1-ubyte.gz").unlink()
    (bad / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(0x08, (9999,), labels[8:-1]))
    with pytest.raises(IntegrityError, match=r"test labels have shape \(9999,\)"):
        load_mnist(bad)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nope")
    with pytest.raises(NotFoundError, match="has no train-images-idx3-ubyte"):
        load_mnist(tmp_path)


# ---- downloads from mirrors on 127.0.0.1 --------------------------------------------------------


def corrupted(name: str, body: bytes) -> bytes:
    """Images: valid gzip of the content with one byte flipped; labels: a truncated gzip."""
    if "labels" in name:
        return body[: len(body) // 2]
    content = bytearray(gzip.decompress(body))
    content[-1] ^= 0xFF
    return gzip.compress(bytes(content), compresslevel=1)


class Mirror:
    """A real HTTP server on 127.0.0.1 serving `files` (.gz by name), or failing with 503."""

    def __init__(self, kind: str, files: dict[str, bytes]) -> None:
        self.kind, self.requests = kind, []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                mirror.requests.append(self.path)
                name = self.path.rsplit("/", 1)[-1]
                if mirror.kind == "failing" or name not in files:
                    self.send_error(503 if mirror.kind == "failing" else 404)
                    return
                body = files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def served_files(mnist_dir: Path) -> dict[str, dict[str, bytes]]:
    good = {f.name: f.read_bytes() for f in mnist_dir.glob("*.gz")}
    return {"good": good, "corrupt": {name: corrupted(name, body) for name, body in good.items()}}


@pytest.fixture
def mirrors(served_files: dict[str, dict[str, bytes]]) -> Iterator[dict[str, Mirror]]:
    servers = {kind: Mirror(kind, served_files.get(kind, {})) for kind in ("failing", "corrupt", "good")}
    yield servers
    for server in servers.values():
        server.close()


def downloaded(events: list[object]) -> list[str]:
    """The files the Notices say were downloaded and verified, in order."""
    prefix = "downloaded and verified "
    return [Path(e.message.removeprefix(prefix)).name for e in events
            if isinstance(e, Notice) and e.message.startswith(prefix)]  # fmt: skip


def drain(events: Iterator[object]) -> tuple[list[object], object]:
    seen = []
    while True:
        try:
            seen.append(next(events))
        except StopIteration as done:
            return seen, done.value


def test_download_skips_failing_and_corrupt_mirrors(
    mirrors: dict[str, Mirror], mnist_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "mnist"
    order = [mirrors["failing"].url, mirrors["corrupt"].url, mirrors["good"].url]
    events, result = drain(dl.download_mnist(dest, order))
    assert result == dest
    failed = [e.message for e in events if isinstance(e, Notice) and e.level == "warning"]
    assert len(failed) == 8  # each file: the failing mirror, then the corrupt one
    assert all("next mirror" in m for m in failed)
    assert all("503" in m for m in failed if m.startswith(mirrors["failing"].url))
    corrupt = [m for m in failed if m.startswith(mirrors["corrupt"].url)]
    assert sum("sha256" in m for m in corrupt) == 2 and len(corrupt) == 4  # 2 wrong content, 2 bad gzip
    assert downloaded(events) == list(dl.SHA256)
    progress = [e for e in events if isinstance(e, Progress)]
    assert all(e.unit == "B" and e.task.startswith("download ") for e in progress)
    assert {e.task for e in progress if e.finished} == {f"download {name}" for name in dl.SHA256}
    for name, digest in dl.SHA256.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in dest.iterdir()) == sorted(dl.SHA256)  # no temp files left
    assert load_mnist(dest).test_labels[:5].tolist() == [7, 2, 1, 0, 4]

    # Once there and verified, nothing is downloaded again.
    before = len(mirrors["good"].requests)
    events, _ = drain(dl.download_mnist(dest, order))
    assert len(mirrors["good"].requests) == before
    assert events == []  # nothing fetched, nothing to say


def test_download_replaces_a_corrupt_local_copy(mirrors: dict[str, Mirror], tmp_path: Path) -> None:
    dest = tmp_path / "mnist"
    dl.ensure_mnist(dest, [mirrors["good"].url])
    (dest / "t10k-labels-idx1-ubyte").write_bytes(b"garbage")
    events, _ = drain(dl.download_mnist(dest, [mirrors["good"].url]))
    assert downloaded(events) == ["t10k-labels-idx1-ubyte"]
    assert dl.is_verified(dest / "t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")


def test_download_fails_cleanly_when_no_mirror_works(mirrors: dict[str, Mirror], tmp_path: Path) -> None:
    dest = tmp_path / "mnist"
    with pytest.raises(DownloadError) as info:
        dl.ensure_mnist(dest, [mirrors["failing"].url, mirrors["corrupt"].url])
    message = str(info.value)
    assert mirrors["failing"].url in message and mirrors["corrupt"].url in message
    assert "--data DIR" in message
    assert list(dest.iterdir()) == []  # nothing half-written is left behind


def test_mirrors_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dl.MIRRORS_ENV, "http://a/, http://b/")
    assert dl.mirrors_from_env() == ["http://a/", "http://b/"]
    monkeypatch.delenv(dl.MIRRORS_ENV)
    assert dl.mirrors_from_env() == list(dl.MIRRORS)
