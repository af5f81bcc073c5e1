"""GGUF files already in the Hugging Face cache (from `hf download`, `hf_hub_download` or other tools).

`scan()` lists them (a split GGUF once, by its first part, only when every part is there) so
`selfhost models list` can show them and `selfhost chat owner/repo[:QUANT]` can load them in place,
without a second copy. Nothing here writes to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from selfhost.errors import NotFoundError
from selfhost.models import hub


@dataclass(frozen=True)
class CachedGGUF:
    repo: str
    commit: str
    file: str  # path inside the repo (first part of a split GGUF)
    path: Path  # the snapshot entry (a symlink to the blob)
    size: int  # all parts together
    quant: str | None
    parts: list[Path] = field(default_factory=list)  # every part, in order; empty for one file

    @property
    def name(self) -> str:
        """The name `selfhost chat` accepts for it."""
        return f"{self.repo}:{self.quant}" if self.quant else f"{self.repo}:{self.file}"


def _repo_of(folder: Path) -> str | None:
    """'models--owner--name' -> 'owner/name' (huggingface-hub joins owner and name with '--')."""
    if not folder.name.startswith("models--"):
        return None
    owner, sep, name = folder.name.removeprefix("models--").partition("--")
    return f"{owner}/{name}" if sep and owner and name else None


def _preferred_commits(folder: Path) -> list[Path]:
    """Snapshot folders, the one `refs/main` points at first, then the newest."""
    snaps = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
    try:
        main = (folder / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    return sorted(snaps, key=lambda p: (p.name != main, -p.stat().st_mtime))


def scan(root: Path | None = None) -> list[CachedGGUF]:
    """Every complete GGUF model in the cache, one entry per (repo, file), sorted by name."""
    root = root or hub.cache_dir()
    found: dict[tuple[str, str], CachedGGUF] = {}
    if not root.is_dir():
        return []
    for folder in sorted(root.glob("models--*")):
        repo = _repo_of(folder)
        if repo is None:
            continue
        for snap in _preferred_commits(folder):
            try:
                present = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*.gguf") if p.is_file())
            except OSError:  # unreadable or vanishing while we look: not usable anyway
                continue
            for file in present:
                split = hub.split_info(file)
                if PurePosixPath(file).name.lower().startswith("mmproj") or (split and split[0] != 1):
                    continue
                if (repo, file) in found:
                    continue
                names = hub.split_part_names(file)
                if any(n not in present for n in names):
                    continue  # an incomplete split is not usable
                paths = [snap / n for n in names]
                found[(repo, file)] = CachedGGUF(
                    repo=repo, commit=snap.name, file=file, path=paths[0],
                    size=sum(p.stat().st_size for p in paths), quant=hub.quant_of(file),
                    parts=paths if split else [],
                )  # fmt: skip
    return sorted(found.values(), key=lambda c: (c.name, c.file))


def find(repo: str, tag: str | None, root: Path | None = None) -> CachedGGUF | None:
    """The cached GGUF for `owner/repo[:QUANT|:file.gguf]`; None when the cache has none.

    Raises NotFoundError when the choice is ambiguous (several files, no quant given)."""
    mine = [c for c in scan(root) if c.repo == repo]
    if tag:
        mine = [
            c for c in mine if tag in (c.file, PurePosixPath(c.file).name) or (c.quant or "") == tag.upper()
        ]
    if len(mine) > 1:
        raise NotFoundError(
            f"several GGUF files of {repo} in the Hugging Face cache: {', '.join(c.name for c in mine)}",
            hint="name one of them",
        )
    return mine[0] if mine else None
