"""MLflow tracking for rank 0: one run per training (found again on resume), plots, the model."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display in pods or CI
import matplotlib.pyplot as plt
import mlflow
import torch
from mlflow.models import infer_signature
from torch import nn

from pipelines.config import PipelineConfig
from pipelines.errors import ConfigError, PipelineError, server_said
from pipelines.mlflow_runs import RUN_TAG
from pipelines.mlflow_server import local_server, wait_tracking
from pipelines.registry import MODEL_URI_TAG
from training.resume import RESUME_FREE

log = logging.getLogger("mlops.tracking")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    def __init__(
        self,
        uri: str,
        run_id: str,
        experiment_id: str,
        registered_name: str,
        label_smoothing: float = 0.0,
    ):
        self.uri = uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.registered_name = registered_name
        self.label_smoothing = label_smoothing

    @classmethod
    def start(
        cls,
        cfg: PipelineConfig,
        pipeline_run_id: str,
        world: int,
        meta: dict,
        commit: str,
        precision: str,
    ) -> Tracker:
        uri = cfg.mlflow.tracking_uri
        if not uri:
            raise ConfigError("mlflow.tracking_uri is unset: set MLFLOW_TRACKING_URI")
        wait_tracking(uri, cfg.mlflow.wait_s)
        mlflow.set_tracking_uri(uri)
        try:
            mlflow.set_experiment(cfg.mlflow.experiment)
            found = mlflow.search_runs(
                filter_string=f"tags.`{RUN_TAG}` = '{pipeline_run_id}'", output_format="list"
            )
            run = mlflow.start_run(
                run_id=found[0].info.run_id if found else None,
                run_name=None if found else pipeline_run_id,
                log_system_metrics=True,
            )
            if found:
                # Params are immutable, and a resume may change these: the values it ran
                # under are tags, else the run misstated how its model was evaluated.
                # Kept up to date once set: a later resume back to the param's value said
                # the run's previous one.
                params, tags, changed = found[0].data.params, found[0].data.tags, {}
                for key in sorted(RESUME_FREE):
                    tag, value = f"mlops.resumed.train.{key}", str(getattr(cfg.train, key))
                    if tag in tags or params.get(f"train.{key}") != value:
                        changed[tag] = value
                if changed:
                    mlflow.set_tags(changed)
            else:
                mlflow.log_params(flatten(cfg.public_dict()))
                mlflow.set_tags(
                    {
                        RUN_TAG: pipeline_run_id,
                        "mlops.manifest_sha256": meta["manifest_sha256"],
                        "mlops.feature_hash": meta["feature_hash"],
                        "mlops.git_commit": commit,
                        "mlops.world_size": str(world),
                        # What train.precision=auto resolved to on this hardware.
                        "mlops.precision": precision,
                    }
                )
        except mlflow.MlflowException as exc:
            # Another web server at the URI answered a whole HTML page, which the error
            # quoted; a 4xx fails each restart the same way.
            refused = PipelineError(
                f"MLflow at {uri} refused the run: {server_said(exc)}; check that "
                "MLFLOW_TRACKING_URI names an MLflow server, and its login"
            )
            refused.final = 400 <= exc.get_http_status_code() < 500
            raise refused from None
        log.info("MLflow run %s at %s", run.info.run_id, uri)
        return cls(
            uri,
            run.info.run_id,
            run.info.experiment_id,
            cfg.model_name,
            cfg.train.label_smoothing,
        )

    @contextlib.contextmanager
    def calls(self) -> Iterator[None]:
        """MLflow's failure in training as one line (its retries spent): it was a traceback of
        five chained exceptions. Where the run's own server has gone, that is what it says."""
        try:
            yield
        except mlflow.MlflowException as exc:
            local = local_server()
            if local is not None and local[0].poll() is not None:
                raise PipelineError(
                    f"the run's MLflow server at {self.uri} exited: {local[1]}"
                ) from None
            raise PipelineError(f"MLflow at {self.uri} failed: {exc.message}") from None

    def backfill(self, history: list[dict[str, float]]) -> None:
        """After a resume, log the epochs the checkpoint has but MLflow missed."""
        if not history:
            return
        client = mlflow.MlflowClient()
        # train_loss, not val: every epoch has it, whatever train.eval_every skips.
        with self.calls():
            logged = {m.step for m in client.get_metric_history(self.run_id, "train_loss")}
        for row in history:
            if row["epoch"] not in logged:
                self.log_epoch(row)

    def log_epoch(self, row: dict[str, float]) -> None:
        metrics = {k: v for k, v in row.items() if k != "epoch"}
        with self.calls():
            mlflow.log_metrics(metrics, step=int(row["epoch"]))

    def finish(
        self,
        model: nn.Module,
        example: torch.Tensor,
        metrics: dict[str, float],
        history: list[dict[str, float]],
        confusion: torch.Tensor,
        classes: list[str],
        sha256: str,
        model_uri: str,
    ) -> str:
        """Final metrics, plots, and the model, registered as a new version. Returns it."""
        client = mlflow.MlflowClient()
        before = registered_version(client, self.registered_name, self.run_id)
        if before is not None:
            # Registered by this run before it was stopped (a resume from the last epoch):
            # once more would make a second version of the same weights, the first orphaned.
            log.info(
                "%s v%s is this run's, registered before it was stopped",
                self.registered_name,
                before,
            )
            client.set_model_version_tag(self.registered_name, before, MODEL_URI_TAG, model_uri)
            return before
        mlflow.set_tag("mlops.model_sha256", sha256)
        curves = _curves(history, self.label_smoothing)
        mlflow.log_figure(curves, "plots/training_curves.png")
        mlflow.log_figure(_confusion(confusion, classes), "plots/confusion_matrix.png")
        plt.close("all")
        cpu = _cpu_copy(model)
        with torch.no_grad():
            logits = cpu(example)
        info = mlflow.pytorch.log_model(
            cpu,
            name="model",
            serialization_format="pt2",  # torch.export: no pickle
            input_example=example.numpy(),
            signature=infer_signature(example.numpy(), logits.numpy()),
            # Listing them explicitly saves the ~8 s MLflow spends inferring them.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            # MLflow would load this copy back and predict the example once more (1.2-1.5 s
            # here); the served weights are checked by verify-model and deploy instead.
            validate_serving_input=False,
            registered_model_name=self.registered_name,
            await_registration_for=60,
        )
        # The model's own figures, linked to it so that MLflow's model page shows them: the test
        # ones, and val as the model is served (with flip TTA, not the last epoch's one view).
        final = {k: v for k, v in metrics.items() if k.startswith("test_")}
        final["final_val_accuracy"] = metrics["val_accuracy"]
        mlflow.log_metrics(final, step=len(history), model_id=info.model_id)
        version = str(info.registered_model_version)
        # verify-model finds a champion's weights (and the server its model) through this tag.
        client.set_model_version_tag(self.registered_name, version, MODEL_URI_TAG, model_uri)
        return version


def registered_version(client: mlflow.MlflowClient, name: str, run_id: str) -> str | None:
    """The version of `name` that MLflow run `run_id` registered, if it did (the latest)."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in found)) if found else None


def _cpu_copy(model: nn.Module) -> nn.Module:
    cpu = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float()
    return cpu.eval()


def _curves(history: list[dict[str, float]], label_smoothing: float = 0.0) -> plt.Figure:
    """Loss and accuracy against the epoch, train and val. The train loss is the one trained
    on, with label smoothing; val's is plain cross-entropy: the legend says so, since a smoothed
    loss cannot fall near zero and read beside val's it looked like underfitting."""
    validated = [r for r in history if "val_accuracy" in r]  # train.eval_every may skip some
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 4))
    smoothed = f" (label smoothing {label_smoothing:g})" if label_smoothing else ""
    for ax, name in ((loss, "loss"), (acc, "accuracy")):
        train = "train" + (smoothed if name == "loss" else "")
        ax.plot([r["epoch"] for r in history], [r[f"train_{name}"] for r in history], label=train)
        ax.plot([r["epoch"] for r in validated], [r[f"val_{name}"] for r in validated], label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _confusion(confusion: torch.Tensor, classes: list[str]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image)
    fig.tight_layout()
    return fig


def end(status: str) -> None:
    """End the active run, if any, with FINISHED or FAILED. A server that cannot be reached
    (its retries spent) is a warning: this runs as the trainer ends, however it ends, and the
    error that ends it is already said; a failed train step marks the run FAILED itself."""
    if mlflow.active_run() is None:
        return
    try:
        mlflow.end_run(status)
    except mlflow.MlflowException as exc:
        log.warning("could not end MLflow run as %s: %s", status, exc.message)
