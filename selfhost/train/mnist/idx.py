"""Read the IDX files MNIST ships in (gzipped or raw) with numpy; validate the header against the size.

IDX layout: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32 per
dimension, then the data in C order (big-endian for multi-byte types).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from selfhost.errors import IntegrityError, NotFoundError

if TYPE_CHECKING:
    import numpy as np

# IDX dtype code -> numpy dtype string (big-endian where it matters).
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Standard file stems, and the shape MNIST must have (None: any count).
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode one IDX blob; raise IntegrityError on a bad magic, dtype, dimension count or size."""
    import numpy as np

    if len(data) < 4:
        raise IntegrityError(f"{name} is not an IDX file: only {len(data)} bytes")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IntegrityError(f"{name} is not an IDX file: bad magic {data[:4].hex()}")
    if code not in IDX_DTYPES:
        raise IntegrityError(f"{name} is not an IDX file: unknown data type 0x{code:02x}")
    if not 1 <= ndim <= 4:
        raise IntegrityError(f"{name} is not an IDX file: {ndim} dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IntegrityError(
            f"{name} is truncated: the header needs {header} bytes, the file has {len(data)}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise IntegrityError(
            f"{name} has the wrong size: its header says {'x'.join(map(str, dims))} "
            f"({expected} bytes), the file has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


MAX_IDX_BYTES = 256 * 1024 * 1024  # decompressed; MNIST's largest file is 47 MB


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The decompressed content of `path` (gzip is detected by its magic, not by the name).

    Never more than `limit` bytes are read or decompressed: a gzip bomb is refused after
    `limit` bytes of output, not after filling the memory."""
    path = Path(path)
    limit = MAX_IDX_BYTES if limit is None else limit
    with open(path, "rb") as fh:
        magic = fh.read(2)
        fh.seek(0)
        if magic != b"\x1f\x8b":
            raw = fh.read(limit + 1)
            if len(raw) > limit:
                raise IntegrityError(f"{path} is larger than {limit >> 20} MiB: not an MNIST-sized IDX file")
            return raw
        try:
            return _gunzip_bounded(fh, limit, path)
        except (OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(f"{path} is a corrupt gzip file: {exc}") from None


def _gunzip_bounded(fh: BinaryIO, limit: int, path: Path) -> bytes:
    out = bytearray()
    with gzip.GzipFile(fileobj=fh) as gz:
        while chunk := gz.read(1 << 20):
            out += chunk
            if len(out) > limit:
                raise IntegrityError(
                    f"{path} decompresses to more than {limit >> 20} MiB: not an MNIST-sized IDX file"
                )
    return bytes(out)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gz or raw) into a numpy array."""
    return parse_idx(read_bytes(path), name=str(path))


def find_file(directory: Path, stem: str) -> Path:
    """`stem`, `stem.gz`, or the dotted spelling some mirrors use (`train-images.idx3-ubyte`)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise NotFoundError(
        f"{directory} has no {stem}[.gz]",
        hint="--data needs the four MNIST IDX files; leave it out to download them",
    )


@dataclass
class MnistArrays:
    """The dataset in memory: uint8 images (N, 28, 28) and uint8 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_mnist(directory: Path) -> MnistArrays:
    """Read and cross-check the four files in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotFoundError(f"MNIST data directory {directory} does not exist")
    arrays = {key: read_idx(find_file(directory, stem)) for key, stem in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype.itemsize != 1:
            raise IntegrityError(f"{split} images have shape {images.shape}, expected (N, 28, 28) bytes")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise IntegrityError(
                f"{split} labels have shape {labels.shape}, expected one per image ({images.shape[0]})"
            )
        if labels.size and int(labels.max()) > 9:
            raise IntegrityError(f"{split} labels contain {int(labels.max())}: MNIST labels are 0-9")
    return MnistArrays(**arrays)
