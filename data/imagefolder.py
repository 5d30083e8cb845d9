"""ImageFolder data: a folder, .tar.gz or .zip of train|test/<class>/*.png|jpg, or of <class>/*."""

from __future__ import annotations

import io
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from data.raw import (
    IMAGE_FORMATS,
    IMAGE_SUFFIXES,
    Files,
    RawDataset,
    Split,
    free_memory,
    hidden,
    tar_gz,
)
from pipelines.console import progress
from pipelines.errors import DataError

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
ARCHIVE_SUFFIXES = (*TAR_SUFFIXES, ".zip")
# What macOS's Archive Utility adds to a zip beside the files: resource forks, not images.
ZIP_NOISE = "__MACOSX"
MAX_IMAGE_BYTES = 100_000_000  # a camera's largest JPEG is a tenth of it
SPLITS = ("train", "test")
# Modes that convert losslessly to L or RGB. Others (16-bit, float) would be silently
# rescaled, so they are refused with the file's name.
GRAY_MODES = {"L", "LA", "1"}
COLOR_MODES = {"RGB", "RGBA", "P", "CMYK", "YCbCr"}
# EXIF is parsed as TIFF, whose reader warns of each block it cannot parse, once a process: in
# a server's log, one client's damaged photo. It is ignored anyway (_orientation), so unsaid.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


def wanted(name: str, size: int) -> bool:
    """Whether an archive's file is read: an image, not hidden, of a size an image has. The
    rest were read whole too: a 3 MB archive holding a 3 GiB file of zeros (a dotfile, even)
    took 6 GB of memory before anything looked at it."""
    path = PurePosixPath(name)
    if path.suffix.lower() not in IMAGE_SUFFIXES or hidden(path):
        return False
    if size > MAX_IMAGE_BYTES:
        raise DataError(
            f"{name}: {size / 1e6:.0f} MB, more than an image file holds "
            f"({MAX_IMAGE_BYTES / 1e6:.0f} MB at most): not an image of a dataset"
        )
    return True


def _tar_entries(path: Path) -> Iterator[tuple[str, bytes | None]]:
    read: dict[str, bytes] = {}
    with tarfile.open(path, "r|*") as tar:  # streamed: nothing is extracted to disk
        for member in tar:
            if member.isdir():
                yield member.name, None
            elif member.isfile():
                take = wanted(member.name, member.size)
                payload = tar.extractfile(member).read() if take else b""  # type: ignore[union-attr]
                read[member.name] = payload
                yield member.name, payload
            elif member.islnk() and member.linkname in read:
                # tar stores a file's second name as a hard link to its first (class folders
                # built with os.link, a deduplicated copy): the image is there under both names,
                # as extracting the archive shows. A stream reads the first name only once.
                target = read[member.linkname]
                yield member.name, target if wanted(member.name, len(target)) else b""


def _zip_entries(path: Path) -> Iterator[tuple[str, bytes | None]]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename.split("/")[0] == ZIP_NOISE:
                continue
            if info.is_dir():
                yield info.filename.rstrip("/"), None
            else:
                take = wanted(info.filename, info.file_size)
                yield info.filename, archive.read(info) if take else b""


def _entries(files: Files) -> Iterator[tuple[str, bytes | None]]:
    """(path, bytes) of every entry; bytes is None for a directory (so empty classes show)."""
    if len(files) == 1:
        ((key, path),) = files.items()
        if key.lower().endswith(ARCHIVE_SUFFIXES):
            read = _zip_entries if key.lower().endswith(".zip") else _tar_entries
            # The images are held in memory, and then their pixels: past half of what is free,
            # a small archive that inflates to gigabytes (a dozen 99 MB files of zeros in 1 MB)
            # is refused by name, not OOM-killed. Not a ratio to the archive's size: BMPs of
            # flat graphics deflate 500 times, as zeros do.
            budget, total = free_memory() // 2, 0
            try:
                for name, payload in read(path):
                    total += len(payload or b"")
                    if total > budget:
                        raise DataError(
                            f"{key}: its images inflate past {budget / 1e9:.1f} GB, half the "
                            "memory free here, and the reader holds them all: give the step "
                            "more memory, or fewer or smaller images"
                        )
                    yield name, payload
            except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
                raise DataError(f"{key}: the archive is truncated or corrupt ({exc})") from None
            except (RuntimeError, NotImplementedError) as exc:  # zipfile's, for what it lacks
                raise DataError(
                    f"{key}: an entry cannot be read ({exc}): make the archive again, without "
                    "a password and with deflate or no compression"
                ) from None
            return
        if not key.lower().endswith(IMAGE_SUFFIXES) or "/" not in key:
            # Not one image file either: its folder's parent was walked below, a home folder
            # of --data ~/x.png.
            raise DataError(
                f"{key} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)}) of "
                "class folders of images"
            )
    # A local folder: list its sub-folders too, since S3 keeps no empty folder to show them.
    first_key, root = next(iter(files.items()))
    for _ in PurePosixPath(first_key).parts:
        root = root.parent
    for folder in sorted(root.rglob("*")):
        if folder.is_dir():
            yield folder.relative_to(root).as_posix(), None
    for key, path in files.items():
        yield key, path.read_bytes() if wanted(key, path.stat().st_size) else b""


def _layout(paths: list[PurePosixPath]) -> tuple[int, bool]:
    """How many leading folders to drop (a wrapper folder), and whether train/test splits exist."""
    drop = 0
    while True:
        tops = {p.parts[drop] for p in paths if len(p.parts) > drop + 1}
        # One folder holding only images is a class (a lone one, refused later as such), not
        # a wrapper: a wrapper holds class folders.
        nested = any(len(p.parts) > drop + 2 for p in paths)
        if len(tops) == 1 and not tops & set(SPLITS) and nested:
            drop += 1
            continue
        return drop, bool(tops) and tops <= set(SPLITS)


# EXIF orientation 2-8: how to turn the stored pixels upright (ImageOps.exif_transpose's
# table; that function also rewrites the EXIF block, and fails on one it cannot write back).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(opened: Image.Image) -> int:
    """The EXIF orientation tag (1, upright, if none). Cameras and phones store the sensor's
    pixels and tag how to turn them: whoever sorted the photos into class folders, or sends
    one to the server, saw them upright, so the model does too. EXIF that does not parse is
    ignored, as viewers ignore it: the pixels are still good."""
    try:
        tag = opened.getexif().get(ExifTags.Base.Orientation)
    except (OSError, ValueError, SyntaxError, TypeError, struct.error):
        return 1
    return tag if isinstance(tag, int) else 1


def fit_image(opened: Image.Image, mode: str, size: tuple[int, int] | None) -> Image.Image:
    """An opened image, decoded in `mode` ("L" or "RGB") at `size` (None: its own). The one
    resize of the pipeline, for dataset.image_size and in the model server alike, so that a
    served image is scaled as the training images were. A JPEG decodes at the smallest
    power-of-two fraction of its size that still covers `size` (4000x3000 to 32x32: 17 ms
    instead of 136 ms here), then every image is resized bilinearly, torchvision's default.
    A photo is turned upright, as its EXIF orientation says a viewer shows it."""
    if size is not None and opened.size != size:
        opened.draft(mode, size)  # a no-op for other formats, and once called
    img = opened.convert(mode)
    turn = _UPRIGHT.get(_orientation(opened))
    if turn is not None:
        img = img.transpose(turn)
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return img


def _decode(name: str, payload: bytes, size: int | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(payload), formats=IMAGE_FORMATS) as opened:
            if opened.mode in GRAY_MODES:
                mode = "L"
            elif opened.mode in COLOR_MODES:
                mode = "RGB"
            else:
                raise DataError(f"{name}: image mode {opened.mode} is not supported (use L or RGB)")
            img = fit_image(opened, mode, None if size is None else (size, size))
            array = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        # PIL's own message names only the in-memory buffer it read from.
        raise DataError(f"{name}: does not decode as an image (no format PIL reads)") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: does not decode as an image ({exc})") from None
    return array[..., None] if array.ndim == 2 else array


def read(files: Files, image_size: int | None = None) -> RawDataset:
    """Decode every image. Without image_size, every image must share the first one's size."""
    # An archive may hold a name twice (`tar -r` appends a newer copy): the last one counts, as
    # extracting the archive keeps it.
    entries = list({PurePosixPath(n): b for n, b in _entries(files)}.items())
    entries = [(p, b) for p, b in entries if not hidden(p)]
    images = [(p, b) for p, b in entries if b is not None and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        idx = any("-ubyte" in key for key in files)  # MNIST's file names
        hint = ": these are MNIST's IDX files, read with --dataset mnist" if idx else ""
        raise DataError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) found in {', '.join(files)}{hint}")
    drop, has_splits = _layout([p for p, _ in images])
    depth = drop + (2 if has_splits else 1)  # parts before the file name: [wrapper] [split] class

    # Every class folder, including empty ones, so that an empty class is reported, not lost.
    folders: dict[str, set[str]] = {s: set() for s in (SPLITS if has_splits else ("train",))}
    for p, b in entries:
        parts = p.parts[drop:] if b is None else p.parts[drop:-1]
        if len(parts) == depth - drop:
            split = parts[0] if has_splits else "train"
            if split in folders:
                folders[split].add(parts[-1])
    classes = sorted(folders["train"])
    stray = sorted(folders.get("test", set()) - set(folders["train"]))
    if stray:
        raise DataError(f"test classes {stray} have no train folder")

    decoded: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in folders}
    index = {c: i for i, c in enumerate(classes)}
    first_shape = None
    for p, payload in progress(images, "decoding images", unit="img"):
        if len(p.parts) - 1 != depth:
            tops = sorted({q.parts[drop] for q, _ in images if len(q.parts) > drop + 1})
            hint = (
                f" (the top folders are {', '.join(tops)}: the splits read are train/ and test/,"
                " and val is carved out of train: move the others' images into train/)"
                if "train" in tops and not has_splits
                else ""
            )
            layout = f"{'split/' if has_splits else ''}class/image layout"
            raise DataError(f"{p}: expected {layout}{hint}")
        split = p.parts[drop] if has_splits else "train"
        array = _decode(str(p), payload, image_size)  # type: ignore[arg-type]
        if first_shape is None:
            first_shape = array.shape
        elif array.shape[:2] != first_shape[:2]:
            raise DataError(
                f"{p}: image size {array.shape[1]}x{array.shape[0]} differs from "
                f"{first_shape[1]}x{first_shape[0]}; set dataset.image_size to resize them all"
            )
        decoded[split][0].append(array)
        decoded[split][1].append(index[p.parts[-2]])

    for split, names in folders.items():
        counts = np.bincount(decoded[split][1], minlength=len(classes))
        empty = sorted(c for c in names if counts[index[c]] == 0)
        if empty:
            raise DataError(f"{split} class folder(s) {empty} hold no images; remove or fill them")

    # Grayscale images join a colour dataset as RGB; an all-gray dataset keeps 1 channel.
    channels = max(a.shape[2] for imgs, _ in decoded.values() for a in imgs)
    splits = {}
    for split, (imgs, labels) in decoded.items():
        stacked = [np.repeat(a, channels, axis=2) if a.shape[2] != channels else a for a in imgs]
        if stacked:
            splits[split] = Split(np.stack(stacked), np.asarray(labels, dtype=np.int64))
    return RawDataset(classes, splits)


def write(raw: RawDataset, path: Path, suffix: str = ".png") -> Path:
    """Write raw as train|test/<class>/<n><suffix>, into a folder or, for *.tar.gz or *.zip,
    an archive."""
    encoded = []
    for split, data in raw.splits.items():
        for n, (img, label) in enumerate(zip(data.images, data.labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, suffix[1:])
            encoded.append((f"{split}/{raw.classes[label]}/{n:05d}{suffix}", buf.getvalue()))
    if path.name.endswith(TAR_SUFFIXES):
        with tar_gz(path) as tar:
            for name, payload in encoded:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return path
    if path.name.endswith(".zip"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w") as archive:  # stored: PNG and JPEG do not compress
            for name, payload in encoded:
                # The earliest time a zip holds, not now: the same images, the same bytes.
                archive.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), payload)
        return path
    for name, payload in encoded:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(payload)
    return path
