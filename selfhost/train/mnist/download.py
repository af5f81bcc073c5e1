"""Download MNIST once into SELFHOST_HOME/data/mnist from a list of public mirrors, tried in turn.

Each file is fetched gzipped, decompressed in memory, checked against the sha256 of the DECOMPRESSED
content (mirrors recompress; the content is what matters) and written atomically. A mirror that fails
or serves wrong bytes is skipped (a warning Notice says why); the error names every mirror's reason
if none works. Progress of the task "download FILE" in bytes; a Notice for each file downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
import urllib.request
from collections.abc import Generator
from pathlib import Path

from selfhost import env, paths
from selfhost.atomic import atomic_path, ensure_free_space
from selfhost.errors import DownloadError, IntegrityError
from selfhost.events import Event, Notice, Progress

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MIRRORS_ENV = env.MNIST_MIRRORS  # comma-separated base URLs, used instead of the defaults

# Decompressed file name -> sha256 of its content.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TOTAL_BYTES = 55_000_000  # the four decompressed files (about 11 MB downloaded)
CHUNK = 1 << 16


def default_dir() -> Path:
    return paths.data_dir() / "mnist"


def mirrors_from_env() -> list[str]:
    return env.mnist_mirrors() or list(MIRRORS)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_verified(path: Path, name: str) -> bool:
    if not path.is_file():
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == SHA256[name]


def fetch(url: str, name: str, timeout: float) -> Generator[Progress, None, bytes]:
    """GET `url` into memory, yielding progress (the files are at most 10 MB gzipped)."""
    request = urllib.request.Request(url, headers={"User-Agent": "selfhost"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        parts, received = [], 0
        while chunk := response.read(CHUNK):
            parts.append(chunk)
            received += len(chunk)
            yield Progress(f"download {name}", received, total, "B", detail=url)
    if total is not None and received != total:
        raise DownloadError(f"{url}: got {received} of {total} bytes")
    return b"".join(parts)


def download_file(
    name: str, dest: Path, mirrors: list[str], timeout: float
) -> Generator[Event, None, None]:
    """Try each mirror for `name`.gz until one serves content with the expected sha256."""
    reasons = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name + ".gz"
        try:
            raw = yield from fetch(url, name, timeout)
            content = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
            if sha256_bytes(content) != SHA256[name]:
                raise IntegrityError("sha256 of the content does not match")
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code} {exc.reason}"
        except (OSError, EOFError, urllib.error.URLError, DownloadError, IntegrityError) as exc:
            reason = getattr(exc, "reason", None) or exc
        else:
            with atomic_path(dest) as tmp:
                tmp.write_bytes(content)
            yield Notice(f"downloaded and verified {dest}")
            return
        reasons.append(f"{url}: {reason}")
        yield Notice(f"{url} failed ({reason}); trying the next mirror", "warning")
    raise DownloadError(
        f"could not download {name} from any mirror: " + "; ".join(reasons),
        hint=f"download the four files yourself and pass --data DIR, or set {MIRRORS_ENV}",
    )


def download_mnist(
    directory: Path | None = None, mirrors: list[str] | None = None, timeout: float = 60.0
) -> Generator[Event, None, Path]:
    """Make sure the four verified files are in `directory` (default: data_dir()/mnist); return it
    (a step of a longer operation: used with `yield from`, it yields no Result of its own)."""
    directory = Path(directory) if directory else default_dir()
    mirrors = list(mirrors) if mirrors is not None else mirrors_from_env()
    missing = [name for name in SHA256 if not is_verified(directory / name, name)]
    if missing:
        directory.mkdir(parents=True, exist_ok=True)
        ensure_free_space(directory, TOTAL_BYTES, "the MNIST data")
    for name in missing:  # files already there and verified are not touched
        yield from download_file(name, directory / name, mirrors, timeout)
    return directory


def ensure_mnist(directory: Path | None = None, mirrors: list[str] | None = None) -> Path:
    """download_mnist without progress reporting."""
    events = download_mnist(directory, mirrors)
    while True:
        try:
            next(events)
        except StopIteration as done:
            return done.value
