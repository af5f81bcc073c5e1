"""The local model store: a JSON manifest of every model selfhost knows about.

Files downloaded from the Hub stay in huggingface-hub's cache (shared with `hf download`);
files selfhost makes (quantized, trained, imported) live in `paths.models_dir()`.
The manifest is rewritten atomically under a lock, so concurrent commands cannot corrupt it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from selfhost import atomic, paths
from selfhost.errors import NotFoundError, SelfhostError
from selfhost.models.names import split_tag

Source = Literal["hub", "local", "quantized", "trained", "embedded", "converted"]


class ModelRecord(BaseModel):
    """One model file registered in the store."""

    name: str  # "smollm2-135m:Q4_K_M", "owner/repo:Q8_0", "my-gpt", "my-gpt:Q8_0"
    path: Path
    size: int
    sha256: str | None  # None: a file selfhost wrote itself, hashed on first need (ensure_sha256)
    source: Source
    repo: str | None = None
    revision: str | None = None  # resolved commit sha for Hub models
    file: str | None = None  # file name inside the repo
    quant: str | None = None
    parent: str | None = None  # model this one was derived from (quantize, train export)
    parts: list[Path] = []  # a split GGUF: every part in order (parts[0] == path); empty for one file
    pulled_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def base(self) -> str:
        return split_tag(self.name)[0]


class _Manifest(BaseModel):
    version: int = 1
    models: list[ModelRecord] = []


class Store:
    def __init__(self, manifest: Path | None = None) -> None:
        self.manifest = manifest or paths.store_file()

    # -- reading -------------------------------------------------------------------------
    def _read(self) -> _Manifest:
        if not self.manifest.exists():
            return _Manifest()
        try:
            return _Manifest.model_validate(json.loads(self.manifest.read_text("utf-8")))
        except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
            raise SelfhostError(
                f"the model store {self.manifest} is corrupt ({type(exc).__name__})",
                hint="move it aside; `selfhost pull` will re-register models",
            ) from exc

    def list(self) -> list[ModelRecord]:
        return sorted(self._read().models, key=lambda r: r.name)

    def get(self, name: str) -> ModelRecord | None:
        return next((r for r in self._read().models if r.name == name), None)

    def find(self, ref: str, prefer_quant: str | None = None) -> ModelRecord:
        """Resolve a user reference: an exact name, or a base name with a single (or preferred) quant."""
        record = self.lookup(ref, prefer_quant)
        if record is None:
            raise NotFoundError(f"no model named '{ref}' in the store", hint="see `selfhost models list`")
        return record

    def lookup(self, ref: str, prefer_quant: str | None = None) -> ModelRecord | None:
        """Like `find`, but None when nothing matches (an ambiguous base name still raises)."""
        records = self._read().models
        exact = [r for r in records if r.name == ref]
        if exact:
            return exact[0]
        same_base = [r for r in records if r.base == ref]
        if len(same_base) == 1:
            return same_base[0]
        if same_base:
            for r in same_base:
                if prefer_quant and prefer_quant in (r.quant, split_tag(r.name)[1]):
                    return r
            choices = ", ".join(sorted(r.name for r in same_base))
            raise NotFoundError(f"'{ref}' is ambiguous: {choices}", hint="name one of them")
        return None

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[_Manifest]:
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.manifest.with_suffix(".lock")
        with open(lock_path, "a+") as lock:
            _flock(lock)
            data = self._read()
            yield data
            atomic.write_text(self.manifest, data.model_dump_json(indent=2))

    def add(self, record: ModelRecord) -> ModelRecord:
        """Register (or replace) a record by name."""
        with self._locked() as data:
            data.models = [r for r in data.models if r.name != record.name] + [record]
        return record

    def ensure_sha256(self, name: str) -> ModelRecord:
        """The record of `name` with its sha256, hashing the file (and saving the digest) if not yet done.

        Files selfhost writes itself (quantize) are registered unhashed: hashing a freshly written
        output would add about a third to quantizing a small model, for a digest rarely read."""
        record = self.get(name)
        if record is None:
            raise NotFoundError(f"no model named '{name}' in the store")
        if record.sha256 is not None:
            return record
        digest = sha256_file(record.path)
        with self._locked() as data:
            for r in data.models:
                if r.name == name and r.path == record.path:
                    r.sha256 = digest
        return record.model_copy(update={"sha256": digest})

    def temp_usage(self) -> tuple[int, int, int]:
        """Temp files in the models folder and beside the manifest, without touching them:
        (count of stale ones, their bytes, bytes of live writers' temp files)."""
        stale = stale_bytes = live = 0
        for folder in {paths.models_dir(), self.manifest.parent}:
            for path in atomic.temp_files(folder):
                with contextlib.suppress(OSError):
                    size = path.stat().st_size
                    if atomic.is_stale(path):
                        stale, stale_bytes = stale + 1, stale_bytes + size
                    else:
                        live += size
        return stale, stale_bytes, live

    def sweep_temp_files(self) -> tuple[list[tuple[Path, int]], int]:
        """Remove the temp files of writers that died (kill -9 during quantize or pull) from the models
        folder and beside the manifest, under the store lock. Returns (removed with their sizes,
        bytes still held by the temp files of live writers)."""
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        folders = {paths.models_dir(), self.manifest.parent}
        with open(self.manifest.with_suffix(".lock"), "a+") as lock:
            _flock(lock)
            removed = [entry for folder in folders for entry in atomic.sweep_stale(folder)]
        live = 0
        for folder in folders:
            for path in atomic.temp_files(folder):
                with contextlib.suppress(OSError):
                    live += path.stat().st_size
        return removed, live

    def remove(self, name: str, delete_file: bool = True) -> ModelRecord:
        """Unregister `name`; delete its file if no other record points at it and selfhost owns it."""
        with self._locked() as data:
            record = next((r for r in data.models if r.name == name), None)
            if record is None:
                raise NotFoundError(f"no model named '{name}' in the store")
            data.models = [r for r in data.models if r.name != name]
            blob = Path(record.path).resolve()
            blob_shared = any(Path(r.path).resolve() == blob for r in data.models)
            link_shared = any(Path(r.path) == Path(record.path) for r in data.models)
        if delete_file and record.source != "embedded" and not link_shared:
            _delete_model_file(record, keep_blob=blob_shared)
            for part in record.parts[1:]:  # the other parts of a split GGUF go with the first
                _delete_model_file(record.model_copy(update={"path": part}), keep_blob=blob_shared)
        return record


def _delete_model_file(record: ModelRecord, keep_blob: bool) -> None:
    """Hub files live in the HF cache as snapshot symlink -> blob: remove both (the blob only
    when no other record still points at it). A symlink is followed only into a folder the
    store owns: a link to a file elsewhere is removed, the file it points at is not."""
    path = Path(record.path)
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink():
            owned = _owned_folder(record, path)
            if owned is None:
                return  # a link the store did not make, outside its folders: leave both alone
            target = path.resolve()
            path.unlink()
            if not keep_blob and _inside(target, owned) and not target.is_dir():
                target.unlink(missing_ok=True)
        elif keep_blob:
            return
        elif record.source != "local" or _inside(path, paths.models_dir()):
            path.unlink()


def _owned_folder(record: ModelRecord, link: Path) -> Path | None:
    """The folder whose files the store may delete through `link`: the repo's folder of the HF
    cache for a Hub snapshot link (<repo folder>/snapshots/<commit>/<file>; else the link's own
    folder), the models folder for a link selfhost keeps there; None for a link anywhere else."""
    if record.source == "hub":
        return next((p.parent for p in link.parents if p.name == "snapshots"), link.parent)
    models = paths.models_dir()
    return models if _inside(link.parent, models) else None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _flock(fh) -> None:  # noqa: ANN001
    if os.name == "posix":
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
