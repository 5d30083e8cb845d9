"""MLflow runs left RUNNING: closed by the train step (REST), or before a local server starts."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("mlops.train_step")

RUN_TAG = "mlops.pipeline_run_id"  # the tag that names a training's pipeline run
TIMEOUT_S = 5.0  # on a failure path: a server that does not answer is left as it is


def _call(uri: str, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One MLflow REST call, with the credentials MLflow's own client reads from the env."""
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    headers = {"Content-Type": "application/json"}
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    elif user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
        return json.loads(resp.read() or b"{}")


def fail_abandoned(uri: str | None, experiment: str, pipeline_run_id: str) -> list[str]:
    """Mark FAILED every MLflow run of this pipeline run still RUNNING once its trainer has
    gone for good: a trainer killed outright (the OOM killer, a SIGKILL) never ends its run,
    which then read RUNNING in the UI forever. Best effort: the step is failing already, so a
    server that cannot be reached is logged, not raised. Returns the runs it closed."""
    if not uri:
        return []
    try:
        name = urllib.parse.quote(experiment)
        found = _call(uri, f"experiments/get-by-name?experiment_name={name}")
        query = {
            "experiment_ids": [found["experiment"]["experiment_id"]],
            "filter": f"tags.`{RUN_TAG}` = '{pipeline_run_id}' and attributes.status = 'RUNNING'",
        }
        runs = [run["info"]["run_id"] for run in _call(uri, "runs/search", query).get("runs", [])]
        for run_id in runs:
            ended = {"run_id": run_id, "status": "FAILED", "end_time": int(time.time() * 1000)}
            _call(uri, "runs/update", ended)
            log.warning("MLflow run %s marked FAILED: its trainer ended without closing it", run_id)
        return runs
    except (OSError, ValueError, KeyError) as exc:  # urllib's errors are OSErrors
        if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
            return []  # no such experiment: the trainer never started a run
        log.warning("could not close the MLflow run of %s at %s: %s", pipeline_run_id, uri, exc)
    return []


def fail_left_running(db: Path) -> list[str]:
    """Mark FAILED the runs that a local MLflow database holds as RUNNING, before its server
    starts, by a process that holds the state dir's lock, so that no trainer can be writing
    one: a run that reads RUNNING was left so by a pipeline run that ended without closing it
    (its driver killed outright, the machine stopped), and read RUNNING in the UI for good.
    Best effort: a database this cannot read is the server's to report."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn, conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
                return []  # made, not yet migrated: no run in it
            runs = [
                r for (r,) in conn.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'")
            ]
            conn.execute(
                "UPDATE runs SET status = 'FAILED', end_time = ? WHERE status = 'RUNNING'",
                (int(time.time() * 1000),),
            )
    except sqlite3.Error as exc:
        log.warning("could not look for MLflow runs left RUNNING in %s: %s", db, exc)
        return []
    for run_id in runs:
        log.warning("MLflow run %s marked FAILED: an earlier run ended without closing it", run_id)
    return runs
