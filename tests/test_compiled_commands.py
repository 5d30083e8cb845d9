"""Each command of the compiled Argo Workflow, run here in DAG order against real local services.

No cluster exists here, so what Argo and Kubernetes would add is stood in for, thinly: the
parameter substitution, the Secret's values, the cluster addresses (rewritten to 127.0.0.1), the
environment the Training Operator injects into a PyTorchJob pod, KServe's API (the deploy
component's call to it is caught: tests/test_cluster_steps.py covers that call) and KServe's
storage initializer. The commands and argument names themselves are the compiled ones, unchanged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

import components.inferenceservice
from components.deploy import DeployResult
from components.deploy import main as deploy_main
from pipelines.argo import build
from pipelines.config import PipelineConfig, load_config
from pipelines.manifests import MODEL_DIR, inference_service, to_dict
from pipelines.processes import free_port, terminate, wait_http_ok
from pipelines.storage import parse_s3_uri
from serving.launch import download_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
WORKFLOW = "image-classifier-smoke1"
PARAMETERS = {"dataset": "synthetic", "epochs": "2", "min-accuracy": "0.1"}


def substitute(text: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return re.sub(r"\{\{([a-z.\-]+)\}\}", one, text)


class Cluster:
    """The stand-ins: workflow parameters, the Secret, and in-cluster addresses."""

    def __init__(self, env: SimpleNamespace, workflow: dict, scratch: Path):
        self.env, self.scratch = env, scratch
        defaults = {p["name"]: p["value"] for p in workflow["spec"]["arguments"]["parameters"]}
        self.values = {f"workflow.parameters.{k}": v for k, v in {**defaults, **PARAMETERS}.items()}
        self.values["workflow.name"] = WORKFLOW
        # The Secrets of the local overlay: its MLflow has no login, so no client Secret.
        self.secrets = {
            env.cfg.cluster.s3_secret: {
                "AWS_ACCESS_KEY_ID": env.s3.access_key,
                "AWS_SECRET_ACCESS_KEY": env.s3.secret_key,
            }
        }

    def environ(self, container: dict) -> dict[str, str]:
        out = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "MLFLOW_"))}
        for var in container.get("env", []):
            if "valueFrom" in var:  # as the kubelet: a missing optional Secret sets nothing
                ref = var["valueFrom"]["secretKeyRef"]
                secret = self.secrets.get(ref["name"])
                assert secret is not None or ref.get("optional"), f"no Secret {ref['name']}"
                if secret is not None:
                    out[var["name"]] = secret[ref["key"]]
            else:
                out[var["name"]] = var["value"]
        # In-cluster addresses become the local servers; /tmp becomes a scratch folder.
        out["MINIO_ENDPOINT"] = self.env.s3.endpoint
        out["MLFLOW_TRACKING_URI"] = self.env.cfg.mlflow.tracking_uri
        out["HOME"] = out["TMPDIR"] = str(self.scratch)
        return out

    def argv(self, argv: list[str]) -> list[str]:
        """As the pod gets it: parameters filled in, /tmp/ in the scratch folder."""
        return [substitute(a, self.values).replace("/tmp/", f"{self.scratch}/") for a in argv]

    def run(self, argv: list[str], container: dict, extra: dict[str, str] | None = None) -> str:
        argv = self.argv(argv)
        assert argv[0] == "python"
        proc = subprocess.run(
            [sys.executable, *argv[1:]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**self.environ(container), **(extra or {})},
        )
        assert proc.returncode == 0, f"{argv}\n{proc.stderr[-3000:]}"
        return proc.stdout


def test_compiled_commands_run_in_dag_order(
    env: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workflow = yaml.safe_load(build(load_config("smoke", environ={})).to_yaml())
    templates = {t["name"]: t for t in workflow["spec"]["templates"]}
    cluster = Cluster(env, workflow, tmp_path)
    result = tmp_path / "result.json"

    def container_step(name: str) -> dict:
        container = templates[name]["container"]
        cluster.run([*container["command"], *container["args"]], container)
        return json.loads(result.read_text())

    assert container_step("verify-data")["uploaded"] >= 0
    features = container_step("feature-engineering")

    # train: the PyTorchJob's Master command, under the variables the operator injects.
    cluster.values["inputs.parameters.processed-uri"] = features["processed_uri"]
    job = yaml.safe_load(substitute(templates["train"]["resource"]["manifest"], cluster.values))
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    port = str(free_port())
    operator_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": "1",
        "RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": port,
        "PET_NNODES": "1",
        "PET_NODE_RANK": "0",
        "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
    }
    cluster.run(master["command"], master, operator_env)

    verified = container_step("verify-model")
    assert verified["passed"] and verified["model_uri"].endswith(f"/{WORKFLOW}/")
    # What the DAG's jsonpath hands deploy: the model the gate left in service.
    assert verified["serving_uri"] == verified["model_uri"]  # the first model is promoted
    # The Master counted its start, which bounds a killed pod's restarts (resume.count_start).
    bucket, prefix = parse_s3_uri(verified["model_uri"])
    assert env.store.read_json(bucket, prefix + "starts.json") == {"starts": 1}
    # And kept its log beside the model: the exit handler of a failed run deletes its pods.
    (log_key,) = [o.key for o in env.store.list(bucket, prefix + "logs/")]
    assert log_key.endswith("-rank0.log")
    assert "epoch 1/2" in env.store.get_bytes(bucket, log_key).decode()
    cluster.values["inputs.parameters.serving-uri"] = verified["serving_uri"]

    # deploy: the component's own CLI with the pod's args and environment, in this process so
    # that its call to KServe's API is caught; what it would apply is then run as KServe would.
    deploy = templates["deploy"]["container"]
    assert deploy["command"] == ["python", "-m", "components.deploy"]
    args = cluster.argv(deploy["args"])
    assert args[args.index("--model-uri") + 1] == verified["serving_uri"]
    applied: list[tuple[PipelineConfig, str]] = []

    def apply(cfg: PipelineConfig, model_uri: str, client: object = None) -> DeployResult:
        applied.append((cfg, model_uri))
        return DeployResult(model_uri, "", "", smoke_images=0, smoke_agreement=0.0, serving=True)

    pod_env = cluster.environ(deploy)
    with monkeypatch.context() as patch:
        patch.setattr(components.inferenceservice, "apply_inference_service", apply)
        for var in set(os.environ) - set(pod_env):
            patch.delenv(var)
        for var, value in pod_env.items():
            patch.setenv(var, value)
        patch.chdir(ROOT)
        assert deploy_main(args) == 0
    ((pod_cfg, model_uri),) = applied  # the pod's config took the cluster path
    assert pod_cfg.runtime == "kubernetes" and model_uri == verified["serving_uri"]
    assert json.loads(result.read_text())["model_dir"] == model_uri  # the result parameter
    # The InferenceService it would apply: KServe's storage initializer, then the predictor's
    # own command and args.
    isvc = to_dict(inference_service(pod_cfg, model_uri))
    # The form's model name is empty (unset): every pod named the model after the dataset.
    assert cluster.values["workflow.parameters.model-name"] == ""
    name = f"{cluster.values['workflow.parameters.dataset']}-resnet18"
    assert isvc["metadata"]["name"] == name and f"/{name}/{WORKFLOW}/" in model_uri
    predictor = isvc["spec"]["predictor"]["containers"][0]
    storage_uri = next(e["value"] for e in predictor["env"] if e["name"] == "STORAGE_URI")
    model_dir = download_model(env.store, storage_uri, tmp_path / "mnt-models")
    http_port = str(free_port())
    args = [model_dir.as_posix() if a == MODEL_DIR else a for a in predictor["args"]]
    args = ["127.0.0.1" if a == "0.0.0.0" else a for a in args]  # never listen beyond loopback
    args[args.index("--http_port") + 1] = http_port
    argv = [sys.executable, *predictor["command"][1:], *args]
    server = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=cluster.environ(predictor),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The pod's probes, against the compiled command's server: ready once it serves.
        probes = {p: predictor[p]["httpGet"] for p in ("readinessProbe", "livenessProbe")}
        pod_port = int(predictor["args"][predictor["args"].index("--http_port") + 1])
        assert {g["port"] for g in probes.values()} == {pod_port}
        ready = f"http://127.0.0.1:{http_port}{probes['readinessProbe']['path']}"
        wait_http_ok(ready, 60, server, "the compiled predictor command", "see its output")
        live = f"http://127.0.0.1:{http_port}{probes['livenessProbe']['path']}"
        assert requests.get(live, timeout=10).status_code == 200
        assert requests.get(ready.replace(name, "other"), timeout=10).status_code != 200
    finally:
        terminate(server)

    handler = templates["report"]["container"]
    cluster.values["workflow.status"], cluster.values["workflow.failures"] = "Succeeded", "[]"
    out = cluster.run([*handler["command"], *handler["args"]], handler)
    assert json.loads(out)["status"] == "Succeeded"
