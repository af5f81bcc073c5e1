"""The one model-name grammar: what `pull`, `chat`, `serve`, `quantize`, `compare`, `models` and train
export accept, parsed once by `parse_name()` so every command reads a name the same way.

    path    ./m.gguf, ../m.gguf, /abs/m.gguf, ~/m.gguf, m.gguf, or any existing file
    alias   smollm2-135m, qwen3-0.6b:q8_0             (a registry entry; the quant is case-insensitive)
    store   my-gpt, my-gpt:Q8_0                       (any other bare name: one selfhost made or imported)
    hub     owner/repo, owner/repo:Q4_K_M, owner/repo:sub/file.gguf

`..` means what the shell means in a path, and nothing anywhere else: an alias, a store name, an
owner/repo id or a file inside a repo with a `.` or `..` component is refused, so a name can never
point outside the folder it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from selfhost.errors import UsageError

NameKind = Literal["path", "store", "alias", "hub"]
_BARE = re.compile(r"[\w.-]+")
_QUANT = re.compile(r"[A-Za-z0-9_]+")
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_GRAMMAR = "use alias[:QUANT], owner/repo[:QUANT|:file.gguf], a store name or a .gguf path"


@dataclass(frozen=True)
class ModelName:
    """A parsed model name. `base` is the expanded path, the alias, the store base name or owner/repo."""

    text: str  # as typed (stripped)
    kind: NameKind
    base: str
    quant: str | None = None  # upper case
    file: str | None = None  # hub only: a file named inside the repo

    @property
    def path(self) -> Path:
        return Path(self.base)

    @property
    def tag(self) -> str | None:
        return self.file or self.quant

    def __str__(self) -> str:
        """The canonical spelling: 'alias:Q4_K_M' for 'alias:q4_k_m' (store names are spelt so)."""
        return self.base if self.tag is None else f"{self.base}:{self.tag}"


def split_tag(name: str) -> tuple[str, str | None]:
    """'alias:Q4_K_M' -> ('alias', 'Q4_K_M'); 'owner/repo:sub/f.gguf' -> ('owner/repo', 'sub/f.gguf');
    'alias' -> ('alias', None). Names never contain ':' (repo ids, aliases and store bases cannot)."""
    base, sep, tag = name.partition(":")
    if not sep or not base:
        return name, None
    return base, tag


def parse_name(text: str) -> ModelName:
    """Classify a model name (see the module docstring). Raises UsageError for a malformed one."""
    text = text.strip()
    if not text:
        raise UsageError("empty model name", hint="e.g. `selfhost pull smollm2-135m`")
    if is_path(text):
        return ModelName(text, "path", str(Path(text).expanduser()))
    base, tag = split_tag(text)
    if tag is None and ":" in text:
        raise UsageError(f"bad model name '{text}'", hint=_GRAMMAR)
    quant, file = _parse_tag(text, tag)
    if "/" in base:
        check_repo_id(base, text)
        return ModelName(text, "hub", base, quant, file)
    if file is not None:
        raise UsageError(f"'{text}': a file can only be named for an owner/repo", hint=_GRAMMAR)
    if not _BARE.fullmatch(base) or base in (".", ".."):
        raise UsageError(f"bad model name '{text}'", hint=_GRAMMAR)
    from selfhost.models.registry import load_registry

    kind: NameKind = "alias" if load_registry().get(base) is not None else "store"
    return ModelName(text, kind, base, quant)


def check_store_name(name: str) -> str:
    """A name for a new store entry (train export) that every command reads back as that store name:
    letters, digits, '.', '_' and '-', starting with a letter or digit, no tag, not a .gguf file name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name.lower().endswith(".gguf"):
        raise UsageError(
            f"invalid model name '{name}'",
            hint="use letters, digits, '.', '_' and '-' (and no .gguf ending: that reads as a file)",
        )
    return name


def is_path(text: str) -> bool:
    """A local file: an explicit path (./ ../ / ~), a name ending in .gguf without a tag, or an
    existing file (a directory is not a model)."""
    if text.startswith(_PATH_PREFIXES) or text in (".", ".."):
        return True
    if text.lower().endswith(".gguf") and ":" not in text:
        return True
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):  # a name too long or with a NUL byte is no file
        return False


def check_repo_id(repo: str, text: str | None = None) -> str:
    """'owner/name' with no '.' or '..' part (the Hub forbids them; a cache folder must not escape)."""
    parts = repo.split("/")
    if len(parts) != 2 or not all(_BARE.fullmatch(p) for p in parts) or any(p in (".", "..") for p in parts):
        what = f" in '{text}'" if text and text != repo else ""
        if ".." in parts:
            raise UsageError(
                f"'{text or repo}' is neither a file nor a model name",
                hint="'..' may appear in a path to a .gguf file, never in owner/repo",
            )
        raise UsageError(f"bad Hub repo id '{repo}'{what}", hint="expected owner/name")
    return repo


def _parse_tag(text: str, tag: str | None) -> tuple[str | None, str | None]:
    if tag is None:
        return None, None
    if tag.lower().endswith(".gguf"):
        return None, safe_filename(tag)
    if _QUANT.fullmatch(tag):
        return tag.upper(), None
    raise UsageError(f"bad quant '{tag}' in '{text}'", hint="quants look like Q4_K_M, Q8_0, F16")


def safe_filename(name: str) -> str:
    """A repo-relative file name that cannot escape a directory (no `..`, no absolute path)."""
    posix = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or posix.is_absolute()
        or re.match(r"^[A-Za-z]:", name)
        or any(part in ("..", ".", "") for part in name.split("/"))
    ):
        raise UsageError(
            f"unsafe file name '{name}'", hint="file names must be relative paths inside the repo"
        )
    return name
