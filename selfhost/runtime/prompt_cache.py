"""A prompt cache beyond the live slots: KV state of token prefixes, in host RAM and optionally on disk.

When the batch engine gives a slot to another conversation, the slot's sequence state (llama.cpp's
per-sequence state save) goes into an LRU bounded by `ram_bytes`; a later prompt that starts with
those tokens gets them back with one restore instead of evaluating them again. With a `directory`,
entries are also written there (one file each, atomic) so they outlive the process: `selfhost chat
--continue` starts where the last session stopped. A file is used only if it was made for the same
model file and KV settings (`identity`) and its checksum holds; a foreign or corrupt file is
ignored with a notice (`take_notices()`: the runtime takes no callbacks, its callers show them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from selfhost.atomic import write_bytes
from selfhost.events import Notice
from selfhost.runtime.tokens import common_prefix

MAGIC = b"SELFHOST-PROMPT-CACHE-1\n"
DISK_FACTOR = 4  # the directory holds at most this many times the RAM budget
MIN_TOKENS = 32  # shorter prefixes are cheaper to evaluate again than to keep


@dataclass
class CacheEntry:
    tokens: tuple[int, ...]
    state: bytes | None  # None: on disk only, not read yet
    path: Path | None = None


def model_identity(path: Path, extra: str = "") -> str:
    """The identity of a model file for cache files: its size and the hash of its first and last MiB,
    plus `extra` (KV types, llama.cpp version: anything that changes the state's layout)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(2**20))
        fh.seek(max(0, size - 2**20))
        digest.update(fh.read(2**20))
    digest.update(extra.encode())
    return digest.hexdigest()[:32]


class PromptCache:
    """LRU of (token prefix -> sequence state), bounded by bytes; optionally mirrored in a directory."""

    def __init__(self, ram_bytes: int, directory: Path | None = None, identity: str = "") -> None:
        self.ram_bytes = ram_bytes
        self.directory = directory
        self.identity = identity
        self.entries: OrderedDict[tuple[int, ...], CacheEntry] = OrderedDict()
        self.used = 0
        self.notices: list[Notice] = []
        self.stats = {"saved": 0, "restored": 0, "restored_tokens": 0}
        if directory is not None:
            self._scan(directory)

    def take_notices(self) -> list[Notice]:
        out, self.notices = self.notices, []
        return out

    # ------------------------------------------------------------------ RAM
    def put(self, tokens: list[int], state: bytes) -> None:
        """Keep a prefix's state (and write it to the directory). A kept prefix of it is dropped."""
        key = tuple(tokens)
        if len(key) < MIN_TOKENS or len(state) > self.ram_bytes:
            return
        for other in [k for k in self.entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(other)
        path = self._write(key, state) if self.directory is not None else None
        self.entries[key] = CacheEntry(key, state, path)
        self.used += len(state)
        self.stats["saved"] += 1
        while self.used > self.ram_bytes:
            victim = next((k for k, e in self.entries.items() if e.state is not None and k != key), None)
            if victim is None:
                break
            self._evict(victim)
        if path is not None:
            self._prune_disk()

    def best(self, prompt: list[int]) -> tuple[int, CacheEntry] | None:
        """The entry sharing the longest prefix with `prompt`: (shared tokens, entry), or None."""
        found: tuple[int, CacheEntry] | None = None
        for key, entry in self.entries.items():
            shared = common_prefix(key, prompt)
            if shared >= MIN_TOKENS and (found is None or shared > found[0]):
                found = (shared, entry)
        return found

    def state_of(self, entry: CacheEntry) -> bytes | None:
        """The entry's state, read from disk if needed (None and a notice when the file is bad)."""
        if entry.state is None and entry.path is not None:
            entry.state = self._read_state(entry.path)
            if entry.state is None:
                self._forget(entry.tokens)
                return None
            self.used += len(entry.state)
        self.entries.move_to_end(entry.tokens)
        return entry.state

    def restored(self, n_tokens: int) -> None:
        self.stats["restored"] += 1
        self.stats["restored_tokens"] += n_tokens

    def reject(self, entry: CacheEntry, why: str) -> None:
        """llama.cpp refused the state: forget the entry (and its file)."""
        where = entry.path.name if entry.path is not None else "an entry"
        self.notices.append(Notice(f"prompt cache: ignored {where}: {why}", "warning"))
        self._forget(entry.tokens)
        if entry.path is not None:
            with contextlib.suppress(OSError):
                entry.path.unlink()

    def _evict(self, key: tuple[int, ...]) -> None:
        """Out of RAM; an entry with a file stays indexed and comes back from disk when used."""
        entry = self.entries[key]
        if entry.path is None:
            self._forget(key)
        elif entry.state is not None:
            self.used -= len(entry.state)
            entry.state = None

    def _forget(self, key: tuple[int, ...]) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None and entry.state is not None:
            self.used -= len(entry.state)

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self.entries.get(key)
        self._forget(key)
        if entry is not None and entry.path is not None:
            with contextlib.suppress(OSError):
                entry.path.unlink()

    # ----------------------------------------------------------------- disk
    def _write(self, key: tuple[int, ...], state: bytes) -> Path | None:
        assert self.directory is not None
        name = hashlib.sha256(struct.pack(f"<{len(key)}i", *key)).hexdigest()[:24] + ".bin"
        header = json.dumps(
            {"identity": self.identity, "tokens": list(key), "sha256": hashlib.sha256(state).hexdigest()}
        ).encode()
        path = self.directory / name
        try:
            write_bytes(path, MAGIC + struct.pack("<Q", len(header)) + header + state)
        except OSError as exc:
            self.notices.append(Notice(f"prompt cache: could not write {path}: {exc}", "warning"))
            return None
        return path

    def _prune_disk(self) -> None:
        """Keep the directory's entries within DISK_FACTOR x the RAM budget: oldest files go first."""
        on_disk = [e for e in self.entries.values() if e.path is not None]
        sizes = {}
        for e in on_disk:
            with contextlib.suppress(OSError):
                sizes[e.tokens] = e.path.stat().st_size  # type: ignore[union-attr]
        total = sum(sizes.values())
        for e in on_disk:  # least recently used first
            if total <= DISK_FACTOR * self.ram_bytes:
                break
            total -= sizes.get(e.tokens, 0)
            self._drop(e.tokens)

    def _scan(self, directory: Path) -> None:
        """Index the directory's files by their tokens (states are read when used)."""
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.bin"), key=lambda p: p.stat().st_mtime):
            header = self._read_header(path)
            if header is None:
                continue
            if header.get("identity") != self.identity:
                self.notices.append(
                    Notice(
                        f"prompt cache: ignored {path.name}: made for another model or KV settings", "warning"
                    )
                )
                continue
            key = tuple(int(t) for t in header["tokens"])
            self.entries[key] = CacheEntry(key, None, path)

    def _read_header(self, path: Path) -> dict | None:
        try:
            with open(path, "rb") as fh:
                if fh.read(len(MAGIC)) != MAGIC:
                    raise ValueError("not a selfhost prompt cache file")
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > 64 * 2**20:
                    raise ValueError("header too large")
                header = json.loads(fh.read(size))
                if not isinstance(header, dict) or not isinstance(header.get("tokens"), list):
                    raise ValueError("header without tokens")
                return header
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
            self.notices.append(Notice(f"prompt cache: ignored {path.name}: {exc}", "warning"))
            return None

    def _read_state(self, path: Path) -> bytes | None:
        header = self._read_header(path)
        if header is None:
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.notices.append(Notice(f"prompt cache: ignored {path.name}: {exc}", "warning"))
            return None
        start = len(MAGIC) + 8 + struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])[0]
        state = data[start:]
        if hashlib.sha256(state).hexdigest() != header.get("sha256"):
            self.notices.append(
                Notice(f"prompt cache: ignored {path.name}: corrupt (checksum mismatch)", "warning")
            )
            return None
        return state
