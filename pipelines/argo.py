"""The Argo Workflow and WorkflowTemplate of the pipeline, built with Hera from the one config."""

from __future__ import annotations

import typing
from typing import Any

import yaml
from hera.workflows import (
    DAG,
    Container,
    Parameter,
    Resource,
    RetryStrategy,
    Steps,
    Workflow,
    WorkflowTemplate,
)
from hera.workflows import models as m

from pipelines.cli import field_info
from pipelines.config import PipelineConfig, config_overrides, for_cluster
from pipelines.errors import FINAL_MARK
from pipelines.kfp_pipeline import PIPELINE_NAME
from pipelines.manifests import (
    config_args,
    container_security,
    pod_security,
    pytorchjob,
    resources,
    scratch_volumes,
    secret_env,
    to_dict,
)
from pipelines.names import PART_OF

# The parameters of the Argo UI's submit form: (parameter, config key). Their descriptions,
# defaults and enums come from the config fields.
PARAMETERS = [
    ("dataset", "dataset.name"),
    ("epochs", "train.epochs"),
    ("batch-size", "train.batch_size"),
    ("lr", "train.lr"),
    ("precision", "train.precision"),
    ("min-accuracy", "gate.min_accuracy"),
    ("model-name", "serving.model_name"),
]
RESULT = "/tmp/result.json"
RUN_ID = "{{workflow.name}}"
# ConfigError's exit code (pipelines/errors.py): the same config fails the same way again.
CONFIG_EXIT = 2


def config_value(cfg: PipelineConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def workflow_parameters(cfg: PipelineConfig) -> list[Parameter]:
    params = []
    for name, dotted in PARAMETERS:
        info = field_info(dotted)
        enum = None
        if typing.get_origin(info.annotation) is typing.Literal:
            enum = list(typing.get_args(info.annotation))
        value = config_value(cfg, dotted)
        params.append(
            Parameter(
                name=name,
                # Empty is unset (`--set KEY=`): an unset model name follows the dataset the
                # form submits, in every pod alike.
                value="" if value is None else str(value),
                description=f"{info.description}{' Empty: unset.' if value is None else ''} "
                f"[{dotted}]",
                enum=enum,
            )
        )
    return params


def overrides() -> dict[str, str]:
    """The UI parameters, as placeholders Argo fills in at submission."""
    return {dotted: f"{{{{workflow.parameters.{name}}}}}" for name, dotted in PARAMETERS}


def pod_overrides(cfg: PipelineConfig) -> dict[str, str]:
    """What each pod resolves: the compiler's own overrides (--set, --config) and the
    Kubernetes runtime (every pod runs on the cluster: deploy then applies the InferenceService
    through KServeClient, as on KFP), then the UI parameters, whose submitted values replace
    what the compiler chose for them."""
    params = overrides()
    kept = {k: v for k, v in config_overrides(for_cluster(cfg)).items() if k not in params}
    return {**kept, **params}


def retries(cfg: PipelineConfig) -> RetryStrategy:
    """Retry a failure that may pass (a node lost, an API hiccup), not a config error, nor one
    the step marks final in its termination message (a gate missed, a digest that does not
    match), which Argo puts in lastRetry.message: "main: Error (exit code 1): no-retry: ..."."""
    return RetryStrategy(
        limit=cfg.cluster.retries,
        retry_policy="Always",
        expression=f"asInt(lastRetry.exitCode) != {CONFIG_EXIT} && "
        f"!(lastRetry.message matches '{FINAL_MARK.strip()}')",
        # 30 s, then 60 s. No maxDuration: Argo counts it from the first attempt's start and
        # ends a retry pod there, so it would cut short a deploy waiting cluster.ready_s or a
        # data step on a large dataset; the limit and the workflow's deadline bound retries.
        backoff=m.Backoff(duration="30s", factor=2),
    )


def _k8s(model: type, obj: Any) -> Any:
    """A kubernetes-client object as the equivalent Hera model."""
    return model.model_validate(to_dict(obj))


def step(
    cfg: PipelineConfig,
    pods: dict[str, str],
    name: str,
    module: str,
    extra: list[str],
    inputs: list[Parameter] | None = None,
) -> Container:
    """A container template running one step's CLI, resolving `pods` (pod_overrides); its
    result JSON is an output parameter."""
    volumes, mounts = scratch_volumes(shm=False)
    return Container(
        name=name,
        image=cfg.image,
        command=["python", "-m", module],
        args=[*config_args(cfg, pods), *extra, "--result", RESULT],
        env=[_k8s(m.EnvVar, e) for e in secret_env(cfg)],
        resources=_k8s(m.ResourceRequirements, resources(cfg.cluster.step_resources)),
        security_context=_k8s(m.SecurityContext, container_security()),
        volumes=[_k8s(m.Volume, v) for v in volumes],
        volume_mounts=[_k8s(m.VolumeMount, v) for v in mounts],
        inputs=inputs,
        outputs=[Parameter(name="result", value_from=m.ValueFrom(path=RESULT))],
        retry_strategy=retries(cfg),
    )


def _result(task: str, key: str) -> str:
    """A field of an earlier step's result JSON, as an Argo expression."""
    return f"{{{{=jsonpath(tasks['{task}'].outputs.parameters.result, '$.{key}')}}}}"


def build(cfg: PipelineConfig, kind: type[Workflow] = Workflow) -> Workflow:
    """The DAG verify-data >> feature-engineering >> train >> verify-model >> deploy."""
    pods = pod_overrides(cfg)
    train_job = to_dict(
        pytorchjob(
            cfg,
            f"{RUN_ID}-train",
            "{{inputs.parameters.processed-uri}}",
            RUN_ID,
            pods,
            workflow=RUN_ID,
        )
    )
    naming: dict[str, Any] = (
        {"generate_name": f"{PIPELINE_NAME}-"} if kind is Workflow else {"name": PIPELINE_NAME}
    )
    with kind(
        **naming,
        namespace=cfg.cluster.namespace,
        entrypoint="pipeline",
        on_exit="exit-handler",
        service_account_name=cfg.cluster.service_account,
        # No step's own container gets a token, but deploy's (below): with one account for all,
        # any step (verify-data, which decodes what users upload) could create a PyTorchJob,
        # whose pods may mount any Secret of the namespace. Argo's executor (task results, the
        # train step's job) acts with an account of its own.
        automount_service_account_token=False,
        executor=m.ExecutorConfig(service_account_name=cfg.cluster.executor_service_account),
        security_context=_k8s(m.PodSecurityContext, pod_security()),
        active_deadline_seconds=cfg.cluster.active_deadline_s,
        arguments=workflow_parameters(cfg),
        labels=PART_OF,
        # On each workflow it runs too: one the Argo UI makes of the template takes no labels
        # of the template's own metadata, and `list`, which selects on PART_OF, missed it.
        workflow_metadata=m.WorkflowMetadata(labels=PART_OF),
    ) as workflow:
        verify_data = step(cfg, pods, "verify-data", "components.verify_data", [])
        features = step(cfg, pods, "feature-engineering", "components.feature_engineering", [])
        train = Resource(
            name="train",
            action="create",
            manifest=yaml.safe_dump(train_job, sort_keys=False),
            set_owner_reference=True,
            # Argo conditions cannot index status.conditions[]; the Master's count is enough.
            success_condition="status.replicaStatuses.Master.succeeded > 0",
            # Counted under the ExitCode restart policy (manifests.RESTART_POLICY). A kill (137,
            # 143) also counts for the one status update before the operator's new pod, which
            # this poll may see: the step then fails rather than waits. Argo fails the step on
            # any one of these: a failed Worker fails the job too, and the operator then
            # deletes the running Master (cleanPodPolicy) without counting it failed.
            failure_condition=",".join(
                f"status.replicaStatuses.{replica}.failed > 0"
                for replica in ("Master", "Worker")[: min(cfg.train.workers, 2)]
            ),
            inputs=[Parameter(name="processed-uri")],
            # The job's own deadline, held by the step too: a job the operator fails without a
            # failed Master (deadline, a Worker failing first) must not hold the workflow,
            # whatever deadline a submission gives the workflow.
            active_deadline_seconds=cfg.cluster.active_deadline_s,
        )
        # The model of this run, where the pods' config names it (the model name may be unset).
        verify_model = step(
            cfg, pods, "verify-model", "components.verify_model", ["--run-id", RUN_ID]
        )
        # The model the gate put in service (the new one if promoted, else the champion's),
        # applied by the same component as on KFP: it waits for the generation it wrote, where an
        # Argo resource condition would pass on the previous rollout's status.
        deploy = step(
            cfg,
            pods,
            "deploy",
            "components.deploy",
            ["--model-uri", "{{inputs.parameters.serving-uri}}"],
            inputs=[Parameter(name="serving-uri")],
        )
        # KServeClient reads its pod's token: an account that may apply InferenceServices only.
        deploy.service_account_name = cfg.cluster.deploy_service_account
        deploy.automount_service_account_token = True
        report = Container(
            name="report",
            image=cfg.image,
            command=[
                "python",
                "-c",
                "import json, sys; print(json.dumps(dict(zip("
                "['workflow', 'status', 'failures'], sys.argv[1:]))))",
            ],
            args=["{{workflow.name}}", "{{workflow.status}}", "{{workflow.failures}}"],
            resources=_k8s(m.ResourceRequirements, resources(cfg.cluster.step_resources)),
            security_context=_k8s(m.SecurityContext, container_security()),
        )
        # A workflow stopped, failed or past its deadline leaves its PyTorchJob training: the
        # owner reference removes it only with the Workflow object, hours or never later.
        stop_training = Resource(
            name="stop-training",
            action="delete",  # Argo adds --ignore-not-found: none was created, or it is gone
            manifest=yaml.safe_dump(
                {
                    "apiVersion": train_job["apiVersion"],
                    "kind": train_job["kind"],
                    "metadata": {
                        "name": train_job["metadata"]["name"],
                        "namespace": cfg.cluster.namespace,
                    },
                },
                sort_keys=False,
            ),
        )
        with Steps(name="exit-handler"):
            stop_training(when="{{workflow.status}} != Succeeded")
            report()
        with DAG(name="pipeline"):
            (
                verify_data()
                >> features()
                >> train(
                    arguments={"processed-uri": _result("feature-engineering", "processed_uri")}
                )
                >> verify_model()
                >> deploy(arguments={"serving-uri": _result("verify-model", "serving_uri")})
            )
    return workflow


def build_template(cfg: PipelineConfig) -> WorkflowTemplate:
    return build(cfg, WorkflowTemplate)  # type: ignore[return-value]
