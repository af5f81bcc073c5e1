"""Turn what a user typed (alias, alias:quant, store name, path) into a GGUF file on disk."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from selfhost.embedded import DEFAULT_MODEL, embedded_path, embedded_quant
from selfhost.errors import NotFoundError
from selfhost.store import ModelRecord, Store, split_name


class ResolvedModel(BaseModel):
    name: str
    path: Path
    record: ModelRecord | None = None


def resolve_model(ref: str | None, store: Store | None = None) -> ResolvedModel:
    """Find a local GGUF for `ref` (default: the embedded default model). Never downloads."""
    ref = ref or DEFAULT_MODEL
    as_path = Path(ref).expanduser()
    if ref.endswith(".gguf") or as_path.is_file() or "/" in ref and as_path.exists():
        if not as_path.is_file():
            raise NotFoundError(f"no such model file: {ref}")
        return ResolvedModel(name=as_path.stem, path=as_path)

    store = store or Store()
    base, quant = split_name(ref)
    prefer = quant
    if prefer is None:
        from selfhost.registry import load_registry

        entry = load_registry().get(base)
        prefer = entry.default_quant if entry else None
    try:
        record = store.find(ref, prefer_quant=prefer)
        return ResolvedModel(name=record.name, path=record.path, record=record)
    except NotFoundError:
        pass

    local = _embedded_file(base, quant)
    if local is not None:
        return ResolvedModel(name=f"{base}:{embedded_quant(base)}", path=local)

    from selfhost.registry import load_registry

    if load_registry().get(base) is not None:
        hint = f"run `selfhost pull {ref}` first"
        if base == DEFAULT_MODEL:
            hint += " or `pip install 'selfhost[demo]'` for the offline copy"
        raise NotFoundError(f"model '{ref}' is not downloaded", hint=hint)
    raise NotFoundError(
        f"unknown model '{ref}'",
        hint="use an alias from `selfhost models list --available`, a pulled name, or a .gguf path",
    )


def _embedded_file(base: str, quant: str | None) -> Path | None:
    """The packaged GGUF for `base`, only while the effective registry entry (user overrides
    included) still names that same repo, file and quant: `pull` and `chat` must agree."""
    from selfhost.registry import load_registry, parse_registry_file, shipped_registry_path

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
