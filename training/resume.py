"""Where a run's checkpoints live and whether they resume it: no torch, so the train step's
check before it starts anything costs the driver no torch import (about 1.2 s)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipelines.config import PipelineConfig
from pipelines.errors import ConfigError, IntegrityError, PipelineError
from pipelines.names import run_id_error
from pipelines.storage import ObjectStore, s3_uri
from serving.launch import MODEL_JSON
from training.result import RESULT_OBJECT, TrainResult

LATEST = "latest.json"
# The train settings a resume may change (config_hash leaves them out).
RESUME_FREE = {"max_restarts", "flip_tta", "eval_every"}
# Train settings added after checkpoints were first written, with the value that trains as
# before them.
ADDED_SINCE = {"cutout": 0}


def location(cfg: PipelineConfig, run_id: str) -> tuple[str, str, str]:
    """Where a pipeline run keeps its model (bucket, prefix) and, below it, its checkpoints.
    An id that names no folder is refused here, where it becomes a key: a KFP run's id is a
    pipeline parameter, which reaches the train step unchecked by any command line."""
    if (why := run_id_error(run_id)) is not None:
        raise ConfigError(why)
    prefix = f"{cfg.model_name}/{run_id}/"
    return cfg.storage.buckets.models, prefix, prefix + "checkpoints/"


def model_uri(cfg: PipelineConfig, run_id: str) -> str:
    """s3://BUCKET/NAME/RUN/: where a pipeline run's model is written and read."""
    return s3_uri(*location(cfg, run_id)[:2])


def completed(store: ObjectStore, cfg: PipelineConfig, run_id: str) -> TrainResult | None:
    """What a run whose model is complete (model.json, written last) recorded; None before.
    A start after that (a resumed pipeline, a restarted worker or pod) goes on with it: the
    checkpoints' tensors are gone by then (checkpoint.release_tensors)."""
    bucket, prefix, _ = location(cfg, run_id)
    if store.stat(bucket, prefix + MODEL_JSON) is None:
        return None
    return TrainResult(**store.read_json(bucket, prefix + RESULT_OBJECT))  # type: ignore[arg-type]


def config_hash(cfg: PipelineConfig, processed: str) -> str:
    """What a checkpoint must have been trained under to be resumed: the training settings
    (the world size included: BatchNorm sees each rank's share of the batch) and the data.
    Restarts allowed, the final evaluation's flip TTA and how often it validates change no
    training state (evaluation draws no random numbers and leaves BatchNorm's statistics)."""
    train = cfg.train.model_dump(mode="json", exclude=RESUME_FREE)
    # A setting added since, at its default (the one that changes nothing), is left out: a run
    # stopped under the earlier version still resumes, as its training is the same.
    for key, off in ADDED_SINCE.items():
        if train[key] == off:
            del train[key]
    doc = {"train": train, "processed": processed.rstrip("/")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(state: dict[str, Any], chash: str, bucket: str, prefix: str) -> None:
    """A run id resumes its own training only, not one of another config or data."""
    if state.get("config_hash") != chash:
        raise ConfigError(
            f"{s3_uri(bucket, prefix)} holds a checkpoint of another config or data; resume "
            "with the settings it was trained under, or use a new run id"
        )


def malformed(bucket: str, prefix: str, exc: Exception) -> IntegrityError:
    return IntegrityError(f"{s3_uri(bucket, prefix + LATEST)} is malformed ({exc})")


def read_pointer(
    store: ObjectStore, bucket: str, prefix: str
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The latest checkpoint's pointer and its state, checked against the pointer's digest."""
    pointer = store.read_json(bucket, prefix + LATEST)
    if pointer is None:
        return None
    try:
        key, sha256 = pointer["state"]["key"], pointer["state"]["sha256"]
        return pointer, json.loads(store.get_bytes(bucket, prefix + key, sha256))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise malformed(bucket, prefix, exc) from None


def load_state(store: ObjectStore, bucket: str, prefix: str) -> dict[str, Any] | None:
    """The latest checkpoint's state (a small JSON object) without its tensors; None if none."""
    found = read_pointer(store, bucket, prefix)
    return None if found is None else found[1]


STARTS = "starts.json"


def count_start(store: ObjectStore, cfg: PipelineConfig, run_id: str) -> int:
    """Count a start of the run's training (rank 0, on a cluster) in the store, and refuse one
    past cluster.backoff_limit restarts. The Training Operator applies backoffLimit only to
    OnFailure and Always replicas: under ExitCode (manifests.RESTART_POLICY) it gives a killed
    replica a new pod every time, so a trainer that the OOM killer ends at each start would
    start again until the job's deadline, hours on. Its exit code here, 1, ends the job."""
    bucket, prefix, _ = location(cfg, run_id)
    before = (store.read_json(bucket, prefix + STARTS) or {}).get("starts")
    starts = (before if isinstance(before, int) else 0) + 1
    limit = cfg.cluster.backoff_limit
    if starts > limit + 1:
        raise PipelineError(
            f"training of {run_id} was started {starts - 1} times, its cluster.backoff_limit="
            f"{limit} restarts spent: the pods before this one were killed (exit code 137: out "
            "of memory, see cluster.train_resources.memory; 143: stopped), so the job fails "
            "rather than start again"
        )
    store.write_json(bucket, prefix + STARTS, {"starts": starts})
    return starts
