"""The KFP v2 pipeline: five lightweight components, each a thin wrapper around one step."""

# No `from __future__ import annotations`: KFP reads the components' annotations as types.
from kfp import dsl

from pipelines.config import PipelineConfig

# The one image tag of the config tree; every component runs in it.
IMAGE = PipelineConfig().image
PIPELINE_NAME = "image-classifier"

# Each component body runs in its own process (a subprocess locally, a pod on a cluster), so it
# imports inside the function, as KFP requires of lightweight components. The step outputs are
# the steps' results as JSON strings.


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def verify_data(config: str, run_dir: str) -> str:
    import json

    from pipelines.steps import run_step

    return json.dumps(run_step("verify-data", config, run_dir))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def feature_engineering(config: str, run_dir: str, data: str) -> str:
    import json

    from pipelines.steps import run_step

    return json.dumps(run_step("feature-engineering", config, run_dir))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(config: str, run_dir: str, features: str, run_id: str) -> str:
    import json

    from pipelines.steps import run_step

    processed_uri = json.loads(features)["processed_uri"]
    return json.dumps(
        run_step("train", config, run_dir, processed_uri=processed_uri, run_id=run_id)
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def verify_model(config: str, run_dir: str, trained: str) -> str:
    import json

    from pipelines.steps import run_step

    model_uri = json.loads(trained)["model_uri"]
    return json.dumps(run_step("verify-model", config, run_dir, model_uri=model_uri))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(config: str, run_dir: str, verified: str, serve: bool) -> str:
    import json

    from pipelines.steps import run_step

    model_uri = json.loads(verified)["model_uri"]
    return json.dumps(run_step("deploy", config, run_dir, model_uri=model_uri, serve=serve))


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="verify-data >> feature-engineering >> train >> verify-model >> deploy",
)
def image_classifier(config: str, run_dir: str, run_id: str, serve: bool = False) -> None:
    """`config` is the resolved config tree as JSON, credentials excluded (see public_json)."""
    data = verify_data(config=config, run_dir=run_dir)
    features = feature_engineering(config=config, run_dir=run_dir, data=data.output)
    trained = train(config=config, run_dir=run_dir, features=features.output, run_id=run_id)
    verified = verify_model(config=config, run_dir=run_dir, trained=trained.output)
    deploy(config=config, run_dir=run_dir, verified=verified.output, serve=serve)
