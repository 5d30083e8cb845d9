"""The KFP v2 pipeline: five lightweight components, each a thin wrapper around one step."""

# No `from __future__ import annotations`: KFP reads the components' annotations as types.
from kfp import dsl, kubernetes

from pipelines.config import IMAGE_UID, PipelineConfig

PIPELINE_NAME = "image-classifier"

# Each component body runs in its own process (a subprocess locally, a pod on a cluster), so it
# imports inside the function, as KFP requires of lightweight components. The step outputs are
# the steps' results as JSON strings. They become components in build_pipeline, on the
# config's image: decorated here, they took the default config's image, whatever was compiled.


def verify_data(config: str, run_dir: str) -> str:
    import json

    from pipelines.steps import run_step

    return json.dumps(run_step("verify-data", config, run_dir))


def feature_engineering(config: str, run_dir: str, data: str) -> str:
    import json

    from pipelines.steps import run_step

    return json.dumps(run_step("feature-engineering", config, run_dir))


def train(config: str, run_dir: str, features: str, run_id: str) -> str:
    import json

    from pipelines.steps import run_step

    processed_uri = json.loads(features)["processed_uri"]
    return json.dumps(
        run_step("train", config, run_dir, processed_uri=processed_uri, run_id=run_id)
    )


def verify_model(config: str, run_dir: str, trained: str) -> str:
    import json

    from pipelines.steps import run_step

    model_uri = json.loads(trained)["model_uri"]
    return json.dumps(run_step("verify-model", config, run_dir, model_uri=model_uri))


def deploy(config: str, run_dir: str, verified: str, serve: bool) -> str:
    import json

    from pipelines.steps import run_step

    # The model the gate left in service: the new one if promoted, else the champion.
    model_uri = json.loads(verified)["serving_uri"]
    return json.dumps(run_step("deploy", config, run_dir, model_uri=model_uri, serve=serve))


def build_pipeline(cfg: PipelineConfig):  # a KFP pipeline: a GraphComponent
    """The pipeline on cfg's image, with its Secrets and step resources on a cluster."""
    cluster, res = cfg.cluster, cfg.cluster.step_resources
    step = {
        fn.__name__: dsl.component(func=fn, base_image=cfg.image, install_kfp_package=False)
        for fn in (verify_data, feature_engineering, train, verify_model, deploy)
    }

    def on_cluster(task: dsl.PipelineTask, shm: bool = False) -> dsl.PipelineTask:
        """What only a cluster reads (kfp.local ignores platform config): the credentials
        from the Secrets, as the Argo pods get them, the image's non-root user (Pod Security
        "restricted" refuses a pod that does not say runAsNonRoot; KFP's compiler adds only
        the rest), the Argo steps' requests and limits, a memory-backed /dev/shm for torch,
        and no cache: KFP would serve verify-data and feature-engineering, whose inputs are
        the config, from a past run's outputs, skipping the integrity check and handing train
        features the store may have lost. The steps skip unchanged work themselves."""
        task.set_caching_options(False)
        # Requests = limits, as on Argo: Guaranteed QoS.
        task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
        task.set_memory_request(res.memory).set_memory_limit(res.memory)
        if res.gpu:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(res.gpu)
        kubernetes.set_security_context(
            task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True
        )
        kubernetes.use_secret_as_env(
            task,
            secret_name=cluster.s3_secret,
            secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "MINIO_ACCESS_KEY",
                "AWS_SECRET_ACCESS_KEY": "MINIO_SECRET_KEY",
            },
        )
        kubernetes.use_secret_as_env(
            task,
            secret_name=cluster.mlflow_secret,
            secret_key_to_env={
                k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
            },
            optional=True,  # only the production overlay's MLflow asks for a login
        )
        if shm:
            kubernetes.empty_dir_mount(
                task, volume_name="dshm", mount_path="/dev/shm", medium="Memory"
            )
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="verify-data >> feature-engineering >> train >> verify-model >> deploy",
    )
    def image_classifier(config: str, run_dir: str, run_id: str, serve: bool = False) -> None:
        """`config` is the resolved config tree as JSON, credentials excluded (public_json)."""
        # On a cluster, `submit --backend kfp` passes a config whose runtime is kubernetes.
        data = on_cluster(step["verify_data"](config=config, run_dir=run_dir))
        features = on_cluster(
            step["feature_engineering"](config=config, run_dir=run_dir, data=data.output)
        )
        trained = on_cluster(
            step["train"](config=config, run_dir=run_dir, features=features.output, run_id=run_id),
            shm=True,
        )
        verified = on_cluster(
            step["verify_model"](config=config, run_dir=run_dir, trained=trained.output)
        )
        on_cluster(
            step["deploy"](config=config, run_dir=run_dir, verified=verified.output, serve=serve)
        )

    return image_classifier
