"""Time to accuracy: the whole pipeline, per profile, on the real CIFAR-10 training images.

    python -m benchmarks.time_to_accuracy [--profiles quick,full]

Each profile runs `python pipelines/run.py --profile P` from an empty state dir, as a new user
would: S3 and MLflow start-up, upload and verification, features, training, the gate and the
deploy are all inside the wall time. The shared archive has no test split, so val (5,000) and
test (5,000) are both held out of its 50,000 images. The curve is val accuracy (one view) after
each epoch against the training program's elapsed time; the final figures use the profile's
evaluation (flip TTA where it is on).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    ROOT,
    git_commit,
    machine,
    median,
    profile_list,
    recipe,
    write_result,
)
from benchmarks.runs import SHARED_CIFAR, run_pipeline, step_seconds
from pipelines.config import load_config

PLOT = ROOT / "docs" / "time_to_accuracy.png"
TARGETS = {"quick": (0.85, 600.0), "full": (0.90, 3600.0)}  # (accuracy, whole-pipeline seconds)


def curve(report: dict[str, Any]) -> list[tuple[float, float]]:
    """(seconds since training started, val accuracy) after each validated epoch."""
    history = report["train"]["history"]
    elapsed = itertools.accumulate(h["epoch_seconds"] for h in history)
    return [
        (round(t, 1), h["val_accuracy"])
        for t, h in zip(elapsed, history, strict=True)
        if "val_accuracy" in h
    ]


def plot(curves: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for profile, points in curves.items():
        ax.plot([t / 60 for t, _ in points], [a * 100 for _, a in points], "o-", label=profile)
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("val accuracy (%), one view")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--profiles",
        type=profile_list,
        default="quick,full",
        help="comma-separated (default: quick,full)",
    )
    args = parser.parse_args(argv)
    if not SHARED_CIFAR.exists():
        print(f"skipped: {SHARED_CIFAR} is absent (the real images this measures)")
        return 0
    rows, curves = [], {}
    for profile in args.profiles:
        with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
            report = run_pipeline(
                ["--profile", profile, "--dataset", "imagefolder", "--data", str(SHARED_CIFAR)],
                Path(tmp) / "state",
            )
        tc = load_config(profile, environ={}).train
        history = report["train"]["history"]
        precision = report["train"]["precision"]  # what auto resolved to
        accuracy, budget = TARGETS.get(profile, (None, None))
        rows.append(
            {
                "profile": profile,
                # A run of one profile keeps the other's row, so each row says when it ran.
                "measured": f"{datetime.now(UTC):%Y-%m-%d}, {git_commit()}",
                # And where: the file's own machine is the last run's, and hosts here differ
                # about twofold in pace.
                "machine": machine(),
                "recipe": recipe(tc, precision),
                "wall_s": report["wall_s"],
                "train_s": report["train"]["seconds"],
                # The machine's pace, so that runs on hosts of different speed can be compared.
                "train_images_per_s": round(median([h["images_per_s"] for h in history]), 1),
                "beyond_epochs_s": round(
                    report["wall_s"] - sum(h["epoch_seconds"] for h in history), 2
                ),
                "val_accuracy": report["metrics"]["val_accuracy"],
                "test_accuracy": report["metrics"]["test_accuracy"],
                "target": f">= {accuracy:.0%} in <= {budget / 60:.0f} min" if accuracy else "",
                "met": bool(accuracy)
                and report["metrics"]["test_accuracy"] >= accuracy
                and report["wall_s"] <= budget,
                "steps_s": step_seconds(report),
            }
        )
        curves[profile] = curve(report)
        print(rows[-1], flush=True)
        # Saved as each profile ends: a later one that fails (full takes an hour) loses none.
        print(f"{save(rows, curves)}\n{PLOT}")
    return 0


def save(rows: list[dict[str, Any]], curves: dict[str, Any]) -> Path:
    """These rows, and the last figures of the profiles not run now."""
    previous = RESULTS / "time_to_accuracy.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        # A row from before rows named their machine ran on the file's.
        kept = [
            {"machine": old["machine"]} | r for r in old["figures"] if r["profile"] not in curves
        ]
        rows = kept + rows
        curves = {p: c for p, c in old.get("curves", {}).items() if p not in curves} | curves
    plot(curves)
    return write_result("time_to_accuracy", rows, curves=curves, data=str(SHARED_CIFAR.name))


if __name__ == "__main__":
    sys.exit(main())
