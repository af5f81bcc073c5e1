"""Every model that is here to use: what `selfhost models list` shows (the store, GGUFs in the Hugging
Face cache) plus the registry's aliases whose files are installed (the packaged default), each under a
name the one name grammar resolves. `selfhost serve` without a model serves exactly these."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from selfhost.models.store import Store


class LocalModel(BaseModel):
    name: str  # resolves with resolve_model()
    path: Path
    size: int


def local_models(store: Store | None = None) -> list[LocalModel]:
    from selfhost.models import hfcache
    from selfhost.models.embedded import DEFAULT_MODEL, embedded_path, embedded_quant

    records = (store or Store()).list()
    found = [LocalModel(name=r.name, path=r.path, size=r.size) for r in records if Path(r.path).exists()]
    seen = {m.path for m in found}
    for cached in hfcache.scan():
        if cached.path not in seen:
            found.append(LocalModel(name=cached.name, path=cached.path, size=cached.size))
            seen.add(cached.path)
    packaged, quant = embedded_path(DEFAULT_MODEL), embedded_quant(DEFAULT_MODEL)
    if packaged is not None and packaged not in seen:
        found.append(LocalModel(name=f"{DEFAULT_MODEL}:{quant}", path=packaged, size=packaged.stat().st_size))
    return found
