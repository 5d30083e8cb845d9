"""Step verify-model: integrity, safe loading, test evaluation, the quality gate, promotion."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipelines.cli import run_id_arg, s3_uri_arg, step_main
from pipelines.config import PipelineConfig
from pipelines.errors import ConfigError, IntegrityError, PipelineError, StorageError
from pipelines.registry import ACCURACY_TAG, GATE_TAG, MODEL_URI_TAG
from pipelines.storage import ObjectStore, parse_s3_uri, s3_uri
from serving.launch import download_model, model_meta
from serving.loader import load_model
from training import resume
from training.data import Tensors, load_processed
from training.dist import Dist
from training.evaluate import evaluate, make_autocast

log = logging.getLogger("mlops.verify_model")
VERIFICATION = "verification.json"


class GateError(PipelineError):
    """The model is below the configured minimum accuracy."""

    final = True  # evaluated again, the same model scores the same


@dataclass
class VerifyModelResult:
    model_uri: str
    test_accuracy: float
    min_accuracy: float
    passed: bool
    registered_model: str
    version: str
    alias: str
    champion_version: str | None  # before this step
    champion_accuracy: float | None  # on the same test split
    promoted: bool
    verification_uri: str
    # What deploy serves: this model if promoted, else the alias's, which stays in service
    # (None after a failed gate with no champion to fall back on).
    serving_uri: str | None


def test_accuracy(model: torch.nn.Module, test: Tensors, num_classes: int) -> float:
    """fp32, as the model server runs it."""
    autocast = make_autocast(torch.device("cpu"), "fp32")
    return evaluate(model, test, Dist(), 512, num_classes, autocast)[1]


def task(meta: dict[str, Any]) -> str:
    """What a model's clients send and get back: its input shape and its classes."""
    shape = "x".join(map(str, meta["input"]["shape"]))
    classes = meta["classes"]
    shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    return f"{shape} images, {len(classes)} classes ({shown})"


def other_task(champion: ModelVersion, theirs: dict, ours: dict, force: bool) -> bool:
    """Whether the champion serves another task, which gate.force_promote lets this model
    replace; GateError unless forced. Such a champion cannot be scored on our data, nor its
    recorded score compared (it was kept over a model of another dataset whose test split is
    carved), and replacing it unasked would break what its clients send."""
    if (theirs["input"]["shape"], theirs["classes"]) == (ours["input"]["shape"], ours["classes"]):
        return False
    if not force:
        raise GateError(
            f"champion v{champion.version} of {champion.name} serves another task "
            f"({task(theirs)}) than this model ({task(ours)}): give this model its own "
            "name with --set serving.model_name=NAME, or replace the champion with "
            "--set gate.force_promote=true"
        )
    log.warning("replacing champion v%s, which served %s", champion.version, task(theirs))
    return True


def _score_champion(store: ObjectStore, model_uri: str, test: Tensors, tmp: Path) -> float:
    model, meta = load_model(download_model(store, model_uri, tmp))
    return test_accuracy(model, test, meta["num_classes"])


def servable(store: ObjectStore, model_uri: str) -> tuple[dict[str, Any] | None, str | None]:
    """The model's record (model.json), or why the model at model_uri can no longer be
    served: its record or its weights gone or changed in the store. (A champion in that state
    was kept on its recorded score, and deploy then failed on it in every run that did not
    beat that score; scoring it again failed before gate.force_promote was read.) A store
    that cannot be reached is raised."""
    bucket, prefix = parse_s3_uri(model_uri.rstrip("/") + "/")
    try:
        meta = model_meta(store, model_uri)
        store.check(bucket, prefix + meta["weights"], meta["sha256"])
        task(meta)  # the fields other_task compares
    except StorageError:
        raise
    except (PipelineError, KeyError, TypeError) as exc:
        return None, str(exc) if isinstance(exc, PipelineError) else f"its record lacks {exc}"
    return meta, None


def recorded_score(store: ObjectStore, model_uri: str, processed_uri: str | None) -> float | None:
    """The test accuracy this step recorded for model_uri when it verified it, if that was on
    the same processed data: the same test images, so the same score, without downloading and
    evaluating the model again (1.2 s of each re-run of the smoke pipeline). None otherwise.
    processed_uri None: whatever test split it was verified on."""
    bucket, prefix = parse_s3_uri(model_uri.rstrip("/") + "/")
    try:
        record = store.read_json(bucket, prefix + VERIFICATION)
    except IntegrityError:  # not JSON: scored again, as before the record existed
        return None
    if not isinstance(record, dict):
        return None
    if processed_uri is not None and record.get("test_split") != processed_uri:
        return None
    accuracy = record.get("test_accuracy")
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float):
        return None
    return float(accuracy)


def verify_model(cfg: PipelineConfig, store: ObjectStore, model_uri: str) -> VerifyModelResult:
    """Check, evaluate and gate the model; make it the champion when it is at least as good."""
    if not cfg.mlflow.tracking_uri:
        raise ConfigError("mlflow.tracking_uri is unset: set MLFLOW_TRACKING_URI")
    gate = cfg.gate
    (cfg.state_dir / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.state_dir / "tmp") as tmp:
        model, meta = load_model(download_model(store, model_uri, Path(tmp) / "new"))
        lineage = meta["lineage"]
        processed, splits = load_processed(store, lineage["processed_uri"], only=("test",))
        # A test split carved out of the training images (a dataset with none of its own)
        # differs with the split's seed and fractions: one made for another model may hold
        # images that model trained on. It scored 0.2333 on such a split, 0.2000 on its own.
        carved = processed.get("transform", {}).get("test_source") == "carved"
        accuracy = test_accuracy(model, splits["test"], meta["num_classes"])
        log.info("test accuracy %.4f (gate %.4f)", accuracy, gate.min_accuracy)

        client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
        name, version = lineage["registered_model"], str(lineage["registered_version"])
        try:
            champion = client.get_model_version_by_alias(name, gate.alias)
        except MlflowException:
            champion = None
        champion_acc, champion_uri = None, None
        if champion is not None and champion.version != version:
            champion_uri = champion.tags.get(MODEL_URI_TAG)
            theirs, broken = servable(store, champion_uri) if champion_uri else (None, None)
            if broken:
                log.warning(
                    "champion v%s cannot be served any more (%s): a model that passes the "
                    "gate replaces it",
                    champion.version,
                    broken,
                )
                champion_uri = None
            # First: a champion of another task has no score to compare, recorded or not.
            if theirs and not other_task(champion, theirs, meta, gate.force_promote):
                champion_acc = recorded_score(store, champion_uri, lineage["processed_uri"])
                how = "as recorded when it was verified on this test split"
                if champion_acc is None and carved:
                    champion_acc = recorded_score(store, champion_uri, None)
                    how = (
                        "as recorded on its own test split (this one is carved from training "
                        "images it may have learned)"
                    )
                if champion_acc is None:
                    champion_acc = _score_champion(
                        store, champion_uri, splits["test"], Path(tmp) / "c"
                    )
                    how = "on this test split"
            if champion_acc is not None:
                log.info("champion v%s scores %.4f %s", champion.version, champion_acc, how)

    passed = accuracy >= gate.min_accuracy
    promoted = passed and (gate.force_promote or champion_acc is None or accuracy >= champion_acc)
    if promoted:
        client.set_registered_model_alias(name, gate.alias, version)
    bucket, prefix = parse_s3_uri(model_uri.rstrip("/") + "/")
    result = VerifyModelResult(
        model_uri=model_uri,
        test_accuracy=accuracy,
        min_accuracy=gate.min_accuracy,
        passed=passed,
        registered_model=name,
        version=version,
        alias=gate.alias,
        champion_version=champion.version if champion else None,
        champion_accuracy=champion_acc,
        promoted=promoted,
        verification_uri=s3_uri(bucket, prefix + VERIFICATION),
        # Passed but not promoted means the champion scored higher: its model_uri tag exists.
        serving_uri=model_uri if promoted else champion_uri,
    )
    client.log_metric(lineage["mlflow_run_id"], "verify_test_accuracy", accuracy)
    client.log_metric(lineage["mlflow_run_id"], "verify_promoted", float(promoted))
    client.set_tag(lineage["mlflow_run_id"], "mlops.verified", "passed" if passed else "failed")
    # On the version too, where the registry's readers look: a failed one was like any other.
    client.set_model_version_tag(name, version, GATE_TAG, "passed" if passed else "failed")
    client.set_model_version_tag(name, version, ACCURACY_TAG, f"{accuracy:.4f}")
    doc = {
        **asdict(result),
        "test_split": lineage["processed_uri"],  # what test_accuracy was measured on
        "verified_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store.write_json(bucket, prefix + VERIFICATION, doc)
    if not passed:
        raise GateError(
            f"test accuracy {accuracy:.4f} is below gate.min_accuracy {gate.min_accuracy:.4f}: "
            f"version {version} is not promoted and will not be deployed"
        )
    if not promoted:
        log.info(
            "kept champion v%s (%.4f > %.4f), which deploy serves; set gate.force_promote "
            "to override",
            champion.version if champion else "?",
            champion_acc or 0.0,
            accuracy,
        )
    return result


def _add_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--model-uri",
        type=s3_uri_arg,
        metavar="URI",
        help="the trained model, s3://models/NAME/RUN/",
    )
    model.add_argument(
        "--run-id",
        type=run_id_arg,
        metavar="RUN",
        help="the model pipeline run RUN trained, where this config names it (as "
        "--model-uri s3://BUCKET/NAME/RUN/, with storage.buckets.models and the model name)",
    )


def _model_uri(cfg: PipelineConfig, args: argparse.Namespace) -> str:
    return args.model_uri or resume.model_uri(cfg, args.run_id)


def main(argv: list[str] | None = None) -> int:
    return step_main(
        lambda cfg, store, args: verify_model(cfg, store, _model_uri(cfg, args)),
        "components.verify_model",
        __doc__,
        ["--state-dir"],
        argv,
        _add_args,
    )


if __name__ == "__main__":
    sys.exit(main())
