"""The decoded form every reader returns: uint8 NHWC images and int64 labels per split."""

from __future__ import annotations

import gzip
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np

from pipelines.errors import DataError

# The image files an ImageFolder dataset may hold (and whose presence elsewhere says it is one).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# The formats PIL may read them as, in training and in the model server alike: its others
# (ICO, say, which decodes its largest frame while it opens, before any size is checked)
# are no image of the dataset's.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]

    def __post_init__(self) -> None:
        assert self.images.dtype == np.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.dtype == np.int64 and len(self.labels) == len(self.images)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawDataset:
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) shared by every image."""
        return tuple(next(iter(self.splits.values())).images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> dict[str, dict[str, int]]:
        counts = {}
        for name, split in self.splits.items():
            per = np.bincount(split.labels, minlength=len(self.classes))
            counts[name] = {cls: int(n) for cls, n in zip(self.classes, per, strict=True)}
        return counts


@contextmanager
def tar_gz(path: Path) -> Iterator[tarfile.TarFile]:
    """A .tar.gz to write whose bytes depend on its contents only: tarfile's "w:gz" stamps the
    time into the gzip header, so the same generated dataset had another sha256, and so other
    features, in each state dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "wb") as file,
        gzip.GzipFile(filename="", fileobj=file, mode="wb", mtime=0) as gz,  # no name either
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        yield tar


def hidden(path: PurePath) -> bool:
    """A dotfile or a file under a dot-folder (.DS_Store, .git/...): never part of a dataset."""
    return any(part.startswith(".") for part in path.parts)


def free_memory() -> int:
    """Bytes this process may still take: the machine's available memory, capped by a cgroup
    v2 limit (a pod's), where a reader that went past it was OOM-killed without a word."""
    import psutil

    free = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


# A raw dataset on disk: object key (relative path, as stored under raw-data/<id>/) -> local file.
Files = dict[str, Path]


def files_of(path: Path) -> Files:
    """The files of a source: a single file keyed by its name, or a folder walked recursively."""
    if path.is_file():
        return {path.name: path}
    files = {
        p.relative_to(path).as_posix(): p
        for p in sorted(path.rglob("*"))
        if p.is_file() and not hidden(p.relative_to(path))
    }
    if not files:
        raise DataError(f"{path} holds no files")
    for key in files:
        try:
            key.encode()
        except UnicodeEncodeError:  # bytes the file system holds, but an S3 key cannot
            raise DataError(
                f"{path / key!r}: the file name is not UTF-8, which an object key must be: "
                "rename it"
            ) from None
    return files


def find_one(files: Files, suffixes: tuple[str, ...], what: str) -> tuple[str, Path]:
    """The single file whose name ends with one of suffixes, or a DataError that says so."""
    hits = [(k, p) for k, p in files.items() if k.lower().endswith(suffixes)]
    if len(hits) != 1:
        found = ", ".join(sorted(files)[:5]) or "nothing"
        raise DataError(f"expected one {what} ({'/'.join(suffixes)}), found: {found}")
    return hits[0]
