"""The Hugging Face Hub side of `selfhost pull`: what the user asked for, which file that is, where it lives.

- What the user typed is parsed by `selfhost.models.names.parse_name` (one grammar for every command).
- `fetch_listing` asks the Hub (huggingface-hub's `model_info` with file metadata) for a repo's files,
  sizes and LFS sha256, and maps Hub errors to one-line selfhost errors.
- `pick_gguf` chooses the GGUF for a quant (a split GGUF by its first part; `split_parts` names the rest)
  and lists the choices when that is ambiguous or missing.
- `CacheLayout` is huggingface-hub's cache layout (blobs/ + snapshots/<commit>/ + refs/), so a file
  fetched by `hf download` is found here and vice versa.

Environment variables (HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN) are read at call time,
not at import time, so tests and users can change them per run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from selfhost.errors import AccessDeniedError, DownloadError, NotFoundError, UsageError
from selfhost.models.names import safe_filename

DEFAULT_QUANT = "Q4_K_M"
DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")  # the shape; names.check_repo_id also refuses . and ..
_QUANT_RE = re.compile(
    r"(?<![A-Z0-9])(I?Q[1-8](?:_[A-Z0-9]+)*|TQ[12]_0|MXFP4(?:_MOE)?|NVFP4|BF16|F16|F32|FP16)(?![A-Z0-9])"
)
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class HubUnreachable(DownloadError):
    """The Hub could not be reached at all (no network, DNS, refused connection, offline mode)."""


# -- environment ---------------------------------------------------------------------------------
def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface-hub's own rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def offline_env() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def token() -> str | None:
    """HF_TOKEN if set; None lets huggingface-hub fall back to a token saved by `hf auth login`."""
    return os.environ.get("HF_TOKEN") or None


def quant_of(filename: str) -> str | None:
    """'Llama-3.2-1B-Instruct-Q4_K_M.gguf' -> 'Q4_K_M'; 'qwen2.5-0.5b-instruct-q8_0.gguf' -> 'Q8_0'."""
    stem = _SPLIT_RE.sub(".gguf", PurePosixPath(filename).name)
    found = _QUANT_RE.findall(stem.upper().removesuffix(".GGUF"))
    return found[-1] if found else None


def is_split(filename: str) -> bool:
    return _SPLIT_RE.search(filename) is not None


def split_info(filename: str) -> tuple[int, int] | None:
    """'m-Q4_K_M-00002-of-00003.gguf' -> (2, 3); None for a single-file GGUF."""
    found = _SPLIT_RE.search(filename)
    return (int(found.group(1)), int(found.group(2))) if found else None


def split_part_names(first: str) -> list[str]:
    """Every part's name from the first part's: llama.cpp's own `<prefix>-%05d-of-%05d.gguf` rule."""
    found = _SPLIT_RE.search(first)
    if found is None:
        return [first]
    count = int(found.group(2))
    prefix = first[: found.start()]
    return [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def split_parts(files: dict[str, RemoteFile] | list[str], first: str, repo: str) -> list[str]:
    """The parts of the split GGUF whose first part is `first`, all present in `files`, in order.

    Raises NotFoundError naming the missing parts: a split model is never pulled incomplete."""
    names = split_part_names(first)
    missing = [n for n in names if n not in files]
    if missing:
        raise NotFoundError(
            f"{repo}: the split GGUF {first} has {len(names)} parts, missing {', '.join(missing)}",
            hint="the upload is incomplete; pick another quant",
        )
    return names


# -- the Hub's answer ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS oid: the file's sha256 (None for small non-LFS files)
    blob_id: str | None  # git blob id, huggingface-hub's etag for non-LFS files

    @property
    def etag(self) -> str | None:
        """The name of the blob in huggingface-hub's cache."""
        return self.sha256 or self.blob_id


@dataclass
class RepoListing:
    repo: str
    revision: str
    commit: str
    files: dict[str, RemoteFile] = field(default_factory=dict)
    gated: bool = False

    def ggufs(self) -> list[str]:
        return sorted(
            name
            for name in self.files
            if name.lower().endswith(".gguf") and not PurePosixPath(name).name.lower().startswith("mmproj")
        )


def fetch_listing(repo: str, revision: str = "main") -> RepoListing:
    """The repo's files with sizes and LFS sha256 at `revision` (one `model_info` call)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=token())
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:
        raise hub_error(exc, repo, revision) from exc
    files: dict[str, RemoteFile] = {}
    for sib in info.siblings or []:
        lfs = sib.lfs
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        size = sib.size if sib.size is not None else (lfs.get("size") if isinstance(lfs, dict) else None)
        files[sib.rfilename] = RemoteFile(sib.rfilename, size, sha, sib.blob_id)
    if not info.sha:
        raise DownloadError(f"the Hub did not report a commit for {repo}@{revision}")
    return RepoListing(repo=repo, revision=revision, commit=info.sha, files=files, gated=bool(info.gated))


def http_module():  # noqa: ANN201
    """The HTTP client huggingface-hub runs on: `httpx2` (2.x) or `httpx` (1.x)."""
    try:
        import httpx2

        return httpx2
    except ImportError:  # pragma: no cover - huggingface-hub 1.x
        import httpx

        return httpx


def hub_error(exc: BaseException, repo: str, revision: str = "main") -> Exception:
    """Map huggingface-hub / transport exceptions to one-line selfhost errors."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{endpoint()}/{repo}"
    if isinstance(exc, GatedRepoError):
        return AccessDeniedError(
            f"{repo} is a gated model and the Hub refused access",
            hint=f"accept its license at {page} and set HF_TOKEN to a token of that account",
        )
    if isinstance(exc, RevisionNotFoundError):
        return NotFoundError(f"revision '{revision}' not found in {repo}", hint="check --revision")
    if isinstance(exc, RemoteEntryNotFoundError):
        return NotFoundError(f"file not found in {repo}@{revision}", hint=f"see the files at {page}")
    if isinstance(exc, RepositoryNotFoundError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return AccessDeniedError(
                f"the Hub refused access to {repo} (HTTP {status}): it is private or gated",
                hint=f"accept its license at {page} and set HF_TOKEN",
            )
        return NotFoundError(f"no repo '{repo}' on the Hub", hint="check the owner/name spelling")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return AccessDeniedError(
                f"the Hub refused access to {repo} (HTTP {status})",
                hint=f"accept the license at {page} and set HF_TOKEN",
            )
        return DownloadError(f"the Hub answered HTTP {status} for {repo}", hint="try again later")
    if isinstance(exc, (OfflineModeIsEnabled, http_module().TransportError, ConnectionError, TimeoutError)):
        return HubUnreachable(
            f"cannot reach the Hub at {endpoint()} ({type(exc).__name__})",
            hint="check the network, or use --offline for cached models",
        )
    return DownloadError(f"Hub request for {repo} failed: {type(exc).__name__}: {exc}")


def pick_gguf(listing: RepoListing, quant: str | None) -> tuple[str, str]:
    """The GGUF file for `quant` (default Q4_K_M) -> (file name, quant). Lists choices on failure."""
    ggufs = listing.ggufs()
    if not ggufs:
        raise NotFoundError(
            f"{listing.repo} has no .gguf files", hint="pick a GGUF repo (names often end in -GGUF)"
        )
    by_quant: dict[str, list[str]] = {}
    for name in ggufs:
        by_quant.setdefault(quant_of(name) or "?", []).append(name)
    choices = ", ".join(sorted(q for q in by_quant if q != "?")) or ", ".join(ggufs)
    wanted = (quant or DEFAULT_QUANT).upper()
    matches = by_quant.get(wanted)
    if matches is None and quant is None and len(ggufs) == 1:
        matches, wanted = ggufs, quant_of(ggufs[0]) or "unknown"
    if not matches:
        raise NotFoundError(
            f"{listing.repo} has no {wanted} GGUF", hint=f"available: {choices}; pull {listing.repo}:QUANT"
        )
    # a split GGUF counts once, by its first part (the others are fetched with it)
    singles = [m for m in matches if (split_info(m) or (1, 1))[0] == 1]
    if not singles:
        raise NotFoundError(
            f"the {wanted} GGUF of {listing.repo} is split but has no first part ({matches[0]}, ...)",
            hint=f"pick another quant: {choices}",
        )
    if len(singles) > 1:
        raise UsageError(
            f"several {wanted} files in {listing.repo}: {', '.join(singles)}",
            hint=f"name one: {listing.repo}:<file>.gguf",
        )
    return safe_filename(singles[0]), wanted


# -- huggingface-hub's cache layout --------------------------------------------------------------
@dataclass(frozen=True)
class CacheLayout:
    """<cache>/models--owner--name/{blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/<revision>}."""

    root: Path
    repo: str

    @classmethod
    def for_repo(cls, repo: str, root: Path | None = None) -> CacheLayout:
        return cls(root or cache_dir(), repo)

    @property
    def folder(self) -> Path:
        return self.root / ("models--" + self.repo.replace("/", "--"))

    def blob(self, etag: str) -> Path:
        return self.folder / "blobs" / etag

    def incomplete(self, etag: str) -> Path:
        return self.folder / "blobs" / f"{etag}.incomplete"

    def pointer(self, commit: str, filename: str) -> Path:
        return self.folder / "snapshots" / commit / Path(*safe_filename(filename).split("/"))

    def lock(self, etag: str) -> Path:
        return self.root / ".locks" / self.folder.name / f"{etag}.lock"

    def ref(self, revision: str) -> Path:
        return self.folder / "refs" / revision

    def commit_for(self, revision: str) -> str | None:
        """The commit a revision resolved to when it was last fetched (a commit sha resolves to itself)."""
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            return revision
        ref = self.ref(revision)
        try:
            return ref.read_text().strip() or None
        except OSError:
            return None

    def write_ref(self, revision: str, commit: str) -> None:
        if revision == commit:
            return
        ref = self.ref(revision)
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.exists() or ref.read_text().strip() != commit:
            ref.write_text(commit)

    def cached_files(self, commit: str) -> list[str]:
        snap = self.folder / "snapshots" / commit
        if not snap.is_dir():
            return []
        return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())

    def link(self, blob: Path, pointer: Path) -> None:
        """Point the snapshot entry at the blob: a relative symlink, or a copy where symlinks fail."""
        pointer.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(blob, pointer.parent)
        tmp = pointer.with_name(f".{pointer.name}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(rel, tmp)
        except OSError:
            import shutil

            shutil.copyfile(blob, tmp)
        os.replace(tmp, pointer)


def blob_sha_hint(path: Path) -> str | None:
    """For a cached snapshot entry, the sha256 its blob name promises (LFS blobs are named by sha256)."""
    try:
        name = path.resolve().name
    except OSError:
        return None
    return name if _SHA256_RE.match(name) else None
