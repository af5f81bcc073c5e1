"""Training data: a text file or a folder of documents -> token arrays -> random batches.

Every document is followed by the end-of-text token, so the model learns where documents end.
The concatenated stream is split by position into train (first part) and val (last part), kept
as uint16 (or uint32 for vocabularies over 65,536 tokens) arrays saved beside the checkpoint.

`build_dataset` tokenizes once, streaming: text is read in chunks (cut only where the cut cannot change
the tokens), appended to a token file, split into train.npy / val.npy and memory-mapped, so a corpus
larger than RAM trains; the batches are the same as from the in-memory arrays (`encode_documents`).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfhost import atomic
from selfhost.errors import NotFoundError, UsageError
from selfhost.train.gpt.tokenizer import BPETokenizer, Tokenizer, Unseen

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ""}
CHUNK_CHARS = 1 << 22  # characters read and encoded at a time
COPY_TOKENS = 1 << 24  # tokens copied at a time into train.npy / val.npy


def document_files(path: Path) -> list[Path]:
    """`path` itself, or every text file under the folder (sorted, recursive)."""
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
        return files
    return [path]


def read_documents(path: Path) -> list[str]:
    """One document per file, in memory (see `stream_documents` for corpora larger than RAM)."""
    docs = []
    for f in document_files(path):
        try:
            text = f.read_text("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{f} is not UTF-8 text") from exc
        if text.strip():
            docs.append(text)
    if not docs:
        raise UsageError(f"the data in {path} is empty", hint="give a text file or a folder of documents")
    return docs


def _safe_cut(text: str) -> int:
    """End of the last line break with non-space on both sides (0: none). GPT-2's pre-tokenizer always
    makes such a "\n" a token of its own, so cutting after it changes no token, BPE or char."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    return 0


def iter_chunks(file: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The text of `file` in pieces of about `chunk_chars` that concatenate to `file.read_text()`."""
    pending = ""
    try:
        with open(file, encoding="utf-8") as fh:
            while piece := fh.read(chunk_chars):
                pending += piece
                cut = _safe_cut(pending)
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
    except UnicodeDecodeError as exc:
        raise UsageError(f"{file} is not UTF-8 text") from exc
    if pending:
        yield pending


def stream_documents(path: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[Iterator[str]]:
    """Each non-blank document as an iterator of text chunks (the same documents as read_documents)."""
    found = False
    for f in document_files(path):
        chunks = iter_chunks(f, chunk_chars)
        head = []
        for chunk in chunks:  # skip whitespace-only files, as read_documents does
            head.append(chunk)
            if not chunk.isspace():
                break
        else:
            continue
        found = True
        yield itertools.chain(head, chunks)
    if not found:
        raise UsageError(f"the data in {path} is empty", hint="give a text file or a folder of documents")


def stream_text(path: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Every chunk of every document (what the tokenizer trains on)."""
    for doc in stream_documents(path, chunk_chars):
        yield from doc


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
    unseen: Unseen | None = None  # characters the tokenizer dropped (char tokenizer, reused on new text)

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


def build_dataset(source: Path, tok: Tokenizer, val_fraction: float, out_dir: Path,
                  chunk_chars: int = CHUNK_CHARS) -> Dataset:  # fmt: skip
    """Tokenize `source` chunk by chunk into out_dir/train.npy and val.npy; return them memory-mapped.
    Memory stays at about one chunk whatever the corpus size; the disk holds the tokens twice meanwhile."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    unseen, n_docs, eot = Unseen(), 0, np.asarray([tok.eot_id], dtype=dtype)
    fd, name = tempfile.mkstemp(prefix=".tokens.", suffix=".bin", dir=out_dir)
    os.close(fd)
    stream_path = Path(name)
    try:
        with open(stream_path, "wb") as fh:
            for doc in stream_documents(source, chunk_chars):
                n_docs += 1
                for chunk in doc:
                    unseen.add(tok.unseen(chunk))
                    np.asarray(tok.encode(chunk), dtype=dtype).tofile(fh)
                eot.tofile(fh)
        tokens = np.memmap(stream_path, dtype=dtype, mode="r")
        n_val = max(1, int(len(tokens) * val_fraction))
        _write_npy(out_dir / "train.npy", tokens[:-n_val])
        _write_npy(out_dir / "val.npy", tokens[-n_val:])
        del tokens
    finally:
        stream_path.unlink(missing_ok=True)  # the split arrays hold the same tokens
    loaded = Dataset.load(out_dir)
    assert loaded is not None
    loaded.n_documents, loaded.unseen = n_docs, unseen
    return loaded


def _write_npy(path: Path, tokens: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp:
        if len(tokens) == 0:
            with open(tmp, "wb") as fh:
                np.save(fh, tokens)
            return
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=tokens.dtype, shape=(len(tokens),))
        for i in range(0, len(tokens), COPY_TOKENS):
            out[i : i + COPY_TOKENS] = tokens[i : i + COPY_TOKENS]
        out.flush()
        del out


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
