"""`selfhost pull FILE.gguf`: importing a local GGUF into the store (the Hub side is selfhost.models.pull).

Same events and results as a Hub pull: a Notice of what FILE is, Progress in bytes per part copied, and
one Result (PullResult, or PullPlan with dry_run). The file is validated before anything is copied, a
split GGUF is imported from its first part with all its parts, and nothing partial is registered.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from selfhost import atomic, paths
from selfhost.errors import NotFoundError, UsageError
from selfhost.events import Event, Progress, Result
from selfhost.models import download, hub
from selfhost.models.pull import PlannedFile, PullPlan, PullResult, resolved_notice
from selfhost.models.store import ModelRecord, Store, sha256_file
from selfhost.runtime import gguf_info


def import_local(src: Path, *, dry_run: bool, store: Store) -> Iterator[Event]:
    """Copy a local GGUF (every part of a split one) into the models folder, hashing as it copies, and
    register it as <base>:<QUANT>; ends with Result(PullResult), or Result(PullPlan) with dry_run."""
    if not src.is_file():
        raise NotFoundError(f"no such file: {src}")
    sources = _local_parts(src)
    info = gguf_info.inspect(src)
    for part in sources[1:]:
        gguf_info.check_header(part)
    quant = info.quant
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", src.stem)
    base = re.sub(r"[^\w.-]+", "-", stem)
    base = re.sub(rf"[-_.]{re.escape(quant)}$", "", base, flags=re.IGNORECASE) or base
    name = f"{base}:{quant}"
    first = f"{base}-{quant}-00001-of-{len(sources):05d}.gguf" if len(sources) > 1 else f"{base}-{quant}.gguf"
    dests = [paths.models_dir() / n for n in hub.split_part_names(first)]
    sizes = [p.stat().st_size for p in sources]
    yield resolved_notice(name, src.name, sum(sizes), len(sources), None, None)
    if dry_run:
        planned = [
            PlannedFile(p.name, n, cached=d.exists()) for p, n, d in zip(sources, sizes, dests, strict=True)
        ]
        yield Result(PullPlan(name, None, None, planned))
        return
    same = [d.exists() and d.resolve() == p.resolve() for p, d in zip(sources, dests, strict=True)]
    need = sum(size for size, in_place in zip(sizes, same, strict=True) if not in_place)
    atomic.ensure_free_space(dests[0].parent, need, f"importing {src.name}")
    digests = []
    for part, dest, size, in_place in zip(sources, dests, sizes, same, strict=True):
        digests.append(sha256_file(dest) if in_place else (yield from _copy_hashing(part, dest, size)))
    record = ModelRecord(
        name=name, path=dests[0], size=sum(sizes), sha256=digests[0], source="local", file=src.name,
        quant=quant, parts=dests if len(dests) > 1 else [],
    )  # fmt: skip
    store.add(record)
    yield Result(PullResult(record, downloaded=False))


def _local_parts(src: Path) -> list[Path]:
    """[src], or every part of the split GGUF whose first part is `src` (all must be beside it)."""
    split = hub.split_info(src.name)
    if split is None:
        return [src]
    if split[0] != 1:
        first = hub.split_part_names(src.name)[0]
        raise UsageError(
            f"{src.name} is part {split[0]} of a split GGUF", hint=f"import its first part: {first}"
        )
    parts = [src.with_name(n) for n in hub.split_part_names(src.name)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise NotFoundError(
            f"{src.name} is the first of {len(parts)} parts; missing beside it: {', '.join(missing)}"
        )
    return parts


def _copy_hashing(src: Path, dest: Path, size: int) -> Iterator[Progress]:
    h = hashlib.sha256()
    done = 0
    with atomic.atomic_path(dest) as tmp:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(download.CHUNK * 8):
                fout.write(block)
                h.update(block)
                done += len(block)
                yield Progress(src.name, done, size, unit="B")
        shutil.copymode(src, tmp)
    return h.hexdigest()
