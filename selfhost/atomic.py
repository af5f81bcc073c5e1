"""Atomic file writes (temp file + rename) and free-space checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from selfhost.errors import DiskSpaceError


@contextlib.contextmanager
def atomic_path(dest: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `dest`; rename it onto `dest` only if the block succeeds.

    On any exception (Ctrl-C included) the temp file is removed and `dest` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text(dest: Path, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def ensure_free_space(directory: Path, needed: int, what: str = "this operation") -> None:
    """Raise DiskSpaceError unless `directory`'s filesystem has `needed` bytes (+1% margin) free."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = needed // 100 + 16 * 1024 * 1024
    if free < needed + margin:
        raise DiskSpaceError(
            f"not enough disk space for {what}: need {human_bytes(needed)}, "
            f"{human_bytes(free)} free in {directory}",
            hint="free some space or choose another location",
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
