"""The KFP components' cluster paths: train as a PyTorchJob through TrainingClient, deploy as an
InferenceService through KServeClient.

FakeTrainingClient and FakeKServeClient are mocks of the Kubernetes API (none can run here).
They keep to the calls the steps make; the S3 server holding the train result is real."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from kserve import KServeClient
from kubeflow.training.models import KubeflowOrgV1PyTorchJob

from components.inferenceservice import apply_inference_service
from components.pytorchjob import job_name, run_pytorchjob
from pipelines.config import PipelineConfig
from pipelines.errors import PipelineError, Terminated
from pipelines.manifests import to_dict
from pipelines.storage import ObjectStore
from training.result import RESULT_OBJECT

RESULT = {
    "model_uri": "s3://models/cifar10-resnet18/run-1/",
    "model_sha256": "0" * 64,
    "mlflow_run_id": "abc",
    "experiment_id": "1",
    "tracking_uri": "http://mlflow:5000",
    "registered_model": "cifar10-resnet18",
    "version": "1",
    "val_accuracy": 0.9,
    "test_accuracy": 0.89,
    "epochs": 3,
    "resumed_from_epoch": 0,
    "world_size": 2,
    "seconds": 12.5,
}


class FakeTrainingClient:
    """Mock: records the job and ends it with the given condition."""

    def __init__(self, outcome: str, message: str = ""):
        self.outcome, self.message = outcome, message
        self.created: list[tuple[Any, str | None]] = []
        self.deleted: list[tuple[str, str | None]] = []

    def create_job(self, job: Any, namespace: str | None = None) -> None:
        self.created.append((job, namespace))

    def wait_for_job_conditions(self, name: str, **kwargs: Any) -> Any:
        assert kwargs["expected_conditions"] == {"Succeeded", "Failed"}
        cond = SimpleNamespace(type=self.outcome, status="True", message=self.message)
        return SimpleNamespace(status=SimpleNamespace(conditions=[cond]))

    def get_job_logs(self, name: str, **kwargs: Any) -> tuple[dict[str, str], dict]:
        assert kwargs["is_master"] is True
        return {f"{name}-master-0": "epoch 1/3 ..."}, {}

    def delete_job(self, name: str, namespace: str | None = None, **kwargs: Any) -> None:
        self.deleted.append((name, namespace))


class StoppedTrainingClient(FakeTrainingClient):
    """Mock: the step is stopped (a SIGTERM, as KFP's terminate sends) while it waits."""

    def wait_for_job_conditions(self, name: str, **kwargs: Any) -> Any:
        raise Terminated


@pytest.fixture
def store(store: ObjectStore) -> ObjectStore:
    store.ensure_buckets()
    return store


def test_creates_the_job_waits_and_reads_the_result(
    make_cfg: Any, store: ObjectStore, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg: PipelineConfig = make_cfg(train__epochs=4, train__workers=2)
    store.write_json("models", f"cifar10-resnet18/run-1/{RESULT_OBJECT}", RESULT)
    client = FakeTrainingClient("Succeeded")
    result = run_pytorchjob(cfg, store, "s3://processed-data/x/h/", "run-1", client)
    assert result.test_accuracy == 0.89 and result.world_size == 2
    ((job, namespace),) = client.created
    assert isinstance(job, KubeflowOrgV1PyTorchJob) and namespace == cfg.cluster.namespace
    assert job.metadata.name == job_name("run-1") == "run-1-train"
    assert job.spec.pytorch_replica_specs["Worker"].replicas == 1
    # A failed replica stays Failed, so the operator marks the job Failed (not Restarting).
    assert {s.restart_policy for s in job.spec.pytorch_replica_specs.values()} == {"ExitCode"}
    (container,) = job.spec.pytorch_replica_specs["Master"].template.spec.containers
    # The pods resolve the submitter's config: the profile plus what differs from it.
    cmd = container.command
    assert cmd[cmd.index("--profile") + 1] == "smoke"
    sets = {cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"}
    assert {"train.epochs=4", "train.workers=2"} <= sets
    assert not any(s.startswith(("storage.endpoint", "state_dir")) for s in sets)
    assert "epoch 1/3" in capsys.readouterr().err  # the master's log is shown


def test_a_failed_job_fails_the_step_with_its_message(make_cfg: Any, store: ObjectStore) -> None:
    client = FakeTrainingClient("Failed", "pod OOMKilled")
    with pytest.raises(PipelineError, match="failed: pod OOMKilled") as exc:
        run_pytorchjob(make_cfg(), store, "s3://processed-data/x/h/", "run-2", client)
    assert exc.value.exit_code == 1


def test_a_step_stopped_while_it_waits_deletes_its_job(make_cfg: Any, store: ObjectStore) -> None:
    """KFP's job has no owner to go with: a stopped step that left it would leave it training."""
    client = StoppedTrainingClient("Succeeded")
    cfg = make_cfg()
    with pytest.raises(Terminated):
        run_pytorchjob(cfg, store, "s3://processed-data/x/h/", "run-5", client)
    assert client.deleted == [("run-5-train", cfg.cluster.namespace)]


def test_success_without_a_result_is_not_taken_for_a_model(
    make_cfg: Any, store: ObjectStore
) -> None:
    with pytest.raises(PipelineError, match="has no result"):
        run_pytorchjob(
            make_cfg(), store, "s3://processed-data/x/h/", "run-3", FakeTrainingClient("Succeeded")
        )


def test_without_a_cluster_the_message_says_what_is_missing(
    make_cfg: Any, store: ObjectStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(PipelineError, match="needs a Kubernetes API"):
        run_pytorchjob(make_cfg(), store, "s3://processed-data/x/h/", "run-4")


class FakeKServeClient:
    """Mock: an in-memory store of InferenceServices that become Ready, or never do. Like the
    API server, each write bumps metadata.generation and returns the object written."""

    def __init__(self, ready: bool = True):
        self.ready, self.items, self.calls = ready, {}, []
        self.awaited: list[int | None] = []  # the generation each wait asked for

    def get(self, name: str, namespace: str | None = None) -> Any:
        if name not in self.items:
            raise RuntimeError(f"inferenceservices {name!r} not found")
        return self.items[name]

    def _store(self, isvc: Any, version: str) -> dict:
        doc = to_dict(isvc)
        name = doc["metadata"]["name"]
        before = self.items.get(name, {"metadata": {"generation": 0}})
        doc["metadata"]["resourceVersion"] = version
        doc["metadata"]["generation"] = before["metadata"]["generation"] + 1
        doc["status"] = {"address": {"url": f"http://{name}.mlops.svc"}}
        self.items[name] = doc
        return doc

    def create(self, inferenceservice: Any, namespace: str | None = None) -> dict:
        self.calls.append("create")
        return self._store(inferenceservice, "1")

    def replace(self, name: str, inferenceservice: Any, namespace: str | None = None) -> dict:
        self.calls.append("replace")
        assert (
            inferenceservice.metadata.resource_version
            == self.items[name]["metadata"]["resourceVersion"]
        )  # an update must name the version it replaces
        return self._store(inferenceservice, "2")

    def wait_isvc_ready(
        self, name: str, *, expected_generation: int | None = None, **kwargs: Any
    ) -> None:
        self.awaited.append(expected_generation)
        if not self.ready:
            raise RuntimeError(f"Timeout to start the InferenceService {name}.")


def test_deploy_creates_then_replaces_the_inference_service(make_cfg: Any) -> None:
    cfg = make_cfg()
    client = FakeKServeClient()
    first = apply_inference_service(cfg, "s3://models/m/run-1/", client)
    second = apply_inference_service(cfg, "s3://models/m/run-2/", client)
    assert client.calls == ["create", "replace"]
    # The replaced spec's generation, not the old revision's Ready=True, ends each wait; the
    # SDK's own wait takes it (kserve 0.21).
    assert client.awaited == [1, 2]
    assert "expected_generation" in inspect.signature(KServeClient.wait_isvc_ready).parameters
    name = cfg.model_name
    stored = client.items[name]
    container = stored["spec"]["predictor"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STORAGE_URI"] == "s3://models/m/run-2/"  # the new model rolls out in place
    assert (
        first.endpoint_v1
        == second.endpoint_v1
        == (f"http://{name}.mlops.svc/v1/models/{name}:predict")
    )


def test_deploy_that_never_gets_ready_fails_the_step(make_cfg: Any) -> None:
    with pytest.raises(PipelineError, match="Timeout to start") as exc:
        apply_inference_service(make_cfg(), "s3://models/m/run-1/", FakeKServeClient(ready=False))
    assert exc.value.exit_code == 1 and "kubectl -n mlops describe" in str(exc.value)
