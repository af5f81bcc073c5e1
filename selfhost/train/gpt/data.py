"""Training data: a text file or a folder of documents -> token arrays -> random batches.

Every document is followed by the end-of-text token, so the model learns where documents end.
The concatenated stream is split by position into train (first part) and val (last part), kept
as uint16 (or uint32 for vocabularies over 65,536 tokens) arrays saved beside the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfhost import atomic
from selfhost.errors import NotFoundError, UsageError
from selfhost.train.gpt.tokenizer import BPETokenizer, Tokenizer

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ""}


def read_documents(path: Path) -> list[str]:
    """One document per file: `path` itself, or every text file under the folder (sorted, recursive)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NotFoundError(f"no such data file or folder: {path}")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
        )  # fmt: skip
        if not files:
            raise UsageError(f"no text files in {path}", hint="use .txt or .md documents")
    else:
        files = [path]
    docs = []
    for f in files:
        try:
            text = f.read_text("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{f} is not UTF-8 text") from exc
        if text.strip():
            docs.append(text)
    if not docs:
        raise UsageError(f"the data in {path} is empty", hint="give a text file or a folder of documents")
    return docs


def token_dtype(vocab_size: int) -> type[np.unsignedinteger[Any]]:
    return np.uint16 if vocab_size <= 65536 else np.uint32


def encode_documents(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Each document's tokens followed by end-of-text, concatenated."""
    dtype = token_dtype(tok.vocab_size)
    if isinstance(tok, BPETokenizer):
        encoded = tok.encode_batch(docs)
    else:
        encoded = [tok.encode(d) for d in docs]
    parts = [np.asarray(ids + [tok.eot_id], dtype=dtype) for ids in encoded]
    return np.concatenate(parts)


@dataclass
class Dataset:
    train: np.ndarray
    val: np.ndarray
    n_documents: int

    @property
    def n_tokens(self) -> int:
        return len(self.train) + len(self.val)

    def check_fits(self, block_size: int) -> None:
        """Both splits need at least one block plus its next-token target."""
        for split, arr in (("train", self.train), ("val", self.val)):
            if len(arr) <= block_size:
                raise UsageError(
                    f"the data is too short: the {split} split has {len(arr)} tokens, "
                    f"fewer than one block of {block_size} + 1",
                    hint="give more text, a smaller --block-size or a larger --val-fraction",
                )

    def save(self, run_dir: Path) -> None:
        for split, arr in (("train", self.train), ("val", self.val)):
            with atomic.atomic_path(Path(run_dir) / f"{split}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)

    @classmethod
    def load(cls, run_dir: Path) -> Dataset | None:
        files = [Path(run_dir) / f"{s}.npy" for s in ("train", "val")]
        if not all(f.is_file() for f in files):
            return None
        train, val = (np.load(f, mmap_mode="r", allow_pickle=False) for f in files)
        return cls(train=train, val=val, n_documents=0)


def split(tokens: np.ndarray, val_fraction: float, n_documents: int) -> Dataset:
    n_val = max(1, int(len(tokens) * val_fraction))
    return Dataset(train=tokens[:-n_val], val=tokens[-n_val:], n_documents=n_documents)


class BatchSampler:
    """Random (x, y) windows of one split; its RNG state is the data position saved in checkpoints."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int) -> None:
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        offsets = np.arange(self.block_size)
        x = np.asarray(self.data[starts[:, None] + offsets], dtype=np.int64)  # (B, T)
        y = np.asarray(self.data[starts[:, None] + offsets + 1], dtype=np.int64)  # (B, T)
        return x, y

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
