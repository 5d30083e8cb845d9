"""Run the whole local pipeline as a user does (`run.py --json`) and return its report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"


def run_pipeline(
    args: list[str], state_dir: Path, timeout_s: float = 7200, root: Path = ROOT
) -> dict[str, Any]:
    """`python pipelines/run.py ARGS --json --state-dir DIR` in the checkout at root; the report
    plus the wall time this process saw (interpreter start-up included, as a user waits)."""
    start = time.monotonic()
    command = f"run.py {' '.join(args)}"
    try:
        proc = subprocess.run(
            [sys.executable, "pipelines/run.py", *args, "--json", "--state-dir", str(state_dir)],
            cwd=root,
            capture_output=True,  # stderr's last line says why, if it fails
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{command} did not finish within {timeout_s:.0f} s") from None
    wall = time.monotonic() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        # The run's own words: its report's error, else its last line on stderr.
        try:
            why = json.loads(lines[-1])["error"]
        except (IndexError, ValueError, KeyError, TypeError):
            why = (proc.stderr.strip().splitlines() or [""])[-1]
        raise SystemExit(f"{command} failed (exit {proc.returncode}): {why}")
    report = json.loads(lines[-1])
    report["wall_s"] = round(wall, 2)
    return report


def step_seconds(report: dict[str, Any]) -> dict[str, float]:
    return {s["name"]: s["seconds"] for s in report["steps"]}


def overhead_row(report: dict[str, Any]) -> dict[str, float]:
    """Wall time, the epochs alone, and the rest (evaluation, checkpoints, tracking, start-ups
    and the other steps count as overhead), then each step's own seconds."""
    epochs_s = round(sum(h["epoch_seconds"] for h in report["train"]["history"]), 2)
    row = {
        "wall_s": report["wall_s"],
        "epochs_s": epochs_s,
        "overhead_s": round(report["wall_s"] - epochs_s, 2),
    }
    return row | {f"{k}_s": v for k, v in step_seconds(report).items()}
