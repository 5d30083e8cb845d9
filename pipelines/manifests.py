"""The PyTorchJob and the InferenceService, built from the config with the official SDK models."""

from __future__ import annotations

import sys
from typing import Any

from kubeflow.training.models import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes.client import (
    ApiClient,
    V1Capabilities,
    V1Container,
    V1ContainerPort,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1EnvVarSource,
    V1HTTPGetAction,
    V1ObjectMeta,
    V1PodSecurityContext,
    V1PodSpec,
    V1PodTemplateSpec,
    V1Probe,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecretKeySelector,
    V1SecurityContext,
    V1Volume,
    V1VolumeMount,
)

from pipelines.config import IMAGE_UID as UID
from pipelines.config import PipelineConfig, Resources, mlflow_env
from pipelines.names import TRAINER_CONTAINER, WORKFLOW_LABEL
from serving.launch import serving_args

# KServe's package parses sys.argv when first imported (its model server's flags, as defaults):
# `run.py compile --config FILE` failed there, --config read as its --configure_logging.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    from kserve import (
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1PredictorSpec,
    )
finally:
    sys.argv = _argv

# The Training Operator's ExitCode policy: a replica that exits with a code that is not a kill
# (1 a Python error, 2 a config error) stays Failed, the job fails and
# status.replicaStatuses.<type>.failed counts it, which the Argo train step watches; 130, 137,
# 138 and 143 (SIGINT, SIGKILL or an OOM kill, SIGUSR1, SIGTERM on a drained node) get a new pod.
# With OnFailure the kubelet restarts the container in place, the pod never reads Failed, and
# past backoffLimit the operator deletes the pods without counting one: the step would wait for
# its deadline.
RESTART_POLICY = "ExitCode"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri


def to_dict(obj: Any) -> dict[str, Any]:
    """An SDK model as the plain camelCase mapping the API server takes."""
    return ApiClient().sanitize_for_serialization(obj)


def resources(res: Resources) -> V1ResourceRequirements:
    """Requests equal to limits: Guaranteed QoS, and no noisy neighbour surprises."""
    amounts = {"cpu": res.cpu, "memory": res.memory}
    if res.gpu:
        amounts["nvidia.com/gpu"] = str(res.gpu)
    return V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def container_security() -> V1SecurityContext:
    """Pod Security "restricted" for a container."""
    return V1SecurityContext(
        allow_privilege_escalation=False,
        run_as_non_root=True,
        run_as_user=UID,
        read_only_root_filesystem=True,
        capabilities=V1Capabilities(drop=["ALL"]),
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )


def pod_security() -> V1PodSecurityContext:
    return V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=UID,
        run_as_group=UID,
        fs_group=UID,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )


def secret_env(cfg: PipelineConfig) -> list[V1EnvVar]:
    """Store and tracker addresses as values, the keys only by reference to the Secret, and
    the MLflow telemetry switch."""

    def ref(secret: str, key: str, optional: bool = False) -> V1EnvVarSource:
        return V1EnvVarSource(
            secret_key_ref=V1SecretKeySelector(name=secret, key=key, optional=optional or None)
        )

    s3, tracker = cfg.cluster.s3_secret, cfg.cluster.mlflow_secret
    return [
        V1EnvVar(name="MINIO_ENDPOINT", value=cfg.cluster.s3_endpoint),
        V1EnvVar(name="MINIO_ACCESS_KEY", value_from=ref(s3, "AWS_ACCESS_KEY_ID")),
        V1EnvVar(name="MINIO_SECRET_KEY", value_from=ref(s3, "AWS_SECRET_ACCESS_KEY")),
        V1EnvVar(name="MLFLOW_TRACKING_URI", value=cfg.cluster.mlflow_uri),
        # Optional: one compiled workflow serves both overlays, with and without MLflow auth.
        *(
            V1EnvVar(name=key, value_from=ref(tracker, key, optional=True))
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        ),
        *(V1EnvVar(name=key, value=value) for key, value in mlflow_env(cfg.mlflow).items()),
        # A read-only root filesystem: temporary files and caches go to the emptyDir.
        V1EnvVar(name="HOME", value="/tmp"),
        V1EnvVar(name="TMPDIR", value="/tmp"),
    ]


def scratch_volumes(shm: bool) -> tuple[list[V1Volume], list[V1VolumeMount]]:
    volumes = [V1Volume(name="tmp", empty_dir=V1EmptyDirVolumeSource())]
    mounts = [V1VolumeMount(name="tmp", mount_path="/tmp")]
    if shm:  # torch's gloo and nccl use /dev/shm; the default 64 MiB is too small
        volumes.append(V1Volume(name="dshm", empty_dir=V1EmptyDirVolumeSource(medium="Memory")))
        mounts.append(V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    return volumes, mounts


def config_args(cfg: PipelineConfig, overrides: dict[str, str]) -> list[str]:
    """`--profile P --set k=v ...`: the config a pod resolves, the same as the submitter's."""
    args = ["--profile", cfg.profile]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def pytorchjob(
    cfg: PipelineConfig,
    name: str,
    processed_uri: str,
    run_id: str,
    overrides: dict[str, str],
    workflow: str | None = None,
) -> KubeflowOrgV1PyTorchJob:
    """Master 1 + Worker (workers - 1), each running torchrun with nprocPerNode processes.

    torchrun reads the operator's PET_* variables (nnodes, node rank, master address), so one
    command serves every replica. It runs as training.torchrun, whose exit code tells a kill
    (137, 143) from a failure, as RESTART_POLICY needs: torchrun's own is 1 for both."""
    tc, cl = cfg.train, cfg.cluster
    volumes, mounts = scratch_volumes(shm=True)
    command = [
        "python",
        "-m",
        "training.torchrun",
        "-m",
        "training.train",
        "--processed",
        processed_uri,
        "--run-id",
        run_id,
        *config_args(cfg, overrides),
    ]
    labels = {"app.kubernetes.io/name": "mlops-train"}
    if workflow:
        labels[WORKFLOW_LABEL] = workflow  # `argo logs` and the UI find the pods by it
    template = V1PodTemplateSpec(
        metadata=V1ObjectMeta(labels=labels),
        spec=V1PodSpec(
            service_account_name=cl.service_account,
            automount_service_account_token=False,
            security_context=pod_security(),
            volumes=volumes,
            containers=[
                V1Container(
                    name=TRAINER_CONTAINER,
                    image=cfg.image,
                    command=command,
                    env=secret_env(cfg),
                    resources=resources(cl.train_resources),
                    security_context=container_security(),
                    volume_mounts=mounts,
                )
            ],
        ),
    )
    replicas = {
        "Master": KubeflowOrgV1ReplicaSpec(
            replicas=1, restart_policy=RESTART_POLICY, template=template
        )
    }
    if tc.workers > 1:
        replicas["Worker"] = KubeflowOrgV1ReplicaSpec(
            replicas=tc.workers - 1, restart_policy=RESTART_POLICY, template=template
        )
    return KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=V1ObjectMeta(name=name, namespace=cl.namespace, labels=labels),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(tc.nproc_per_node),
            pytorch_replica_specs=replicas,
            run_policy=KubeflowOrgV1RunPolicy(
                backoff_limit=cl.backoff_limit,
                active_deadline_seconds=cl.active_deadline_s,
                clean_pod_policy="Running",
            ),
        ),
    )


def inference_service(cfg: PipelineConfig, model_uri: str) -> V1beta1InferenceService:
    """A custom predictor running `python -m serving`; KServe fetches storageUri first."""
    cl, sv = cfg.cluster, cfg.serving
    volumes, mounts = scratch_volumes(shm=False)
    return V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1",
        kind="InferenceService",
        metadata=V1ObjectMeta(
            name=cfg.model_name,
            namespace=cl.namespace,
            annotations={"serving.kserve.io/deploymentMode": cl.serving_mode},
        ),
        spec=V1beta1InferenceServiceSpec(
            predictor=V1beta1PredictorSpec(
                service_account_name=cl.serving_service_account,
                # The model server calls no Kubernetes API, and KServe's webhook puts the S3
                # keys the account names into the storage initializer's env: no token in the pod.
                automount_service_account_token=False,
                security_context=pod_security(),
                volumes=volumes,
                containers=[
                    V1Container(
                        name="kserve-container",
                        image=cfg.image,
                        command=["python", "-m", "serving"],
                        # A pod listens on all its interfaces; locally the same args say 127.0.0.1.
                        args=serving_args(MODEL_DIR, cfg.model_name, sv.port, "0.0.0.0", sv),
                        # KServe's storage initializer downloads this into /mnt/models.
                        env=[
                            V1EnvVar(name="STORAGE_URI", value=model_uri),
                            V1EnvVar(name="HOME", value="/tmp"),
                        ],
                        ports=[V1ContainerPort(container_port=sv.port, protocol="TCP")],
                        # Ready once the model answers: without a probe a new pod took traffic
                        # from its start, while it still loaded (seconds), so a deploy that
                        # replaced the model refused requests in between. Live while the
                        # server answers at all, with room for the load (import, ONNX export).
                        readiness_probe=V1Probe(
                            http_get=V1HTTPGetAction(
                                path=f"/v2/models/{cfg.model_name}/ready", port=sv.port
                            ),
                            period_seconds=5,
                        ),
                        liveness_probe=V1Probe(
                            http_get=V1HTTPGetAction(path="/v2/health/live", port=sv.port),
                            initial_delay_seconds=30,
                            period_seconds=10,
                            timeout_seconds=5,
                            failure_threshold=6,
                        ),
                        resources=resources(cl.serving_resources),
                        security_context=container_security(),
                        volume_mounts=mounts,
                    )
                ],
            )
        ),
    )
