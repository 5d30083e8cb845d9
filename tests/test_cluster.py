"""On a real cluster set up as in README "Run on Kubernetes": deselected by default.

    ARGO_SERVER=https://localhost:2746 ARGO_TOKEN=... ARGO_INSECURE_SKIP_VERIFY=true \
        .venv/bin/python -m pytest -m cluster

Each test skips, saying why, when kubectl has no reachable cluster or the Argo Server is unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.config import load_config

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
KUBECTL = os.environ.get("KUBECTL", str(Path(sys.executable).parent / "kubectl"))
NAMESPACE = load_config(environ={}).cluster.namespace
WAIT_S = 45 * 60


def kubectl(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBECTL, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    if kubectl("version", "--request-timeout=5s", timeout=30).returncode != 0:
        pytest.skip("no Kubernetes cluster reachable through kubectl")


def run_py(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "pipelines/run.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_overlay_is_accepted_by_the_api_server() -> None:
    out = kubectl("apply", "--dry-run=server", "-k", str(ROOT / "infrastructure/overlays/local"))
    assert out.returncode == 0, out.stderr


def test_upstream_crds_are_installed() -> None:
    for crd in (
        "workflows.argoproj.io",
        "pytorchjobs.kubeflow.org",
        "inferenceservices.serving.kserve.io",
    ):
        assert kubectl("get", "crd", crd).returncode == 0, f"{crd}: run make upstream"


def test_smoke_pipeline_succeeds_through_argo() -> None:
    if not os.environ.get("ARGO_SERVER"):
        pytest.skip("ARGO_SERVER is unset (see README: Run on Kubernetes)")
    submitted = run_py("submit", "--profile", "smoke", "--dataset", "synthetic")
    assert submitted.returncode == 0, submitted.stderr
    name = submitted.stdout.split()[1]  # "submitted NAME ..."
    deadline = time.monotonic() + WAIT_S
    phase = "Pending"
    while time.monotonic() < deadline and phase in ("Pending", "Running", ""):
        time.sleep(20)
        status = run_py("status", name)  # "NAME: PHASE [message]", then one line per step
        assert status.returncode in (0, 1), status.stderr
        phase = status.stdout.split()[1]
    assert phase == "Succeeded", run_py("logs", name).stdout[-4000:]
    isvc = kubectl("-n", NAMESPACE, "get", "inferenceservice", "-o", "json")
    ready = [
        c
        for item in json.loads(isvc.stdout)["items"]
        for c in item["status"]["conditions"]
        if c["type"] == "Ready"
    ]
    assert ready and ready[0]["status"] == "True"
