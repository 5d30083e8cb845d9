"""The cluster path, checked statically: golden files, Hera round trips, SDK models, security."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hera.workflows import Workflow, WorkflowTemplate
from kserve import ApiClient as KServeApiClient
from kubeflow.training import ApiClient as TrainingApiClient

from pipelines.argo import PARAMETERS
from pipelines.compile import write_all
from pipelines.config import load_config, mlflow_env
from pipelines.steps import STEPS

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "pipelines" / "compiled"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compiled")
    write_all(load_config(environ={}), out)
    return out


def load(folder: Path, name: str) -> dict[str, Any]:
    return yaml.safe_load((folder / name).read_text())


def test_golden_files_are_current(compiled: Path) -> None:
    names = sorted(p.name for p in GOLDEN.iterdir())
    assert names == sorted(p.name for p in compiled.iterdir())
    for name in names:
        assert (compiled / name).read_text() == (GOLDEN / name).read_text(), (
            f"{name} is stale: run `make compile` and commit pipelines/compiled/"
        )


@pytest.mark.parametrize(
    ("name", "cls"),
    [("argo-workflow.yaml", Workflow), ("argo-workflowtemplate.yaml", WorkflowTemplate)],
)
def test_workflows_round_trip_through_hera(compiled: Path, name: str, cls: type) -> None:
    text = (compiled / name).read_text()
    assert cls.from_yaml(text).to_dict() == yaml.safe_load(text)


def test_workflow_key_fields(compiled: Path) -> None:
    wf = load(compiled, "argo-workflow.yaml")
    spec = wf["spec"]
    assert wf["kind"] == "Workflow" and wf["metadata"]["generateName"] == "image-classifier-"
    assert spec["entrypoint"] == "pipeline" and spec["onExit"] == "exit-handler"
    assert spec["serviceAccountName"] == "mlops-pipeline" and spec["activeDeadlineSeconds"] > 0
    # The label `list` selects on, on every workflow: one the Argo UI makes of the template
    # takes none of the template's own labels, only spec.workflowMetadata's.
    for name in ("argo-workflow.yaml", "argo-workflowtemplate.yaml"):
        labels = load(compiled, name)["spec"]["workflowMetadata"]["labels"]
        assert labels == {"app.kubernetes.io/part-of": "mlops-pipeline"}
    templates = {t["name"]: t for t in spec["templates"]}
    dag = {t["name"]: t for t in templates["pipeline"]["dag"]["tasks"]}
    assert list(dag) == list(STEPS)
    for before, after in itertools.pairwise(STEPS):
        assert dag[after]["depends"] == before
    params = {p["name"]: p for p in spec["arguments"]["parameters"]}
    assert set(params) == {
        "dataset",
        "epochs",
        "batch-size",
        "lr",
        "precision",
        "min-accuracy",
        "model-name",
    }
    assert params["dataset"]["enum"] == ["cifar10", "mnist", "imagefolder", "synthetic"]
    assert params["precision"]["enum"] == ["auto", "fp32", "bf16", "fp16"]
    assert all(p.get("description") for p in params.values())

    cluster = load_config(environ={}).cluster
    train = templates["train"]["resource"]
    assert train["action"] == "create" and train["setOwnerReference"] is True
    assert train["successCondition"] == "status.replicaStatuses.Master.succeeded > 0"
    # Counted only because a failed replica stays Failed under the ExitCode policy.
    assert train["failureCondition"] == "status.replicaStatuses.Master.failed > 0"
    # A retry's backoff sets no maxDuration, which Argo counts from the first attempt and
    # which would end a retried deploy's pod before its cluster.ready_s wait.
    for name in ("verify-data", "feature-engineering", "verify-model", "deploy"):
        assert "maxDuration" not in templates[name]["retryStrategy"]["backoff"], name
    assert templates["train"]["activeDeadlineSeconds"] == cluster.active_deadline_s
    job = yaml.safe_load(train["manifest"])
    assert job["kind"] == "PyTorchJob"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "ExitCode"
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert pod["metadata"]["labels"]["workflows.argoproj.io/workflow"] == "{{workflow.name}}"
    # A workflow that did not succeed deletes its job on exit: it would train on otherwise.
    assert [s[0]["name"] for s in templates["exit-handler"]["steps"]] == ["stop-training", "report"]
    assert templates["exit-handler"]["steps"][0][0]["when"] == "{{workflow.status}} != Succeeded"
    stop = templates["stop-training"]["resource"]
    assert stop["action"] == "delete"
    assert yaml.safe_load(stop["manifest"])["metadata"]["name"] == job["metadata"]["name"]
    # torchrun exits 1 for a kill too: the wrapper's 137 and 143 are what ExitCode restarts.
    assert pod["spec"]["containers"][0]["command"][:3] == ["python", "-m", "training.torchrun"]

    # Deploy serves what the gate chose, through the KFP path's component: it applies the
    # InferenceService with KServeClient and waits for the generation it wrote.
    deploy = templates["deploy"]
    assert "resource" not in deploy
    assert deploy["container"]["command"] == ["python", "-m", "components.deploy"]
    args = deploy["container"]["args"]
    assert args[args.index("--model-uri") + 1] == "{{inputs.parameters.serving-uri}}"
    assert args[-2:] == ["--result", "/tmp/result.json"]
    sets = _sets(args)
    assert sets["runtime"] == '"kubernetes"'  # the component's cluster path, not a local server
    assert sets["serving.model_name"] == "{{workflow.parameters.model-name}}"
    assert deploy["outputs"]["parameters"] == [
        {"name": "result", "valueFrom": {"path": "/tmp/result.json"}}
    ]
    assert deploy["inputs"]["parameters"] == [{"name": "serving-uri"}]
    (serving_uri,) = dag["deploy"]["arguments"]["parameters"]
    assert serving_uri == {
        "name": "serving-uri",
        "value": "{{=jsonpath(tasks['verify-model'].outputs.parameters.result, '$.serving_uri')}}",
    }
    # No step's container gets a token but deploy's, whose KServeClient reads it, under an
    # account that may apply InferenceServices only; Argo's executor has its own.
    assert spec["automountServiceAccountToken"] is False
    assert spec["executor"] == {"serviceAccountName": cluster.executor_service_account}
    assert deploy["automountServiceAccountToken"] is True
    assert deploy["serviceAccountName"] == cluster.deploy_service_account
    accounts = {"automountServiceAccountToken", "serviceAccountName"}
    assert not any(accounts & t.keys() for t in templates.values() if t is not deploy)

    # A config error (exit 2) fails the same way again, as does an error the step marks final
    # in its termination message (a gate missed): only other failures are retried.
    for name in ("verify-data", "feature-engineering", "verify-model", "deploy"):
        retry = templates[name]["retryStrategy"]
        assert retry["limit"] == cluster.retries
        assert retry["expression"] == (
            "asInt(lastRetry.exitCode) != 2 && !(lastRetry.message matches 'no-retry:')"
        )
    assert "retryStrategy" not in templates["train"]  # a second create of one name fails
    assert "--set" in templates["verify-data"]["container"]["args"]


def _sets(args: list[str]) -> dict[str, str]:
    pairs = [args[i + 1].partition("=") for i, a in enumerate(args) if a == "--set"]
    assert len({k for k, _, _ in pairs}) == len(pairs), "a key set twice"
    return {k: v for k, _, v in pairs}


def test_every_pod_resolves_the_compiled_config(tmp_path: Path) -> None:
    """A non-parameter --set reaches each step's args and the trainer's command; the UI
    parameters stay placeholders, even where the compiler set them too."""
    cfg = load_config(
        overrides={"train.label_smoothing": 0, "dataset.id": "pets", "train.epochs": 3},
        environ={},
    )
    write_all(cfg, tmp_path)
    wanted = {"train.label_smoothing": "0.0", "dataset.id": '"pets"'}
    placeholders = {dotted: f"{{{{workflow.parameters.{name}}}}}" for name, dotted in PARAMETERS}
    for name in ("argo-workflow.yaml", "argo-workflowtemplate.yaml"):
        templates = {t["name"]: t for t in load(tmp_path, name)["spec"]["templates"]}
        commands = {
            n: t["container"]["args"]
            for n, t in templates.items()
            if "container" in t and n != "report"
        }
        job = yaml.safe_load(templates["train"]["resource"]["manifest"])
        for kind, spec in job["spec"]["pytorchReplicaSpecs"].items():
            commands[f"train/{kind}"] = spec["template"]["spec"]["containers"][0]["command"]
        assert len(commands) == 5, list(commands)
        for where, args in commands.items():
            sets = _sets(args)
            assert wanted.items() <= sets.items(), (name, where)
            assert sets["runtime"] == '"kubernetes"', (name, where)  # every pod is on the cluster
            assert placeholders.items() <= sets.items(), (name, where)
    standalone = load(tmp_path, "pytorchjob.yaml")["spec"]["pytorchReplicaSpecs"]["Master"]
    sets = _sets(standalone["template"]["spec"]["containers"][0]["command"])
    assert wanted.items() <= sets.items() and sets["train.epochs"] == "3"
    assert sets["runtime"] == '"kubernetes"'  # its pods are on the cluster too


def test_the_forms_model_name_follows_the_dataset_it_submits(compiled: Path) -> None:
    """The form's model name is empty (unset), so a dataset chosen in the form names the
    model in every pod alike: the trainer writes where verify-model reads, and the gate
    meets this dataset's champion. With the name filled in, that name is used."""
    import argparse

    from components.verify_model import _model_uri
    from pipelines.cli import parse_set
    from training.resume import model_uri

    spec = load(compiled, "argo-workflow.yaml")["spec"]
    form = {p["name"]: p["value"] for p in spec["arguments"]["parameters"]}
    assert form["model-name"] == ""
    templates = {t["name"]: t for t in spec["templates"]}
    job = yaml.safe_load(templates["train"]["resource"]["manifest"])
    trainer = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]

    for chosen, name in (("", "mnist-resnet18"), ("digits", "digits")):
        values = {**form, "dataset": "mnist", "model-name": chosen}
        swaps = {f"{{{{workflow.parameters.{k}}}}}": v for k, v in values.items()}
        swaps["{{workflow.name}}"] = "image-classifier-x1"

        def submitted(args: list[str], swaps: dict[str, str] = swaps) -> list[str]:
            for placeholder, value in swaps.items():  # Argo's substitution at submission
                args = [a.replace(placeholder, value) for a in args]
            return args

        def config(args: list[str]) -> Any:
            sets = parse_set([args[i + 1] for i, a in enumerate(args) if a == "--set"])
            return load_config(args[args.index("--profile") + 1], overrides=sets, environ={})

        verify = submitted(templates["verify-model"]["container"]["args"])
        run_id = verify[verify.index("--run-id") + 1]
        read = _model_uri(config(verify), argparse.Namespace(model_uri=None, run_id=run_id))
        written = model_uri(config(submitted(trainer["command"])), "image-classifier-x1")
        assert read == written == f"s3://models/{name}/{run_id}/"


def _sdk_round_trip(client: Any, doc: dict, klass: str) -> dict:
    class Response:
        data = json.dumps(doc)

    return client.sanitize_for_serialization(client.deserialize(Response(), klass))


def test_pytorchjob_and_inferenceservice_parse_through_the_sdk_models(
    compiled, monkeypatch
) -> None:
    """Fields the SDK models do not know would be dropped, so a round trip finds misspellings."""
    # kserve's client resolves class names in kserve.models only, which lacks the core types
    # (V1ObjectMeta, V1Container, ...) its own models refer to: lend it kubernetes's.
    import kserve.models
    import kubernetes.client.models

    for name in dir(kubernetes.client.models):
        if name.startswith("V1") and not hasattr(kserve.models, name):
            monkeypatch.setattr(
                kserve.models, name, getattr(kubernetes.client.models, name), raising=False
            )
    job = load(compiled, "pytorchjob.yaml")
    assert _sdk_round_trip(TrainingApiClient(), job, "KubeflowOrgV1PyTorchJob") == job
    isvc = load(compiled, "inferenceservice.yaml")
    assert _sdk_round_trip(KServeApiClient(), isvc, "V1beta1InferenceService") == isvc
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"]["value"].startswith("s3://models/")
    # Neither the trainer nor the model server calls the Kubernetes API: no token in their pods.
    pods = [pod for doc in (job, isvc) for _, pod in _pods(doc)]
    assert all(pod["automountServiceAccountToken"] is False for pod in pods)


def test_workers_shape_the_replicas(tmp_path: Path) -> None:
    write_all(
        load_config(overrides={"train.workers": 3, "train.nproc_per_node": 2}, environ={}), tmp_path
    )
    job = load(tmp_path, "pytorchjob.yaml")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    assert {s["restartPolicy"] for s in specs.values()} == {"ExitCode"}
    assert job["spec"]["nprocPerNode"] == "2"
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3


def _containers(compiled: Path) -> list[tuple[str, dict, dict]]:
    """(where, container, pod security context) for every container the path runs."""
    found = []
    wf = load(compiled, "argo-workflow.yaml")
    for t in wf["spec"]["templates"]:
        if "container" in t:
            found.append((t["name"], t["container"], wf["spec"]["securityContext"]))
        if "resource" in t and t["resource"]["action"] == "create":  # not the exit's delete
            inner = yaml.safe_load(t["resource"]["manifest"])
            found += [
                (f"{t['name']}/{k}", c, pod["securityContext"])
                for k, pod in _pods(inner)
                for c in pod["containers"]
            ]
    for name in ("pytorchjob.yaml", "inferenceservice.yaml"):
        doc = load(compiled, name)
        found += [
            (f"{name}/{k}", c, pod["securityContext"])
            for k, pod in _pods(doc)
            for c in pod["containers"]
        ]
    return found


def _pods(doc: dict) -> list[tuple[str, dict]]:
    if doc["kind"] == "PyTorchJob":
        return [(k, r["template"]["spec"]) for k, r in doc["spec"]["pytorchReplicaSpecs"].items()]
    return [("predictor", doc["spec"]["predictor"])]


def test_every_container_is_restricted_resourced_and_pinned(compiled: Path) -> None:
    containers = _containers(compiled)
    assert len(containers) >= 8
    for where, container, pod in containers:
        image = container["image"]
        assert ":" in image and not image.endswith(":latest"), where
        limits = container["resources"]["limits"]
        assert limits["cpu"] and limits["memory"], where
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["runAsNonRoot"] is True, where


def test_no_credentials_in_generated_files(compiled: Path) -> None:
    for path in compiled.iterdir():
        text = path.read_text()
        assert ("minio" + "admin") not in text, path.name
        # KFP's platform config names the Secret's keys; anything else would be a value.
        named = set(re.findall(r"secretKey:\s*(\S+)", text))
        assert named <= {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        }, path.name
    job = load(compiled, "pytorchjob.yaml")
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    keys = {e["name"]: e for e in env}
    assert (
        "value" not in keys["MINIO_SECRET_KEY"]
        and "secretKeyRef" in keys["MINIO_SECRET_KEY"]["valueFrom"]
    )


def test_every_pod_that_imports_mlflow_turns_its_telemetry_off(compiled: Path) -> None:
    """MLflow reports usage to its vendor by default; a pipeline pod calls out only if asked."""
    off = {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"}
    # The steps and the trainer (`python -m ...`); not the model server or the exit handler
    # (`python -c`), which never import it.
    pods = [
        (w, c)
        for w, c, _ in _containers(compiled)
        if c["command"][1] == "-m" and c["command"][2] != "serving"
    ]
    # Argo's 4 steps and its PyTorchJob's Master, and the standalone PyTorchJob's Master.
    assert len(pods) == 6, [w for w, _ in pods]
    for where, container in pods:
        assert off in container["env"], where
    # KFP's steps take it from the config parameter at run time (run_step): see test_train.
    opted_in = load_config(overrides={"mlflow.telemetry": "true"}, environ={})
    assert mlflow_env(opted_in.mlflow) == {"MLFLOW_DISABLE_TELEMETRY": "false"}


def test_a_failed_worker_fails_the_train_step_as_a_failed_master_does() -> None:
    """With Workers, a failed one fails the job and the operator deletes the running Master
    without counting it failed: the step watched the Master only and waited for its deadline."""
    from pipelines.argo import build

    workflow = build(load_config(overrides={"train": {"workers": 3}}, environ={})).to_dict()
    train = next(t for t in workflow["spec"]["templates"] if t["name"] == "train")["resource"]
    assert train["failureCondition"] == (
        "status.replicaStatuses.Master.failed > 0,status.replicaStatuses.Worker.failed > 0"
    )
    assert (
        yaml.safe_load(train["manifest"])["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    )
