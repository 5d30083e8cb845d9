"""Where a dataset comes from: the user's path, the local cache, a download, or the generator."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from data import cifar10, imagefolder, mnist, synthetic
from data.download import download
from data.raw import Files, RawDataset, files_of
from pipelines.config import DatasetConfig
from pipelines.errors import ConfigError, DataError

log = logging.getLogger("mlops.sources")

Reader = Callable[[Files, int | None], RawDataset]
READERS: dict[str, Reader] = {
    "cifar10": cifar10.read,
    "mnist": mnist.read,
    "imagefolder": imagefolder.read,
    "synthetic": imagefolder.read,  # generated as an ImageFolder archive
}
# What the official datasets must look like: (classes, image shape HWC).
EXPECTED: dict[str, tuple[int, tuple[int, int, int]]] = {
    "cifar10": (cifar10.NUM_CLASSES, cifar10.SHAPE),
    "mnist": (len(mnist.CLASSES), (28, 28, 1)),
}


def _cached(name: str, cache: Path) -> Path | None:
    if name == "cifar10":
        path = cache / "cifar10" / cifar10.ARCHIVE
        return path if path.exists() else None
    if name == "mnist":
        folder = cache / "mnist"
        return folder if all((folder / f"{s}.gz").exists() for s in mnist.FILES) else None
    return None


def local_source(ds: DatasetConfig, cache: Path) -> Path | None:
    """A local copy of the dataset, without touching the network; None when there is none."""
    if ds.source:
        return ds.source_path()
    if ds.name == "synthetic":
        path = cache / f"synthetic-n{ds.synthetic_per_class}-s{ds.seed}.tar.gz"
        if not path.exists():
            log.info("generating synthetic data: %s", path.name)
            part = path.with_name("part-" + path.name)
            try:
                synthetic.write("imagefolder", part, ds.synthetic_per_class, ds.seed)
            except BaseException:
                part.unlink(missing_ok=True)  # a disk that filled up: none of it is kept
                raise
            part.replace(path)
        return path
    return _cached(ds.name, cache)


def download_source(ds: DatasetConfig, cache: Path) -> Path:
    """Download the official files into the cache (only cifar10 and mnist have them)."""
    hint = "pass --data PATH to a local copy, or run `make demo` to use generated data"
    if ds.name not in ("cifar10", "mnist"):
        raise DataError(f"{ds.name} data is neither in the store nor given: {hint}")
    if not ds.download:
        raise DataError(f"{ds.name} is not in the store and dataset.download is off: {hint}")
    if ds.name == "cifar10":
        return download(cifar10.URL, cache / "cifar10" / cifar10.ARCHIVE, cifar10.MD5)
    for stem, (_, _, md5) in mnist.FILES.items():
        download(f"{mnist.MIRROR}{stem}.gz", cache / "mnist" / f"{stem}.gz", md5)
    return cache / "mnist"


def source_files(name: str, path: Path) -> Files:
    """The files to store for a dataset source: only what its reader uses."""
    if name == "cifar10" and path.is_dir():
        path = path / cifar10.ARCHIVE
        if not path.exists():
            raise ConfigError(f"{path.parent} holds no {cifar10.ARCHIVE}")
    if name == "mnist" and not path.is_dir():
        raise ConfigError(f"MNIST source {path} must be a folder holding the four IDX files")
    files = files_of(path)
    if name == "imagefolder" and path.is_dir():
        # Its images only: the rest (a README, a 1 GB cache file) was uploaded, changed the
        # dataset's hash when edited, and was read whole. With none, the reader names the files.
        images = {k: p for k, p in files.items() if imagefolder.wanted(k, p.stat().st_size)}
        files = images or files
    if name == "mnist":
        keep = {f"{s}{ext}" for s in mnist.FILES for ext in ("", ".gz")}
        files = {k: p for k, p in files.items() if k in keep}
    return files


def check_expected(name: str, raw: RawDataset) -> None:
    """The number of classes, the image shape, and that no class is empty."""
    if len(raw.classes) < 2:
        raise DataError(f"{name}: found {len(raw.classes)} class(es), need at least 2")
    if name in EXPECTED:
        classes, shape = EXPECTED[name]
        if len(raw.classes) != classes:
            raise DataError(f"{name}: found {len(raw.classes)} classes, expected {classes}")
        if raw.shape != shape:
            raise DataError(f"{name}: images are {raw.shape}, expected {shape}")
    if "train" not in raw.splits:
        raise DataError(f"{name}: no train images found")
    if "test" in raw.splits and not len(raw.splits["test"]):
        # Passed here, then feature-engineering blamed the split it would have carved.
        raise DataError(
            f"{name}: the source's test split holds no images (its test files are empty)"
        )
    for split, counts in raw.class_counts().items():
        empty = [c for c, n in counts.items() if n == 0]
        if empty and split == "train":
            raise DataError(f"{name}: train class(es) {empty} have no images")
