"""The local driver: runs the steps in order against the embedded (or configured) services."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from components.feature_engineering import engineer_features
from components.verify_data import verify_data
from pipelines.cli import open_store
from pipelines.config import PipelineConfig
from pipelines.errors import PipelineError
from pipelines.storage import ObjectStore

log = logging.getLogger("mlops.local")

Step = Callable[[PipelineConfig, ObjectStore], Any]
STEPS: list[tuple[str, Step]] = [
    ("verify-data", verify_data),
    ("feature-engineering", engineer_features),
]


@dataclass
class StepReport:
    name: str
    status: str = "pending"  # pending | succeeded | failed | skipped
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    status: str = "running"
    failed_step: str | None = None
    error: str | None = None
    exit_code: int = 0
    storage_endpoint: str = ""
    steps: list[StepReport] = field(default_factory=list)
    seconds: float = 0.0

    def result(self, step: str) -> dict[str, Any]:
        return next((s.result for s in self.steps if s.name == step), {})


def run_pipeline(cfg: PipelineConfig) -> RunReport:
    """Run every step; the first failure stops the run and is recorded, not raised."""
    report = RunReport(steps=[StepReport(name) for name, _ in STEPS])
    start = time.monotonic()
    try:
        with open_store(cfg) as (live, store):
            report.storage_endpoint = store.endpoint
            for (name, step), rep in zip(STEPS, report.steps, strict=True):
                log.info("step %s: starting", name)
                t0 = time.monotonic()
                try:
                    rep.result = dataclasses.asdict(step(live, store))
                    rep.status = "succeeded"
                except PipelineError as exc:
                    rep.status, report.failed_step = "failed", name
                    report.error, report.exit_code = str(exc), exc.exit_code
                    break
                finally:
                    rep.seconds = round(time.monotonic() - t0, 2)
                log.info("step %s: succeeded in %.1f s", name, rep.seconds)
    except PipelineError as exc:  # the services themselves failed to start
        report.error, report.exit_code = str(exc), exc.exit_code
    report.seconds = round(time.monotonic() - start, 2)
    report.status = "succeeded" if report.exit_code == 0 else "failed"
    for rep in report.steps:
        if rep.status == "pending":
            rep.status = "skipped"
    return report
