"""`run.py compile`: every generated file, from the one config (golden copies: compiled/)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from kfp import compiler

from pipelines.argo import build, build_template
from pipelines.config import PipelineConfig, config_overrides, for_cluster
from pipelines.kfp_pipeline import image_classifier
from pipelines.manifests import inference_service, pytorchjob, to_dict
from training.resume import model_uri as run_model_uri

# Stand-ins in the standalone manifests, which a submitter fills in (Argo fills its own).
PROCESSED_URI = "s3://processed-data/DATASET/FEATURE_HASH/"
RUN_ID = "RUN_ID"


def _yaml(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def write_all(cfg: PipelineConfig, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    model_uri = run_model_uri(cfg, RUN_ID)
    files = {
        "argo-workflow.yaml": build(cfg).to_yaml(),
        "argo-workflowtemplate.yaml": build_template(cfg).to_yaml(),
        # The pods resolve what was compiled (the profile plus every --set and --config value),
        # as the pipeline's own train step does: in the Kubernetes runtime.
        "pytorchjob.yaml": _yaml(
            to_dict(
                pytorchjob(
                    cfg,
                    f"{cfg.model_name}-train",
                    PROCESSED_URI,
                    RUN_ID,
                    config_overrides(for_cluster(cfg)),
                )
            )
        ),
        "inferenceservice.yaml": _yaml(to_dict(inference_service(cfg, model_uri))),
        "config.schema.json": json.dumps(PipelineConfig.model_json_schema(), indent=2) + "\n",
    }
    paths = []
    for name, text in files.items():
        (out / name).write_text(text)
        paths.append(out / name)
    ir = out / "kfp-pipeline.yaml"
    compiler.Compiler().compile(image_classifier, str(ir))
    return [*paths, ir]
