"""Synthetic data with a learnable class signal, in the CIFAR-10, MNIST or ImageFolder format."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data import cifar10, imagefolder, mnist
from data.raw import RawDataset, Split


def generate(
    per_class: int = 200,
    num_classes: int = 10,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> RawDataset:
    """Each class is an oriented grating with its own frequency and colour, under noise and a
    random phase, so a small CNN beats chance by far within an epoch or two."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    colors = rng.uniform(-1, 1, (num_classes, channels)).astype(np.float32)
    colors /= np.abs(colors).max(axis=1, keepdims=True)

    def sample(count: int) -> Split:
        labels = np.repeat(np.arange(num_classes), count)
        rng.shuffle(labels)
        theta = np.pi * labels / num_classes
        freq = 2.0 + labels % 3
        phase = rng.uniform(0, 2 * np.pi, len(labels))
        wave = np.sin(
            2
            * np.pi
            * freq[:, None, None]
            * (xx * np.cos(theta)[:, None, None] + yy * np.sin(theta)[:, None, None])
            + phase[:, None, None]
        )
        amp = rng.uniform(35, 60, len(labels))[:, None, None, None]
        img = 128 + amp * wave[..., None] * colors[labels][:, None, None, :]
        img += rng.normal(0, 20, img.shape)
        return Split(np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64))

    classes = [f"class{c}" for c in range(num_classes)]
    return RawDataset(classes, {"train": sample(per_class), "test": sample(max(1, per_class // 5))})


def write(fmt: str, out: Path, per_class: int = 200, seed: int = 0) -> Path:
    """Generate and write one dataset; imagefolder writes an archive when out ends in .tar.gz or
    .zip."""
    if fmt == "cifar10":
        return cifar10.write(generate(per_class, seed=seed), out)
    if fmt == "mnist":
        return mnist.write(generate(per_class, size=28, channels=1, seed=seed), out)
    return imagefolder.write(generate(per_class, seed=seed), out)


OUTPUTS = {
    "cifar10": "a .tar.gz file",
    "mnist": "a folder (the four IDX files)",
    "imagefolder": "a .tar.gz, a .zip or a folder",
}


def _fits(fmt: str, out: Path) -> bool:
    """Whether `out`'s name says what `fmt` writes there."""
    archive = out.name.endswith((".tar.gz", ".zip"))
    return {"cifar10": out.name.endswith(".tar.gz"), "mnist": not archive}.get(fmt, True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--format",
        choices=["cifar10", "mnist", "imagefolder"],
        default="cifar10",
        help="file format to write",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output: " + "; ".join(f"{f} writes {what}" for f, what in OUTPUTS.items()),
    )
    parser.add_argument(
        "--per-class", type=_at_least(1), default=200, help="train images per class"
    )
    parser.add_argument("--seed", type=_at_least(0), default=0, help="random seed")
    args = parser.parse_args(argv)
    if not _fits(args.format, args.out):
        # It wrote what the format writes under any name: a folder named mn.tar.gz, or a
        # tarball named like a folder.
        parser.error(f"--out {args.out}: {args.format} writes {OUTPUTS[args.format]}")
    try:
        print(write(args.format, args.out, args.per_class, args.seed))
    except OSError as exc:
        parser.error(f"--out {args.out}: cannot write it ({exc.strerror or exc}: {exc.filename})")
    return 0


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)  # argparse names the option of a ValueError
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    parse.__name__ = "integer"  # argparse's word for the value in "invalid integer value"
    return parse


if __name__ == "__main__":
    sys.exit(main())
