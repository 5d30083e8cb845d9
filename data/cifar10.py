"""CIFAR-10 in its official python-tarball format: read (with a restricted unpickler) and write."""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from data.raw import IMAGE_SUFFIXES, Files, RawDataset, Split, find_one, tar_gz
from pipelines.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
SHAPE = (32, 32, 3)
NUM_CLASSES = 10
MAX_BATCH_BYTES = 64_000_000  # each of the official batches is 31 MB

# The batches are pickles, so they are read with an unpickler that can build only plain
# containers and numpy arrays: a crafted archive cannot run code here.
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_batch(raw: bytes, member: str) -> dict:
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:  # any unpickling failure means a malformed batch
        raise DataError(f"{member}: not a CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{member}: not a CIFAR-10 batch (a {type(batch).__name__})")
    return batch


def _to_split(batches: list[tuple[str, dict]]) -> Split:
    images, labels = [], []
    for member, batch in batches:
        data = batch.get("data")
        if not isinstance(data, np.ndarray):  # a ragged list was numpy's traceback
            raise DataError(f"{member}: data is a {type(data).__name__}, want uint8[N, 3072]")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 32 * 32 * 3:
            raise DataError(
                f"{member}: data is {data.dtype}{list(data.shape)}, want uint8[N, 3072]"
            )
        raw = batch.get("labels")
        # Checked as Python values: None, text, floats (1.7 became 1) or nested lists went into
        # numpy as whatever it made of them, or raised there.
        if not isinstance(raw, list) or not all(type(x) is int for x in raw):
            raise DataError(f"{member}: labels must be a list of class indices (ints)")
        if len(raw) != len(data):
            raise DataError(f"{member}: {len(data)} images but {len(raw)} labels")
        if any(not 0 <= x < NUM_CLASSES for x in raw):
            raise DataError(f"{member}: labels outside 0..{NUM_CLASSES - 1}")
        lab = np.asarray(raw, dtype=np.int64)
        # Stored as N x (3 planes of 32x32): to NHWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def read(files: Files, image_size: int | None = None) -> RawDataset:
    """Decode the official archive. image_size is ignored: CIFAR-10 is always 32x32."""
    key, path = find_one(files, (".tar.gz", ".tgz"), "CIFAR-10 python archive")
    wanted = {f"{FOLDER}/{name}" for name in [*TRAIN_BATCHES, TEST_BATCH, META]}
    found: dict[str, bytes] = {}
    images = False  # CIFAR-10 as image files, e.g. from an image-folder export
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    if member.size > MAX_BATCH_BYTES:  # read whole: 1 GiB of zeros took 2 GB
                        raise DataError(
                            f"{key}: {member.name} is {member.size / 1e6:.0f} MB; a CIFAR-10 "
                            "batch is 31 MB: not the CIFAR-10 python archive"
                        )
                    found[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
                images = images or member.name.lower().endswith(IMAGE_SUFFIXES)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{key}: the archive is truncated or corrupt ({exc})") from None
    missing = sorted(wanted - set(found))
    if missing and images:
        raise DataError(
            f"{key} holds image files, not the CIFAR-10 python batches: read it with "
            "--dataset imagefolder"
        )
    if missing:
        raise DataError(f"{key}: missing {', '.join(missing)}: not the CIFAR-10 python archive")
    meta = _load_batch(found[f"{FOLDER}/{META}"], META)
    names = meta.get("label_names")
    if not isinstance(names, list) or not all(isinstance(c, str | bytes) for c in names):
        raise DataError(f"{key}: {META}'s label_names is not a list of class names")
    classes = [c.decode("latin1") if isinstance(c, bytes) else c for c in names]
    if len(classes) != NUM_CLASSES:
        raise DataError(f"{key}: {META} names {len(classes)} classes, CIFAR-10 has 10")
    if len(set(classes)) != NUM_CLASSES:  # the manifest counts images by class name
        twice = sorted({c for c in classes if classes.count(c) > 1})
        raise DataError(f"{key}: {META} names {', '.join(twice)} more than once")
    train = [(b, _load_batch(found[f"{FOLDER}/{b}"], b)) for b in TRAIN_BATCHES]
    test = [(TEST_BATCH, _load_batch(found[f"{FOLDER}/{TEST_BATCH}"], TEST_BATCH))]
    return RawDataset(classes, {"train": _to_split(train), "test": _to_split(test)})


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(f"{FOLDER}/{name}")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write(raw: RawDataset, path: Path) -> Path:
    """Write raw (32x32 RGB) in the official layout, as the synthetic generator needs."""
    if raw.shape != SHAPE:
        raise DataError(f"CIFAR-10 format holds 32x32x3 images, not {raw.shape}")
    with tar_gz(path) as tar:
        _add(tar, META, pickle.dumps({"label_names": raw.classes}, protocol=2))
        train = raw.splits["train"]
        for i, idx in enumerate(np.array_split(np.arange(len(train)), len(TRAIN_BATCHES))):
            _add(tar, TRAIN_BATCHES[i], _batch(train, idx, TRAIN_BATCHES[i]))
        test = raw.splits["test"]
        _add(tar, TEST_BATCH, _batch(test, np.arange(len(test)), TEST_BATCH))
    return path


def _batch(split: Split, idx: np.ndarray, label: str) -> bytes:
    data = split.images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)
    doc = {"batch_label": label, "labels": split.labels[idx].tolist(), "data": data}
    return pickle.dumps(doc, protocol=2)
