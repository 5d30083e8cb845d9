"""Step deploy on a cluster: apply the InferenceService through KServeClient (Argo and KFP)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from components.deploy import DeployResult
from pipelines.config import PipelineConfig
from pipelines.errors import PipelineError
from pipelines.manifests import inference_service

log = logging.getLogger("mlops.inferenceservice")


class IsvcClient(Protocol):
    """The part of kserve.KServeClient this step uses."""

    def get(self, name: str, namespace: str | None = None) -> Any: ...
    def create(self, inferenceservice: Any, namespace: str | None = None) -> Any: ...
    def replace(self, name: str, inferenceservice: Any, namespace: str | None = None) -> Any: ...
    def wait_isvc_ready(
        self, name: str, *, expected_generation: int | None = None, **kwargs: Any
    ) -> None: ...


def apply_inference_service(
    cfg: PipelineConfig, model_uri: str, client: IsvcClient | None = None
) -> DeployResult:
    """Create the InferenceService, or replace it in place (a new model rolls out), then wait
    until KServe reports it Ready; its URL is what the result names."""
    name, namespace = cfg.model_name, cfg.cluster.namespace
    if client is None:
        from kserve import KServeClient  # imports kubernetes: only on this path
        from kubernetes.config import ConfigException

        try:
            client = KServeClient()
        except ConfigException as exc:
            raise PipelineError(
                f"runtime=kubernetes needs a Kubernetes API (in a pod, or a kubeconfig): {exc}"
            ) from None
    isvc = inference_service(cfg, model_uri)
    try:
        try:
            current = client.get(name, namespace=namespace)
        except RuntimeError:  # KServeClient's word for "not found" as for other API errors
            current = None
        if current is None:
            applied = client.create(isvc, namespace=namespace)
            log.info("created InferenceService %s/%s for %s", namespace, name, model_uri)
        else:
            isvc.metadata.resource_version = current["metadata"]["resourceVersion"]
            applied = client.replace(name, isvc, namespace=namespace)
            log.info("replaced InferenceService %s/%s with %s", namespace, name, model_uri)
        # The old revision's Ready=True would answer at once: wait until KServe has observed
        # the spec just written.
        client.wait_isvc_ready(
            name,
            namespace=namespace,
            timeout_seconds=cfg.cluster.ready_s,
            expected_generation=applied["metadata"]["generation"],
        )
        status = client.get(name, namespace=namespace).get("status", {})
    except RuntimeError as exc:
        raise PipelineError(
            f"InferenceService {namespace}/{name}: {exc} "
            f"(kubectl -n {namespace} describe inferenceservice {name})"
        ) from None
    url = status.get("address", {}).get("url") or status.get("url") or ""
    return DeployResult(
        model_dir=model_uri,
        endpoint_v1=f"{url}/v1/models/{name}:predict",
        endpoint_v2=f"{url}/v2/models/{name}/infer",
        smoke_images=0,  # none sent: KServe's readiness (the model loaded) stands for it here
        smoke_agreement=0.0,
        serving=True,
    )
