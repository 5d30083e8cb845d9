"""The end of a local run: its summary for people, and one JSON line for scripts (--json)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from pipelines.config import PipelineConfig
from pipelines.errors import STOPPED, ConfigError
from pipelines.local import RunReport


def split_counts(counts: dict[str, int]) -> str:
    """Image counts in the order the data flows: train, val, test (a reused manifest's JSON
    has them alphabetical, so a second run printed them in another order than the first)."""
    order = ("train", "val", "test")
    ranked = sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 3)
    return ", ".join(f"{k} {v}" for k, v in ranked)


def browse_later(report: RunReport) -> str:
    """How to open this run's MLflow UI once the run's own server has stopped."""
    if report.tracking_uri and not report.embedded_mlflow:
        return "on a tracking server that stays up"
    if report.state_dir:  # `make mlflow-ui` opens the default state dir's
        where = shlex.quote(report.state_dir)
        return f"browse later with `python pipelines/run.py mlflow-ui --state-dir {where}`"
    return "browse later with `make mlflow-ui`"


def summary(report: RunReport) -> str:
    """The readable end of a run: step table, then what was produced."""
    lines = ["", f"{'step':<22}{'status':<11}{'seconds':>8}", "-" * 41]
    for step in report.steps:
        lines.append(f"{step.name:<22}{step.status:<11}{step.seconds:>8.1f}")
    lines.append("-" * 41)
    lines.append(f"{'total':<33}{report.seconds:>8.1f}")
    data = report.result("verify-data")
    features = report.result("feature-engineering")
    trained = report.result("train")
    if data:
        counts = split_counts(data["counts"])
        moved = f"uploaded {data['uploaded']} of {data['objects']} objects"
        lines += [
            "",
            f"dataset     {data['dataset']}: {len(data['classes'])} classes, {counts}",
            f"raw data    {data['manifest_uri']} ({moved})",
        ]
    if features:
        counts = split_counts(features["counts"])
        note = " (unchanged, reused)" if features["skipped"] else ""
        lines.append(f"features    {features['processed_uri']}{note}: {counts}")
    if trained:
        start = trained.get("resumed_from_epoch", 0)
        resumed = f", resumed after epoch {start}" if start else ""
        lines += [
            # The trainer's figures, in its precision (bf16 on most CPUs here); the gate's are
            # the served model's, in fp32, and may differ a little: each says which it is.
            f"accuracy    test {trained['test_accuracy']:.4f}, val {trained['val_accuracy']:.4f}"
            f" in training ({trained['epochs']} epochs{resumed}, {trained['world_size']}"
            f" process(es), {trained['precision']})",
            f"model       {trained['model_uri']}model.safetensors",
            # This attempt's server: a resume that reuses a finished model carries the URL of
            # the attempt that trained it, whose server has gone.
            f"MLflow      {report.tracking_uri or trained['tracking_uri']}/#/experiments/"
            f"{trained['experiment_id']}"
            f"/runs/{trained['mlflow_run_id']} (registered {trained['registered_model']} "
            f"v{trained['version']}; {browse_later(report)})",
        ]
    verified, deployed = report.result("verify-model"), report.result("deploy")
    if verified:
        champion = (
            f"promoted to {verified['alias']}"
            if verified["promoted"]
            else f"{verified['alias']} stays v{verified['champion_version']}"
        )
        if not verified["promoted"] and deployed:  # said only once deploy did it
            champion += ", which is deployed"
        lines.append(
            f"gate        test {verified['test_accuracy']:.4f} as served >= "
            f"{verified['min_accuracy']:.4f}: v{verified['version']} {champion}"
        )
    if deployed:
        state = "serving (Ctrl-C to stop)" if deployed["serving"] else "smoke-tested, stopped"
        lines += [
            f"endpoint    {deployed['endpoint_v1']}  [{state}]",
            f"            {deployed['endpoint_v2']}",
        ]
    if report.embedded_s3:  # its URL and keys died with it: where its objects stay is news
        state_dir = report.state_dir or PipelineConfig.model_fields["state_dir"].default
        where = shlex.quote(str(Path(state_dir) / "s3"))
        lines.append(f"S3 store    embedded, stopped; its objects stay in {where}")
    elif report.storage_endpoint:
        lines.append(f"S3 store    {report.storage_endpoint}")
    if report.error:
        lines += ["", f"FAILED at {report.failed_step or 'start-up'}: {report.error}"]
        # Failed or interrupted in training, not refused: its checkpoints are in the store.
        # And after deploy (a port taken meanwhile), the trained model goes on from its gate.
        # (Not after the gate's verdict: it would judge the same model again; but a gate
        # stopped before one, which left a user to train from the start.)
        goes_on = {
            "train": "training goes on from its last checkpoint",
            "deploy": "its trained model goes on from the gate",
        }.get(report.failed_step or "")
        if report.failed_step == "verify-model" and report.exit_code in STOPPED:
            goes_on = "its trained model goes on from the gate"
        # A refused setting fails again on a resume, except at deploy: a port taken there
        # meanwhile is refused, and the resume takes --port.
        if goes_on and (
            report.exit_code != ConfigError.exit_code or report.failed_step == "deploy"
        ):
            where = f" --state-dir {shlex.quote(report.state_dir)}" if report.state_dir else ""
            lines.append(
                f"resume      python pipelines/run.py --resume {report.run_id}{where} (with its "
                f"settings: {goes_on})"
            )
    return "\n".join(lines)


def as_json(report: RunReport) -> str:
    trained = report.result("train")
    verified = report.result("verify-model")
    deployed = report.result("deploy")
    return json.dumps(
        {
            "status": report.status,
            "failed_step": report.failed_step,
            "error": report.error,
            "seconds": report.seconds,
            "steps": [
                {"name": s.name, "status": s.status, "seconds": s.seconds} for s in report.steps
            ],
            "data": report.result("verify-data"),
            "features": report.result("feature-engineering"),
            "deploy": deployed,
            "run_id": report.run_id,
            "metrics": {k: trained.get(k) for k in ("test_accuracy", "val_accuracy")},
            # The training program's own time and curve, apart from the step's start-up.
            "train": {
                k: trained.get(k)
                for k in (
                    "seconds",
                    "epochs",
                    "resumed_from_epoch",
                    "world_size",
                    "precision",
                    "history",
                )
            },
            "model_uri": trained.get("model_uri"),
            "mlflow": {
                "tracking_uri": report.tracking_uri or None,
                "run_id": trained.get("mlflow_run_id"),
                "registered_model": trained.get("registered_model"),
                "version": trained.get("version"),
                "alias": verified.get("alias") if verified.get("promoted") else None,
            },
            "endpoint": {"v1": deployed.get("endpoint_v1"), "v2": deployed.get("endpoint_v2")}
            if deployed.get("serving")
            else None,
        }
    )
