"""The step table and the runtime wrapper every driver calls: one record per step, written last."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig, config_from_json, mlflow_env
from pipelines.console import setup_logging
from pipelines.errors import (
    PipelineError,
    expected,
    raise_on_sigterm,
    redeliver_interrupts,
    stopped_by,
)
from pipelines.storage import ObjectStore

log = logging.getLogger("mlops.steps")

StepFn = Callable[[PipelineConfig, ObjectStore, dict[str, Any]], Any]


def _verify_data(cfg: PipelineConfig, store: ObjectStore, _: dict[str, Any]) -> Any:
    from components.verify_data import verify_data

    return verify_data(cfg, store)


def _features(cfg: PipelineConfig, store: ObjectStore, _: dict[str, Any]) -> Any:
    from components.feature_engineering import engineer_features

    return engineer_features(cfg, store)


def _train(cfg: PipelineConfig, store: ObjectStore, inputs: dict[str, Any]) -> Any:
    from components.train import train_model

    return train_model(cfg, store, inputs["processed_uri"], inputs["run_id"])


def _verify_model(cfg: PipelineConfig, store: ObjectStore, inputs: dict[str, Any]) -> Any:
    from components.verify_model import verify_model

    return verify_model(cfg, store, inputs["model_uri"])


def _deploy(cfg: PipelineConfig, store: ObjectStore, inputs: dict[str, Any]) -> Any:
    from components.deploy import deploy

    return deploy(cfg, store, inputs["model_uri"], inputs["serve"])


# The pipeline, in order. Imports stay inside each step so a step's process loads only its own.
STEPS: dict[str, StepFn] = {
    "verify-data": _verify_data,
    "feature-engineering": _features,
    "train": _train,
    "verify-model": _verify_model,
    "deploy": _deploy,
}


def record_path(run_dir: str | Path, step: str) -> Path:
    return Path(run_dir) / "steps" / f"{step}.json"


def run_step(step: str, config: str, run_dir: str, **inputs: Any) -> dict[str, Any]:
    """Run one step from its pipeline parameters; record the outcome for the driver's report.

    An expected failure is recorded with its message and ends the process with its exit code,
    so that KFP (or Argo) marks the task failed."""
    setup_logging()
    redeliver_interrupts()
    raise_on_sigterm()  # as a stopped run, or a deleted pod, sends it
    record: dict[str, Any] = {"name": step, "status": "running", "inputs": inputs}
    start = time.monotonic()
    try:
        cfg = config_from_json(config)
        # Before the step imports mlflow, which reads it then; torchrun's workers inherit it.
        os.environ.update(mlflow_env(cfg.mlflow))
        result = STEPS[step](cfg, ObjectStore(cfg.storage), inputs)
        record |= {"status": "succeeded", "result": dataclasses.asdict(result)}
    except (PipelineError, OSError) as exc:
        if (error := expected(exc)) is None:
            raise
        record |= {"status": "failed", "error": str(error), "exit_code": error.exit_code}
    except KeyboardInterrupt as exc:  # Ctrl-C reaches every step process: one line, no traceback
        code, word = stopped_by(exc)
        record |= {"status": "failed", "error": word, "exit_code": code}
    record["seconds"] = round(time.monotonic() - start, 2)
    path = record_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(json.dumps(record))
    part.replace(path)
    # The step is over and its process ends next: keep what it imported (torch and mlflow are
    # millions of objects) out of the collections the interpreter runs as it exits, which took
    # about 0.8 s of each step's exit.
    gc.freeze()
    if record["status"] == "failed":
        print(f"error: {record['error']}", file=sys.stderr)
        raise SystemExit(record["exit_code"])
    return record["result"]
