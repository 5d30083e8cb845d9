"""What every benchmark records beside its figures: the machine, the versions, the commit."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.config import PROFILES, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "torchvision", "mlflow", "kserve", "kfp", "hera", "minio", "nanio")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# What the benchmarks rewrite as they go: not a change to what they measure.
OUTPUTS = ("benchmarks/results", "docs")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()


@functools.cache
def git_commit() -> str:
    """The commit this process started on (read at import: a commit made during an hour-long
    run named the figures it had not measured), +dirty where the code differed from it (a
    figure of changes not committed yet, an A/B before the commit, named HEAD as though HEAD
    had measured it). The results and docs that a run rewrites do not count: each benchmark
    after the first was marked +dirty by the ones before it."""
    if os.environ.get("GIT_COMMIT"):  # a copy of the tree without .git
        return os.environ["GIT_COMMIT"]
    try:
        head = _git("rev-parse", "--short=7", "HEAD")
        outputs = (f":!{p}" for p in OUTPUTS)
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *outputs)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if changed else head


git_commit()


def _number(
    kind: type[int] | type[float], ok: Callable[[float], bool], words: str
) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} must be {words}")
        return value

    return parse


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a number above 0 (0 rounds, or -1 s, crashed a benchmark later)."""
    return _number(kind, lambda v: v > 0, "above 0")


def non_negative(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: 0 or more."""
    return _number(kind, lambda v: v >= 0, "0 or more")


def profile_list(text: str) -> list[str]:
    """An argparse type: comma-separated profile names, checked before an hour of benchmarks
    (a typo failed only when the accuracy run reached it)."""
    names = text.split(",")
    if unknown := [n for n in names if n not in PROFILES]:
        raise argparse.ArgumentTypeError(
            f"unknown profile {', '.join(unknown)}: choose from {', '.join(PROFILES)}"
        )
    return names


def recipe(tc: TrainConfig, precision: str, epochs: bool = True) -> str:
    """A training recipe in one line, as result rows record it: a row whose recipe is not the
    profile's today is shown as such (benchmarks.report)."""
    length = f"{tc.epochs} epochs, " if epochs else ""
    return (
        f"{tc.stem} stem, {precision}, batch {tc.batch_size}, lr {tc.lr}, {length}label "
        f"smoothing {tc.label_smoothing}, {tc.crop_pad}-pixel crops, "
        # Named only when on, so a record from before the setting still reads as today's.
        f"{f'cutout {tc.cutout}, ' if tc.cutout else ''}"
        f"{'alternating' if tc.alternate_flips else 'random'} flips, flip TTA "
        f"{'on' if tc.flip_tta else 'off'}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_result(name: str, figures: Any, **extra: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "versions": versions(),
        **extra,
        "figures": figures,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
