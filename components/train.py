"""Step train: training/train.py under torchrun here, or as a PyTorchJob (components/pytorchjob)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml

from pipelines.cli import step_main
from pipelines.config import PipelineConfig, mlflow_env, storage_env
from pipelines.errors import ConfigError, DataError, PipelineError
from pipelines.mlflow_server import wait_healthy
from pipelines.processes import terminate
from pipelines.storage import ObjectStore, parse_s3_uri
from training.dist import usable_cores
from training.result import TrainResult

log = logging.getLogger("mlops.train_step")
ROOT = Path(__file__).resolve().parent.parent


def new_run_id() -> str:
    return datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def check_feasible(cfg: PipelineConfig, store: ObjectStore, processed_uri: str) -> None:
    """Fail before any process starts when the data cannot satisfy the config."""
    bucket, prefix = parse_s3_uri(processed_uri.rstrip("/") + "/")
    meta = store.read_json(bucket, prefix + "metadata.json")
    if meta is None:
        raise DataError(f"{processed_uri} has no metadata.json: run feature-engineering first")
    tc, n = cfg.train, meta["counts"]["train"]
    ranks = tc.workers * tc.nproc_per_node
    if tc.batch_size % ranks:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be a multiple of {ranks} ranks")
    if n < tc.batch_size:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} exceeds the {n} training images: "
            "lower the batch size or use more data"
        )


def train_model(
    cfg: PipelineConfig, store: ObjectStore, processed_uri: str, run_id: str | None = None
) -> TrainResult:
    """Launch `torchrun --nproc_per_node=<workers>` and return what rank 0 recorded."""
    run_id = run_id or new_run_id()
    if not cfg.mlflow.tracking_uri:
        raise ConfigError("mlflow.tracking_uri is unset: set MLFLOW_TRACKING_URI")
    check_feasible(cfg, store, processed_uri)
    if cfg.runtime == "kubernetes":
        from components.pytorchjob import run_pytorchjob

        return run_pytorchjob(cfg, store, processed_uri, run_id)

    run_dir = (cfg.state_dir / "runs" / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # The resolved config travels as a file; the credentials travel only in the environment.
    config_file = run_dir / "train-config.yaml"
    public = cfg.model_dump(mode="json", exclude={"storage": {"access_key", "secret_key"}})
    config_file.write_text(yaml.safe_dump(public, sort_keys=False))
    result_file = run_dir / "train-result.json"
    result_file.unlink(missing_ok=True)
    workers = cfg.train.workers
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={workers}",
        f"--max-restarts={cfg.train.max_restarts}",
        "--tee=3", "--log-line-prefix-template=[rank${rank}] ",
        f"--log-dir={run_dir / 'torchrun'}",
        "-m", "training.train",
        "--processed", processed_uri, "--run-id", run_id,
        "--result", str(result_file), "--profile", cfg.profile, "--config", str(config_file),
    ]  # fmt: skip
    env = dict(
        os.environ,
        **storage_env(cfg.storage),
        **mlflow_env(cfg.mlflow),  # run_step set it already; the step's own CLI has not
        MLFLOW_TRACKING_URI=cfg.mlflow.tracking_uri,
        OMP_NUM_THREADS=str(max(1, usable_cores() // workers)),
        PYTHONUNBUFFERED="1",
    )
    log.info("torchrun: %d process(es), run %s", workers, run_id)
    # Worker output goes to stderr, so this step's stdout carries only its JSON result.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sys.stderr)
    try:
        # The tracking server may still be starting (a local one starts beside the data steps):
        # wait for it while the workers import torch and load the data, not before.
        wait_healthy(cfg.mlflow.tracking_uri, cfg.mlflow.wait_s)
        proc.wait()
    except BaseException:
        terminate(proc)
        raise
    if proc.returncode != 0 or not result_file.exists():
        raise PipelineError(
            f"training failed (torchrun exit code {proc.returncode}, after up to "
            f"{cfg.train.max_restarts} restart(s)); the rank logs above and in "
            f"{run_dir / 'torchrun'} say why"
        )
    return TrainResult(**json.loads(result_file.read_text()))


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processed",
        required=True,
        metavar="URI",
        help="feature-engineering's output, s3://processed-data/ID/HASH/",
    )
    parser.add_argument(
        "--run-id", metavar="ID", help="pipeline run id; the same id resumes (default: a new one)"
    )


def main(argv: list[str] | None = None) -> int:
    return step_main(
        lambda cfg, store, args: train_model(cfg, store, args.processed, args.run_id),
        "components.train",
        __doc__,
        ["--epochs", "--workers", "--state-dir"],
        argv,
        _add_args,
    )


if __name__ == "__main__":
    sys.exit(main())
