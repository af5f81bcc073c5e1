"""Atomic file writes (temp file + rename) and free-space checks."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from selfhost.errors import DiskSpaceError
from selfhost.units import human_bytes


@contextlib.contextmanager
def atomic_path(dest: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `dest`; rename it onto `dest` only if the block succeeds.

    On any exception (Ctrl-C included) the temp file is removed and `dest` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The writer's PID is in the name: `sweep_stale` can tell an orphan (kill -9) from a live write.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


TEMP_SUFFIXES = (".tmp", ".partial")
STALE_AFTER_S = 24 * 3600  # a temp file without a readable PID is an orphan after a day untouched
_TEMP_RE = re.compile(r"^\.(?P<dest>.+?)\.(?:(?P<pid>\d+)\.)?[^.]+(?:\.tmp|\.partial)$")


def temp_files(directory: Path) -> list[Path]:
    """The temp files `atomic_path` leaves in `directory` while writing (or after being killed)."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return []
    return [p for p in entries if _TEMP_RE.match(p.name) and p.is_file() and not p.is_symlink()]


def is_stale(path: Path, now: float | None = None) -> bool:
    """A temp file whose writer is gone: its PID is not running, or (no PID in the name, or the PID
    reused by another process) nobody has written to it for STALE_AFTER_S."""
    match = _TEMP_RE.match(path.name)
    if match is None:
        return False
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    pid = match.group("pid")
    if pid is not None and not _alive(int(pid)):
        return True
    return age > STALE_AFTER_S


def sweep_stale(directory: Path) -> list[tuple[Path, int]]:
    """Remove the stale temp files in `directory`; returns (path, bytes freed) for each.
    Callers hold the lock of whatever writes there (the store lock for the models folder)."""
    removed = []
    for path in temp_files(directory):
        if is_stale(path):
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                path.unlink()
                removed.append((path, size))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or we cannot tell: keep the file)
    return True


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
