"""MNIST in its four IDX files (gzipped or not): read and write."""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from data.raw import Files, RawDataset, Split
from pipelines.errors import DataError

MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FILES = {
    # name: (split, kind, md5 of the official .gz)
    "train-images-idx3-ubyte": ("train", "images", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte": ("train", "labels", "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte": ("test", "images", "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte": ("test", "labels", "ec29112dd5afa0611ce80d1b7f02629c"),
}
CLASSES = [str(d) for d in range(10)]
MAX_IDX_BYTES = 500_000_000  # MNIST's largest file is 47 MB
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def _locate(files: Files, stem: str) -> tuple[str, Path]:
    for key, path in files.items():
        name = key.rsplit("/", 1)[-1]
        if name in (stem, f"{stem}.gz"):
            return key, path
    raise DataError(f"MNIST file {stem}.gz is missing; expected the four IDX files {list(FILES)}")


def _gunzip(key: str, payload: bytes) -> bytes:
    """A .gz file's content, refused past MAX_IDX_BYTES: a 3 MB file that inflates to 3 GB
    took 6 GB of memory (gzip.decompress holds it all) before its header was read. Every
    member of the file, as gzip -d reads it: `cat a.gz b.gz` and bgzip write several. The
    stream reader goes through them in one pass (a loop over zlib's unused_data copied the
    rest of the file for each: a bgzip file of MNIST's size took 14 s)."""
    with gzip.GzipFile(fileobj=io.BytesIO(payload)) as stream:
        raw = stream.read(MAX_IDX_BYTES + 1)
    if len(raw) > MAX_IDX_BYTES:
        raise DataError(
            f"{key}: inflates past {MAX_IDX_BYTES / 1e6:.0f} MB, more than an IDX file of this "
            "dataset holds"
        )
    return raw


def _read_idx(key: str, path: Path, magic: int) -> np.ndarray:
    try:
        raw = _gunzip(key, path.read_bytes()) if key.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{key}: truncated or corrupt gzip ({exc})") from None
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{key}: not an IDX file of the expected kind (magic {raw[:4].hex()})")
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{key}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):  # Python's ints: numpy's product wrapped to 0 for 2**64
        raise DataError(f"{key}: header says {dims}, body holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def read(files: Files, image_size: int | None = None) -> RawDataset:
    """Decode the four IDX files. image_size is ignored: MNIST is always 28x28x1."""
    parts: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    for stem, (split, kind, _) in FILES.items():
        key, path = _locate(files, stem)
        parts[split][kind] = _read_idx(
            key, path, IMAGES_MAGIC if kind == "images" else LABELS_MAGIC
        )
    splits = {}
    for split, p in parts.items():
        images, labels = p["images"], p["labels"].astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
        if len(labels) and labels.max() >= len(CLASSES):
            raise DataError(f"MNIST {split}: labels outside 0..9")
        splits[split] = Split(np.ascontiguousarray(images[..., None]), labels)
    return RawDataset(list(CLASSES), splits)


def _idx(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(raw: RawDataset, folder: Path) -> Path:
    """Write raw (HxWx1) as the four gzipped IDX files."""
    if raw.shape[2] != 1:
        raise DataError(f"MNIST format holds 1-channel images, not {raw.shape}")
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (split, kind, _) in FILES.items():
        s = raw.splits[split]
        payload = (
            _idx(s.images[..., 0], IMAGES_MAGIC)
            if kind == "images"
            else _idx(s.labels, LABELS_MAGIC)
        )
        # mtime=0 keeps the archive bytes, and so its sha256, reproducible.
        (folder / f"{stem}.gz").write_bytes(gzip.compress(payload, mtime=0))
    return folder
