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
    Workflow,
    WorkflowTemplate,
)
from hera.workflows import models as m

from pipelines.cli import field_info
from pipelines.config import PipelineConfig
from pipelines.kfp_pipeline import PIPELINE_NAME
from pipelines.manifests import (
    config_args,
    container_security,
    inference_service,
    pod_security,
    pytorchjob,
    resources,
    scratch_volumes,
    secret_env,
    to_dict,
)

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
MODEL_NAME = "{{workflow.parameters.model-name}}"
RUN_ID = "{{workflow.name}}"


def _value(cfg: PipelineConfig, dotted: str) -> Any:
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
        params.append(
            Parameter(
                name=name,
                value=str(_value(cfg, dotted)),
                description=f"{info.description} [{dotted}]",
                enum=enum,
            )
        )
    return params


def overrides() -> dict[str, str]:
    """Each pod resolves the config from the submitted parameters."""
    return {dotted: f"{{{{workflow.parameters.{name}}}}}" for name, dotted in PARAMETERS}


def _k8s(model: type, obj: Any) -> Any:
    """A kubernetes-client object as the equivalent Hera model."""
    return model.model_validate(to_dict(obj))


def step(cfg: PipelineConfig, name: str, module: str, extra: list[str]) -> Container:
    """A container template running one step's CLI; its result JSON is an output parameter."""
    volumes, mounts = scratch_volumes(shm=False)
    return Container(
        name=name,
        image=cfg.image,
        command=["python", "-m", module],
        args=[*config_args(cfg, overrides()), *extra, "--result", RESULT],
        env=[_k8s(m.EnvVar, e) for e in secret_env(cfg)],
        resources=_k8s(m.ResourceRequirements, resources(cfg.cluster.step_resources)),
        security_context=_k8s(m.SecurityContext, container_security()),
        volumes=[_k8s(m.Volume, v) for v in volumes],
        volume_mounts=[_k8s(m.VolumeMount, v) for v in mounts],
        outputs=[Parameter(name="result", value_from=m.ValueFrom(path=RESULT))],
        retry_strategy=RetryStrategy(
            limit=cfg.cluster.retries,
            retry_policy="Always",
            backoff=m.Backoff(duration="30s", factor=2, max_duration="10m"),
        ),
    )


def _named(cfg: PipelineConfig) -> PipelineConfig:
    # model_copy skips validation: the name is an Argo placeholder until submission.
    return cfg.model_copy(
        update={"serving": cfg.serving.model_copy(update={"model_name": MODEL_NAME})}
    )


def build(cfg: PipelineConfig, kind: type[Workflow] = Workflow) -> Workflow:
    """The DAG verify-data >> feature-engineering >> train >> verify-model >> deploy."""
    model_uri = f"s3://{cfg.storage.buckets.models}/{MODEL_NAME}/{RUN_ID}/"
    train_job = to_dict(
        pytorchjob(
            cfg,
            f"{RUN_ID}-train",
            "{{inputs.parameters.processed-uri}}",
            RUN_ID,
            overrides(),
            workflow=RUN_ID,
        )
    )
    isvc = to_dict(inference_service(_named(cfg), model_uri))
    naming: dict[str, Any] = (
        {"generate_name": f"{PIPELINE_NAME}-"} if kind is Workflow else {"name": PIPELINE_NAME}
    )
    with kind(
        **naming,
        namespace=cfg.cluster.namespace,
        entrypoint="pipeline",
        on_exit="exit-handler",
        service_account_name=cfg.cluster.service_account,
        automount_service_account_token=True,  # the executor needs it for resource templates
        security_context=_k8s(m.PodSecurityContext, pod_security()),
        active_deadline_seconds=cfg.cluster.active_deadline_s,
        arguments=workflow_parameters(cfg),
        labels={"app.kubernetes.io/part-of": "mlops-pipeline"},
    ) as workflow:
        verify_data = step(cfg, "verify-data", "components.verify_data", [])
        features = step(cfg, "feature-engineering", "components.feature_engineering", [])
        train = Resource(
            name="train",
            action="create",
            manifest=yaml.safe_dump(train_job, sort_keys=False),
            set_owner_reference=True,
            # Argo conditions cannot index status.conditions[]; the Master's count is enough.
            success_condition="status.replicaStatuses.Master.succeeded > 0",
            failure_condition="status.replicaStatuses.Master.failed > 0",
            inputs=[Parameter(name="processed-uri")],
        )
        verify_model = step(
            cfg, "verify-model", "components.verify_model", ["--model-uri", model_uri]
        )
        deploy = Resource(
            name="deploy",
            action="apply",
            manifest=yaml.safe_dump(isvc, sort_keys=False),
            success_condition="status.modelStatus.states.activeModelState == Loaded",
            failure_condition="status.modelStatus.states.activeModelState == FailedToLoad",
            retry_strategy=RetryStrategy(limit=cfg.cluster.retries, retry_policy="Always"),
        )
        exit_handler = Container(
            name="exit-handler",
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
        with DAG(name="pipeline"):
            processed = (
                "{{=jsonpath(tasks['feature-engineering'].outputs.parameters.result, "
                "'$.processed_uri')}}"
            )
            (
                verify_data()
                >> features()
                >> train(arguments={"processed-uri": processed})
                >> verify_model()
                >> deploy()
            )
        del exit_handler  # registered on the workflow by its context; named in on_exit
    return workflow


def build_template(cfg: PipelineConfig) -> WorkflowTemplate:
    return build(cfg, WorkflowTemplate)  # type: ignore[return-value]
