"""`run.py compile`: every generated file, from the one config (golden copies: compiled/)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml
from kfp import compiler

from pipelines.argo import build, build_template
from pipelines.config import PipelineConfig, config_overrides, for_cluster
from pipelines.errors import ConfigError
from pipelines.kfp_pipeline import build_pipeline
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
    names = [*files, "kfp-pipeline.yaml"]
    taken = [out / name for name in names if (out / name).is_dir()]
    if taken:
        raise ConfigError(f"--out: {taken[0]} is a folder; remove it, or pass another --out DIR")
    # Written beside, then moved into place: a failure leaves the folder as it was, not half of
    # a new set of specs beside half of the old one.
    with tempfile.TemporaryDirectory(dir=out, prefix=".compile-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        compiler.Compiler().compile(build_pipeline(cfg), str(Path(tmp) / "kfp-pipeline.yaml"))
        for name in names:
            os.replace(Path(tmp) / name, out / name)
    return [out / name for name in names]
