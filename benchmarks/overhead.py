"""Pipeline overhead: the smoke profile's end-to-end wall time minus the time spent in training
epochs, broken down by service start-up (S3, MLflow, model server) and by step.

    python -m benchmarks.overhead [--runs 3]

The first run starts from an empty state dir (data generated and uploaded); the later runs are
what a user sees on a re-run (data steps find their outputs and skip).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import median, positive, write_result
from benchmarks.runs import overhead_row, run_pipeline
from components.deploy import start_server
from pipelines.config import load_config
from pipelines.mlflow_server import LocalMlflow
from pipelines.processes import free_port, terminate
from pipelines.s3server import EmbeddedS3

TARGET_S = 20.0
ARGS = ["--profile", "smoke", "--dataset", "synthetic"]


def service_startups(state: Path) -> dict[str, float]:
    """Seconds from launch to ready of each service, alone (in a run, MLflow's overlaps the
    data steps)."""
    t0 = time.monotonic()
    with EmbeddedS3(state / "s3") as s3:
        s3_s = time.monotonic() - t0
        cfg = load_config("smoke", overrides={"state_dir": str(state)}, environ=s3.env())
        t0 = time.monotonic()
        mlflow = LocalMlflow(cfg, state / "bench-mlflow").start()
        try:
            mlflow.wait()
            mlflow_s = time.monotonic() - t0
        finally:
            mlflow.stop()
        # Where the deploy step put the model (beside it: the server log).
        model_dir = next(p for p in (state / "serving").iterdir() if p.is_dir())
        t0 = time.monotonic()
        proc = start_server(model_dir, model_dir.name, free_port(), cfg, state / "bench.log")
        server_s = time.monotonic() - t0
        terminate(proc)
    return {"s3": s3_s, "mlflow": mlflow_s, "model_server": server_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--runs", type=positive(int), default=3, help="warm runs after the cold one (default: 3)"
    )
    args = parser.parse_args(argv)
    rows, startups = [], []
    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        state = Path(tmp) / "state"
        for i in range(1 + args.runs):
            row = {"run": "cold" if i == 0 else f"warm {i}"}
            row |= overhead_row(run_pipeline(ARGS, state))
            rows.append(row)
            print(row, flush=True)
        for _ in range(3):
            startups.append(service_startups(state))
    warm = [r["overhead_s"] for r in rows[1:]] or [rows[0]["overhead_s"]]
    summary = {
        "overhead_warm_median_s": round(median(warm), 2),
        "overhead_cold_s": rows[0]["overhead_s"],
        "target_s": TARGET_S,
        "startup_median_s": {
            k: round(median([s[k] for s in startups]), 2) for k in ("s3", "mlflow", "model_server")
        },
    }
    path = write_result("pipeline_overhead", rows, summary=summary, args=" ".join(ARGS))
    print(summary, f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
