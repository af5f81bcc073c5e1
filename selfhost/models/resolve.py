"""Turn what a user typed (alias, alias:quant, store name, owner/repo in the HF cache, path) into a GGUF file
on disk, and refuse early what the caller cannot use.

`resolve_model(ref, purpose=...)` is the one call chat, serve and quantize make before loading:
- purpose "chat" (the default) refuses a `kind = "embedding"` model with one clear line;
- "embedding" (serve's /v1/embeddings) and "load" (quantize, perplexity) accept every kind;
- every purpose but "inspect" refuses a model whose registry entry needs a newer llama-cpp-python
  (`min_llama_cpp`) and a split GGUF with a missing part, before llama.cpp touches a file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from selfhost.errors import DependencyError, NotFoundError, UsageError
from selfhost.models.embedded import DEFAULT_MODEL, embedded_path, embedded_quant
from selfhost.models.registry import Kind
from selfhost.models.store import ModelRecord, Store, split_name

Purpose = Literal["chat", "embedding", "load", "inspect"]
# llama.cpp architectures that only embed (no text generation)
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
     "t5encoder", "eurobert"}
)  # fmt: skip


class ResolvedModel(BaseModel):
    name: str
    path: Path  # the file llama.cpp opens (the first part of a split GGUF)
    record: ModelRecord | None = None
    alias: str | None = None  # the registry entry behind it, if any
    kind: Kind | None = None  # from the registry entry; `model_kind()` also reads the GGUF
    min_llama_cpp: str | None = None
    parts: list[Path] = []  # a split GGUF: every part in order; empty for one file


def resolve_model(ref: str | None, store: Store | None = None, *, purpose: Purpose = "chat") -> ResolvedModel:
    """Find a local GGUF for `ref` (default: the embedded default model) usable for `purpose`.

    Never downloads. Raises NotFoundError, UsageError (wrong kind) or DependencyError (llama.cpp too old)."""
    ref = ref or DEFAULT_MODEL
    try:
        resolved = _locate(ref, store or Store())
    except NotFoundError:
        if purpose == "chat":  # "cannot chat" says more than "not downloaded" for an embedding alias
            _refuse_embedding_alias(ref)
        raise
    check_usable(resolved, purpose)
    return resolved


def _refuse_embedding_alias(ref: str) -> None:
    from selfhost.models.registry import load_registry

    entry = load_registry().get(split_name(ref)[0])
    if entry is not None and entry.kind == "embedding":
        _refuse_embedding(ref)


def _refuse_embedding(name: str) -> None:
    raise UsageError(
        f"{name} is an embedding model: it turns text into vectors and cannot chat",
        hint="use it through `selfhost serve` (/v1/embeddings), or chat with a chat model",
    )


def check_usable(resolved: ResolvedModel, purpose: Purpose = "chat") -> None:
    """Refuse, with one clear line, a model that `purpose` cannot use (see the module docstring)."""
    if purpose == "inspect":
        return
    missing = [p for p in resolved.parts if not p.exists()]
    if missing:
        raise NotFoundError(
            f"{resolved.name} is a split GGUF with {len(missing)} of {len(resolved.parts)} parts missing "
            f"({missing[0].name})",
            hint=f"pull it again: `selfhost pull {resolved.name}`",
        )
    if resolved.parts:
        from selfhost import gguf_info

        for part in resolved.parts[1:]:  # the caller validates the first; llama.cpp reads them all
            gguf_info.inspect(part)
    if resolved.min_llama_cpp:
        have = llama_cpp_version()
        if have is not None and _version_tuple(have) < _version_tuple(resolved.min_llama_cpp):
            raise DependencyError(
                f"{resolved.name} needs llama-cpp-python >= {resolved.min_llama_cpp} (installed: {have})",
                hint=f"pip install -U 'llama-cpp-python>={resolved.min_llama_cpp}'",
            )
    if purpose == "chat" and model_kind(resolved) == "embedding":
        _refuse_embedding(resolved.name)


def model_kind(resolved: ResolvedModel) -> Kind | None:
    """chat | embedding | base from the registry entry; else "embedding" for an encoder-only GGUF
    architecture (bert, nomic-bert, ...); None when unknown (a decoder without a registry entry)."""
    return resolved.kind or _guess_kind(resolved.path)


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python version, read from its metadata (no import of the library)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def _version_tuple(text: str) -> tuple[int, ...]:
    """'0.3.16' -> (0, 3, 16); '0.3.17rc1' -> (0, 3, 17)."""
    numbers = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.end() < len(piece):
            break
    return tuple(numbers)


def _guess_kind(path: Path) -> Kind | None:
    from selfhost import gguf_info

    # the architecture alone: an embedding model is refused for what it is, before the full checks
    return "embedding" if gguf_info.architecture(path) in EMBEDDING_ARCHITECTURES else None


def _with_entry(resolved: ResolvedModel, alias: str | None, repo: str | None = None) -> ResolvedModel:
    """Attach the registry entry of `alias` (kind, min_llama_cpp), when it describes this repo."""
    from selfhost.models.registry import load_registry

    registry = load_registry()
    entry = registry.get(alias) if alias else None
    if entry is None or (repo is not None and entry.repo != repo):
        # pulled as owner/repo[:QUANT]: the entry for that repo still knows its kind
        alias, entry = next(
            ((a, e) for a, e in registry.models.items() if repo and e.repo == repo), (None, None)
        )
    if entry is None:
        return resolved
    return resolved.model_copy(
        update={"alias": alias, "kind": entry.kind, "min_llama_cpp": entry.min_llama_cpp}
    )


def _locate(ref: str, store: Store) -> ResolvedModel:
    as_path = Path(ref).expanduser()
    if ref.endswith(".gguf") or as_path.is_file() or "/" in ref and as_path.exists():
        if not as_path.is_file():
            raise NotFoundError(f"no such model file: {ref}")
        return ResolvedModel(name=as_path.stem, path=as_path, parts=_sibling_parts(as_path))

    from selfhost.models.registry import load_registry

    base, quant = split_name(ref)
    entry = load_registry().get(base)
    prefer = quant or (entry.default_quant if entry else None)
    try:
        record = store.find(ref, prefer_quant=prefer)
        found = ResolvedModel(name=record.name, path=record.path, record=record, parts=list(record.parts))
        return _with_entry(found, record.base, record.repo)
    except NotFoundError:
        pass

    local = _embedded_file(base, quant)
    if local is not None:
        return _with_entry(ResolvedModel(name=f"{base}:{embedded_quant(base)}", path=local), base)

    if "/" in base:
        from selfhost.models import hfcache

        cached = hfcache.find(base, quant)
        if cached is not None:  # used in place: no copy, no registration
            return ResolvedModel(name=cached.name, path=cached.path, parts=list(cached.parts))

    if entry is not None:
        hint = f"run `selfhost pull {ref}` first"
        if base == DEFAULT_MODEL:
            hint += " or `pip install 'selfhost[demo]'` for the offline copy"
        raise NotFoundError(f"model '{ref}' is not downloaded", hint=hint)
    raise NotFoundError(
        f"unknown model '{ref}'",
        hint="use an alias from `selfhost models list --available`, a pulled name, or a .gguf path",
    )


def _sibling_parts(first: Path) -> list[Path]:
    """For the first part of a split GGUF given as a path, the paths llama.cpp will open for the rest."""
    from selfhost.models import hub

    split = hub.split_info(first.name)
    if split is None:
        return []
    if split[0] != 1:
        raise UsageError(
            f"{first.name} is part {split[0]} of a split GGUF",
            hint=f"name its first part: {hub.split_part_names(first.name)[0]}",
        )
    return [first.with_name(n) for n in hub.split_part_names(first.name)]


def _embedded_file(base: str, quant: str | None) -> Path | None:
    """The packaged GGUF for `base`, only while the effective registry entry (user overrides
    included) still names that same repo, file and quant: `pull` and `chat` must agree."""
    from selfhost.models.registry import load_registry, parse_registry_file, shipped_registry_path

    local, packaged_quant = embedded_path(base), embedded_quant(base)
    if local is None or packaged_quant is None:
        return None
    entry = load_registry().get(base)
    shipped = parse_registry_file(shipped_registry_path()).get(base)
    if entry is None or shipped is None or entry.repo != shipped.repo:
        return None
    wanted = quant or entry.default_quant
    if wanted != packaged_quant or entry.files.get(packaged_quant) != local.name:
        return None
    return local
