"""Step train on a cluster: a PyTorchJob through kubeflow-training's TrainingClient (KFP path)."""

from __future__ import annotations

import logging
import sys
from typing import Any, Protocol

from pipelines.config import PipelineConfig, config_overrides
from pipelines.errors import PipelineError
from pipelines.manifests import pytorchjob
from pipelines.mlflow_runs import fail_abandoned
from pipelines.storage import ObjectStore, parse_s3_uri
from training.result import RESULT_OBJECT, TrainResult
from training.resume import location

log = logging.getLogger("mlops.pytorchjob")
KIND = "PyTorchJob"
POLL_S = 15


class JobClient(Protocol):
    """The part of kubeflow.training.TrainingClient this launcher uses."""

    def create_job(self, job: Any, namespace: str | None = None) -> None: ...
    def wait_for_job_conditions(self, name: str, **kwargs: Any) -> Any: ...
    def get_job_logs(self, name: str, **kwargs: Any) -> tuple[dict[str, str], Any]: ...
    def delete_job(self, name: str, namespace: str | None = None, **kwargs: Any) -> None: ...


def job_name(run_id: str) -> str:
    return f"{run_id}-train"[:63].rstrip("-")


def _conditions(job: Any) -> dict[str, Any]:
    status = getattr(job, "status", None)
    return {c.type: c for c in (getattr(status, "conditions", None) or []) if c.status == "True"}


def _wait(client: JobClient, name: str, namespace: str, cfg: PipelineConfig) -> Any:
    """The job once Succeeded or Failed. A step stopped meanwhile (KFP's terminate, a drained
    node: SIGTERM) deletes the job, which has no owner to go with and would train on."""
    try:
        return client.wait_for_job_conditions(
            name,
            namespace=namespace,
            job_kind=KIND,
            expected_conditions={"Succeeded", "Failed"},
            wait_timeout=cfg.cluster.active_deadline_s,
            polling_interval=POLL_S,
        )
    except KeyboardInterrupt:
        try:
            client.delete_job(name, namespace=namespace, job_kind=KIND)
            log.warning("stopped: deleted %s %s/%s", KIND, namespace, name)
        except (RuntimeError, TimeoutError, ValueError) as exc:  # stopping already: say so
            log.warning(
                "stopped, but %s %s/%s could not be deleted (%s)", KIND, namespace, name, exc
            )
        raise


def run_pytorchjob(
    cfg: PipelineConfig,
    store: ObjectStore,
    processed_uri: str,
    run_id: str,
    client: JobClient | None = None,
) -> TrainResult:
    """Create the PyTorchJob, wait for Succeeded or Failed, show the master's log, read the result.

    The pods resolve the same config from `--profile` and the `--set` overrides; the model and
    its result land in models/NAME/RUN_ID/, where the next step reads them."""
    namespace = cfg.cluster.namespace
    if client is None:
        from kubeflow.training import TrainingClient  # imports kubernetes: only on this path
        from kubernetes.config import ConfigException

        try:
            client = TrainingClient(namespace=namespace, job_kind=KIND)
        except ConfigException as exc:
            raise PipelineError(
                f"runtime=kubernetes needs a Kubernetes API (in a pod, or a kubeconfig): {exc}"
            ) from None
    name = job_name(run_id)
    job = pytorchjob(cfg, name, processed_uri, run_id, config_overrides(cfg))
    try:
        client.create_job(job=job, namespace=namespace)
        log.info("created %s %s/%s; waiting for Succeeded or Failed", KIND, namespace, name)
        done = _wait(client, name, namespace, cfg)
        logs, _ = client.get_job_logs(name, namespace=namespace, job_kind=KIND, is_master=True)
    except (RuntimeError, TimeoutError, ValueError) as exc:  # TrainingClient's API errors
        raise PipelineError(f"{KIND} {namespace}/{name}: {exc}") from None
    for pod, text in logs.items():
        sys.stderr.write(f"--- {pod}\n{text}\n")
    conditions = _conditions(done)
    if "Succeeded" not in conditions:
        fail_abandoned(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, run_id)
        failed = conditions.get("Failed")
        why = getattr(failed, "message", None) or "no Succeeded condition"
        raise PipelineError(
            f"{KIND} {namespace}/{name} failed: {why}; its master log is above "
            f"(kubectl -n {namespace} describe pytorchjob {name})"
        )
    bucket, prefix, _ = location(cfg, run_id)
    result = store.read_json(bucket, prefix + RESULT_OBJECT)
    if result is None:
        raise PipelineError(f"{KIND} {name} succeeded but s3://{bucket}/{prefix} has no result")
    log.info("%s %s succeeded; model %s", KIND, name, result["model_uri"])
    parse_s3_uri(result["model_uri"])  # a malformed record fails here, not in the next step
    return TrainResult(**result)
