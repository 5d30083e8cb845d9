"""The local driver: runs the steps in order against the embedded (or configured) services."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from components.deploy import deploy
from components.feature_engineering import engineer_features
from components.train import new_run_id, train_model
from components.verify_data import verify_data
from components.verify_model import verify_model
from pipelines.cli import open_store
from pipelines.config import PipelineConfig
from pipelines.errors import PipelineError
from pipelines.mlflow_server import LocalMlflow, with_tracking
from pipelines.storage import ObjectStore

log = logging.getLogger("mlops.local")

# Each step reads what it needs from the outputs of the steps before it.
Step = Callable[[PipelineConfig, ObjectStore, dict[str, Any]], Any]
STEPS: list[tuple[str, Step]] = [
    ("verify-data", lambda cfg, store, _: verify_data(cfg, store)),
    ("feature-engineering", lambda cfg, store, _: engineer_features(cfg, store)),
    (
        "train",
        lambda cfg, store, out: train_model(
            cfg, store, out["feature-engineering"]["processed_uri"], out["run_id"]
        ),
    ),
    ("verify-model", lambda cfg, store, out: verify_model(cfg, store, out["train"]["model_uri"])),
    ("deploy", lambda cfg, store, out: deploy(cfg, store, out["train"]["model_uri"], out["serve"])),
]


@dataclass
class StepReport:
    name: str
    status: str = "pending"  # pending | succeeded | failed | skipped
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    run_id: str = ""
    status: str = "running"
    failed_step: str | None = None
    error: str | None = None
    exit_code: int = 0
    storage_endpoint: str = ""
    tracking_uri: str = ""
    steps: list[StepReport] = field(default_factory=list)
    seconds: float = 0.0

    def result(self, step: str) -> dict[str, Any]:
        return next((s.result for s in self.steps if s.name == step), {})


def run_pipeline(cfg: PipelineConfig, serve: bool = False) -> RunReport:
    """Run every step; the first failure stops the run and is recorded, not raised."""
    report = RunReport(run_id=new_run_id(), steps=[StepReport(name) for name, _ in STEPS])
    start = time.monotonic()
    mlflow_server: LocalMlflow | None = None
    try:
        with open_store(cfg) as (with_store, store):
            report.storage_endpoint = store.endpoint
            store.ensure_buckets()
            live = with_store
            if not live.mlflow.tracking_uri:
                # It needs ~12 s to become healthy: start it now, wait for it before training.
                mlflow_server = LocalMlflow(live, live.state_dir / "mlflow").start()
            outputs: dict[str, Any] = {"run_id": report.run_id, "serve": serve}
            for (name, step), rep in zip(STEPS, report.steps, strict=True):
                if name == "train" and mlflow_server is not None:
                    live = with_tracking(live, mlflow_server.wait())
                report.tracking_uri = live.mlflow.tracking_uri or ""
                log.info("step %s: starting", name)
                t0 = time.monotonic()
                try:
                    rep.result = dataclasses.asdict(step(live, store, outputs))
                    rep.status = "succeeded"
                    outputs[name] = rep.result
                except PipelineError as exc:
                    rep.status, report.failed_step = "failed", name
                    report.error, report.exit_code = str(exc), exc.exit_code
                    break
                finally:
                    rep.seconds = round(time.monotonic() - t0, 2)
                log.info("step %s: succeeded in %.1f s", name, rep.seconds)
    except PipelineError as exc:  # a service failed to start
        report.error, report.exit_code = str(exc), exc.exit_code
    finally:
        if mlflow_server is not None:
            mlflow_server.stop()
    report.seconds = round(time.monotonic() - start, 2)
    report.status = "succeeded" if report.exit_code == 0 else "failed"
    for rep in report.steps:
        if rep.status == "pending":
            rep.status = "skipped"
    return report
