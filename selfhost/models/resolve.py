"""Turn what a user typed (a name in the grammar of selfhost.models.names: alias[:QUANT], a store name,
owner/repo[:QUANT|:file.gguf] in the store or the HF cache, a path) into a GGUF file on disk, and
refuse early what the caller cannot use.

`resolve_model(ref, purpose=...)` is the one call chat, serve and quantize make before loading:
- purpose "chat" (the default) refuses a `kind = "embedding"` or `"rerank"` model with one clear line;
- "embedding" (serve's /v1/embeddings), "rerank" (serve's /v1/rerank) and "load" (quantize,
  perplexity) accept every kind;
- every purpose but "inspect" refuses a model whose registry entry needs a newer llama-cpp-python
  (`min_llama_cpp`) and a split GGUF with a missing part, before llama.cpp touches a file.

An alias or Hub name that is simply not downloaded yet raises `NotDownloaded`, whose `.name` is what a
pull would fetch (the CLI's auto-pull `selfhost chat ALIAS --pull`, the server's `--pull`).
Each command resolves its name once (`cli.common.ensure_model`, the server's model manager) and hands the
ResolvedModel down: loaders take a resolved model or a path and never import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from selfhost.errors import DependencyError, NotFoundError, UsageError
from selfhost.models.embedded import DEFAULT_MODEL, embedded_path, embedded_quant
from selfhost.models.names import ModelName, parse_name
from selfhost.models.registry import Kind
from selfhost.models.store import ModelRecord, Store

Purpose = Literal["chat", "embedding", "rerank", "load", "inspect"]
# llama.cpp architectures that only embed (no text generation)
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
     "t5encoder", "eurobert"}
)  # fmt: skip


class NotDownloaded(NotFoundError):
    """An alias or owner/repo that exists upstream but has no local copy yet: a pull would fix it."""

    def __init__(self, name: ModelName, hint: str | None = None) -> None:
        hint = hint or f"run `selfhost pull {name}` first" + (
            " or `pip install 'selfhost[demo]'` for the offline copy" if name.base == DEFAULT_MODEL else ""
        )
        super().__init__(f"model '{name}' is not downloaded", hint=hint)
        self.name = name


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
    name = parse_name(DEFAULT_MODEL if ref is None else ref)
    try:
        resolved = _locate(name, store or Store())
    except NotFoundError:
        if purpose == "chat":  # "cannot chat" says more than "not downloaded" for an embedding alias
            _refuse_embedding_alias(name)
        raise
    check_usable(resolved, purpose)
    return resolved


def _refuse_embedding_alias(name: ModelName) -> None:
    from selfhost.models.registry import load_registry

    entry = load_registry().get(name.base) if name.kind == "alias" else None
    if entry is not None and entry.kind in ("embedding", "rerank"):
        _refuse_embedding(name.text, entry.kind)


def _refuse_embedding(name: str, kind: str = "embedding") -> None:
    if kind == "rerank":
        raise UsageError(
            f"{name} is a reranker: it scores documents against a query and cannot chat",
            hint="use it through `selfhost serve --rerank-model` (/v1/rerank), or chat with a chat model",
        )
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
        from selfhost.runtime import gguf_info

        for part in resolved.parts[1:]:  # the caller validates the first; llama.cpp reads them all
            gguf_info.inspect(part)
    if resolved.min_llama_cpp:
        have = llama_cpp_version()
        if have is not None and () < _version_tuple(have) < _version_tuple(resolved.min_llama_cpp):
            raise DependencyError(
                f"{resolved.name} needs llama-cpp-python >= {resolved.min_llama_cpp} (installed: {have})",
                hint=f"pip install -U 'llama-cpp-python>={resolved.min_llama_cpp}'",
            )
    kind = model_kind(resolved)
    if purpose == "chat" and kind in ("embedding", "rerank"):
        _refuse_embedding(resolved.name, kind)


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
    """'0.3.16' -> (0, 3, 16); '0.3.17rc1' -> (0, 3, 17): the release part (packaging's parser), so a
    pre-release of the needed version passes; an unparsable version is () and never refuses."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text).release
    except InvalidVersion:
        return ()

def _guess_kind(path: Path) -> Kind | None:
    from selfhost.runtime import gguf_info

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


def _locate(name: ModelName, store: Store) -> ResolvedModel:
    if name.kind == "path":
        if not name.path.is_file():
            raise NotFoundError(f"no such model file: {name.text}")
        return ResolvedModel(name=name.path.stem, path=name.path, parts=_sibling_parts(name.path))

    record = _stored(name, store)
    if record is not None:
        found = ResolvedModel(name=record.name, path=record.path, record=record, parts=list(record.parts))
        return _with_entry(found, record.base, record.repo)

    if name.kind == "alias":
        local = _embedded_file(name.base, name.quant)
        if local is not None:
            resolved = ResolvedModel(name=f"{name.base}:{embedded_quant(name.base)}", path=local)
            return _with_entry(resolved, name.base)
    if name.kind == "hub":
        from selfhost.models import hfcache

        cached = hfcache.find(name.base, name.tag)
        if cached is not None:  # used in place: no copy, no registration
            return ResolvedModel(name=cached.name, path=cached.path, parts=list(cached.parts))
    if name.kind in ("alias", "hub"):
        raise NotDownloaded(name)
    raise NotFoundError(
        f"unknown model '{name.text}'",
        hint="use an alias from `selfhost models list --available`, a pulled name, or a .gguf path",
    )


def _stored(name: ModelName, store: Store) -> ModelRecord | None:
    """The store's record for `name`: by repo and file for owner/repo:file.gguf, else by name (an
    alias without a quant prefers its default quant among several pulled)."""
    if name.file is not None:
        return next((r for r in store.list() if r.repo == name.base and r.file == name.file), None)
    prefer = name.quant
    if prefer is None and name.kind == "alias":
        from selfhost.models.registry import load_registry

        entry = load_registry().get(name.base)
        prefer = entry.default_quant if entry else None
    return store.lookup(str(name), prefer_quant=prefer)


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
