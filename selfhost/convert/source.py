"""What `selfhost convert SOURCE` reads: a Hugging Face model folder, or a Hub repo (fetched to the cache).

`inspect_folder` checks, before the converter starts, what a conversion needs (config.json naming an
architecture, safetensors weights, tokenizer files) and estimates the output size from the
safetensors headers. `fetch_repo` downloads only the files the converter reads, resumable and
sha256-verified, into huggingface-hub's cache (the same machinery as `selfhost pull`).
"""

from __future__ import annotations

import fnmatch
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from selfhost import atomic
from selfhost.errors import IntegrityError, NotFoundError, UsageError
from selfhost.models import download, hub

# Files llama.cpp's converter reads from a model folder (weights, config, tokenizer, chat template).
WANTED = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# bytes per weight of each --outtype (auto: the converter picks F16 or BF16)
OUT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "auto": 2.0, "q8_0": 34 / 32}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    architecture: str
    n_params: int
    weights_bytes: int

    def output_estimate(self, outtype: str) -> int:
        return int(self.n_params * OUT_BYTES[outtype]) + 32 * 2**20  # + vocabulary and metadata


def inspect_folder(folder: Path) -> ModelFolder:
    """Validate a Hugging Face model folder. Raises NotFoundError / UsageError with one clear line."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NotFoundError(f"no such model folder: {folder}", hint="pass a model folder or owner/repo")
    config = folder / "config.json"
    if not config.is_file():
        raise UsageError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        architectures = json.loads(config.read_text("utf-8")).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise UsageError(f"{config} is not valid JSON ({type(exc).__name__})") from exc
    if not architectures:
        raise UsageError(f"{config} names no model architecture (no \"architectures\" list)")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = (
            f"it has PyTorch pickle weights ({bins[0]}): selfhost converts safetensors only, since loading a "
            "pickle can run code; re-save them with save_pretrained(safe_serialization=True)"
            if bins else None
        )
        raise UsageError(f"{folder} has no .safetensors weights", hint=hint)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{folder} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    n_params = sum(_safetensors_params(p) for p in shards)
    return ModelFolder(folder, architectures[0], n_params, sum(p.stat().st_size for p in shards))


def _safetensors_params(path: Path) -> int:
    """Number of weights in a .safetensors file, from its JSON header."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if not 0 < size < 100 * 2**20:
                raise ValueError("bad header size")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise IntegrityError(f"{path} is not a valid safetensors file ({exc})") from exc
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry.get("shape", []):
            count *= int(dim)
        total += count
    return total


def fetch_repo(repo: str, revision: str = "main", *, retries: int = 3) -> Iterator[object]:
    """Download what the converter reads from `repo` into the HF cache; return the snapshot folder.

    Checks the listing first, so a repo without config.json or safetensors fails before any download."""
    listing = hub.fetch_listing(repo, revision)
    names = [n for n in listing.files if any(fnmatch.fnmatch(n, pattern) for pattern in WANTED)]
    if "config.json" not in names:
        raise UsageError(f"{repo} has no config.json: not a Hugging Face model repo")
    if not any(n.endswith(".safetensors") for n in names):
        raise UsageError(f"{repo} has no .safetensors weights", hint="selfhost converts safetensors only")
    layout = hub.CacheLayout.for_repo(repo)
    missing = [listing.files[n] for n in names if not _cached(layout, listing.files[n])]
    need = sum(f.size or 0 for f in missing)
    if need:
        layout.root.mkdir(parents=True, exist_ok=True)
        atomic.ensure_free_space(layout.root, need, f"downloading {repo}")
    from huggingface_hub import hf_hub_url

    for name in sorted(names):
        remote = listing.files[hub.safe_filename(name)]
        url = hf_hub_url(repo, name, revision=listing.commit, endpoint=hub.endpoint())
        yield from download.fetch_blob(url, layout, remote, retries=retries)
        layout.link(layout.blob(remote.etag or ""), layout.pointer(listing.commit, name))
    layout.write_ref(revision, listing.commit)
    return layout.folder / "snapshots" / listing.commit, listing.commit


def _cached(layout: hub.CacheLayout, remote: hub.RemoteFile) -> bool:
    return bool(remote.etag and layout.blob(remote.etag).exists())


def is_repo_id(source: str) -> bool:
    """'owner/name' that is not an existing local path ('./x', '/x', '~/x' are always paths)."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return False
    return bool(hub.REPO_PATTERN.match(source))
