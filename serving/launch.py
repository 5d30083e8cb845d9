"""Starting a model server without torch: its model dir fetched from S3, its command line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipelines.config import DNS_LABEL, PipelineConfig, ServingConfig
from pipelines.errors import DataError, PipelineError
from pipelines.storage import ObjectStore, parse_s3_uri

# This module imports neither torch nor kserve: a launcher that starts the server first and
# imports torch afterwards overlaps the two imports (about 4 s each on 2 cores).
MODEL_JSON = "model.json"
# model.json's `weights`: a file in the model's own folder. The download writes it there by this
# name, so a path (`../x`, `/home/u/.local/lib/python3.11/site-packages/x.pth`) in a record
# that someone changed would write outside the folder: a .pth file there runs at Python's start.
WEIGHTS_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
# The server's settings from the config tree, passed as flags of the same names: the server's
# parser takes each flag's type, default and help from the field.
CONFIG_FLAGS = (
    "top_k",
    "max_instances",
    "max_body_mb",
    "max_decode_pixels",
    "threads",
    "max_batch",
    "batch_wait_ms",
    "max_queued_images",
    "backend",
)


def local_model_dir(cfg: PipelineConfig) -> Path:
    """Where a local server's model is fetched: a folder per port. A port has one live server,
    so a run or `serve` on another port never deletes the files (and the log beside them) of
    a server still answering."""
    return (cfg.state_dir / "serving" / f"{cfg.model_name}-{cfg.serving.port}").resolve()


def model_meta(store: ObjectStore, model_uri: str) -> dict[str, Any]:
    """A trained model's model.json, read from the store."""
    bucket, prefix = parse_s3_uri(model_uri.rstrip("/") + "/")
    meta = store.read_json(bucket, prefix + MODEL_JSON)
    if meta is None:
        raise PipelineError(
            f"{model_uri} has no {MODEL_JSON}: no trained model is there (a wrong URI, or a "
            "training that did not complete)"
        )
    weights = meta.get("weights")
    if not isinstance(weights, str) or not re.fullmatch(WEIGHTS_NAME, weights):
        raise DataError(
            f"{model_uri.rstrip('/')}/{MODEL_JSON}: its weights, {weights!r}, are not a file "
            "name in the model's folder; train the model again or restore the record"
        )
    return meta


def served_as(cfg: PipelineConfig, meta: dict[str, Any]) -> PipelineConfig:
    """cfg, serving the model under the name it was trained and registered under (model.json
    records it) unless serving.model_name is set: `serve` does not know the dataset or the
    name a run chose, so its own default would name an MNIST model cifar10-resnet18."""
    name = meta.get("name")
    if cfg.serving.model_name or not isinstance(name, str) or not re.fullmatch(DNS_LABEL, name):
        return cfg  # chosen, or not a name training writes
    serving = cfg.serving.model_copy(update={"model_name": name})
    return cfg.model_copy(update={"serving": serving})


def download_model(
    store: ObjectStore, model_uri: str, dest: Path, meta: dict[str, Any] | None = None
) -> Path:
    """Fetch model.json (unless the caller read it with model_meta: `meta`), then the weights
    it names, checked against its sha256 (as KServe's storage initializer fetches a model into
    the predictor's model dir)."""
    bucket, prefix = parse_s3_uri(model_uri.rstrip("/") + "/")
    meta = meta or model_meta(store, model_uri)
    store.get_file(bucket, prefix + meta["weights"], dest / meta["weights"], meta["sha256"])
    store.get_file(bucket, prefix + MODEL_JSON, dest / MODEL_JSON)
    return dest


def serving_args(model_dir: str, name: str, port: int, host: str, sv: ServingConfig) -> list[str]:
    """The arguments of `python -m serving`, in a pod and locally alike."""
    return [
        "--model_dir",
        model_dir,
        "--model_name",
        name,
        "--http_port",
        str(port),
        "--bind_host",
        host,
        *(x for flag in CONFIG_FLAGS for x in (f"--{flag}", str(getattr(sv, flag)))),
    ]
