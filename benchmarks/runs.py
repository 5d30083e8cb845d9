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


def run_pipeline(args: list[str], state_dir: Path, timeout_s: float = 7200) -> dict[str, Any]:
    """`python pipelines/run.py ARGS --json --state-dir DIR`; the report plus the wall time
    this process saw (interpreter start-up included, as a user waits for it)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "pipelines/run.py", *args, "--json", "--state-dir", str(state_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    wall = time.monotonic() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"run.py {' '.join(args)} failed (exit {proc.returncode})")
    report = json.loads(lines[-1])
    report["wall_s"] = round(wall, 2)
    return report


def step_seconds(report: dict[str, Any]) -> dict[str, float]:
    return {s["name"]: s["seconds"] for s in report["steps"]}
