"""Step train: training/train.py on this machine (pipelines/launcher), or as a PyTorchJob."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from datetime import UTC, datetime

import yaml

from data import processed
from pipelines import warm
from pipelines.cli import run_id_arg, s3_uri_arg, step_main
from pipelines.config import PipelineConfig, mlflow_env, storage_env
from pipelines.errors import (
    REPORT_ENV,
    ConfigError,
    PipelineError,
    exit_words,
    reported,
)
from pipelines.launcher import Ready, run_single, run_torchrun
from pipelines.mlflow_runs import fail_abandoned
from pipelines.mlflow_server import ServerPid, local_server, wait_healthy
from pipelines.storage import ObjectStore, parse_s3_uri
from training import resume
from training.dist import usable_cores
from training.precision import check_here
from training.result import TrainResult

log = logging.getLogger("mlops.train_step")


# A local run's id: its folder in the state dir and its prefix in the models bucket.
RUN_ID = re.compile(r"run-\d{8}-\d{6}-[0-9a-f]{4}")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def check_ranks(cfg: PipelineConfig) -> int:
    """The batch splits evenly over the ranks: torchrun's `workers` here, `workers` replicas of
    `nproc_per_node` processes in a PyTorchJob. Returns their number."""
    tc = cfg.train
    ranks = tc.workers * (tc.nproc_per_node if cfg.runtime == "kubernetes" else 1)
    if tc.batch_size % ranks:
        lower, higher = tc.batch_size // ranks * ranks, -(-tc.batch_size // ranks) * ranks
        sizes = f"{lower} or {higher}" if lower else str(higher)
        raise ConfigError(
            f"train.batch_size={tc.batch_size} must be a multiple of {ranks} ranks, which each "
            f"take an equal share of the batch: set train.batch_size to {sizes}, or train on a "
            "number of ranks that divides it"
        )
    if tc.batch_size // ranks < 2:
        # BatchNorm has no spread to normalise by in one image whose last feature map is 1x1
        # (32 px input, the imagenet stem): the trainer failed mid-run, on each restart.
        raise ConfigError(
            f"train.batch_size={tc.batch_size} gives each of {ranks} rank(s) one image a step, "
            f"and BatchNorm needs at least 2: set train.batch_size to {2 * ranks} or more"
        )
    return ranks


def check_feasible(cfg: PipelineConfig, store: ObjectStore, processed_uri: str) -> None:
    """Fail before any process starts when the data cannot satisfy the config."""
    bucket, prefix = parse_s3_uri(processed_uri.rstrip("/") + "/")
    meta = processed.load(store, bucket, prefix)
    made = meta.get("dataset")
    if made not in (None, cfg.dataset.key) and not cfg.serving.model_name:
        # The config's dataset names the model, its versions and the champion the gate
        # compares it with: another dataset's name would meet another task's champion.
        given = f"--dataset {meta['name']}"
        if made != meta["name"]:
            given += f" --set dataset.id={made}"
        raise ConfigError(
            f"{processed_uri} holds features of dataset {made}, but the config's dataset is "
            f"{cfg.dataset.key}, after which the model would be named ({cfg.model_name}): "
            f"pass {given}, or name the model with --set serving.model_name=NAME"
        )
    ranks = check_ranks(cfg)
    tc, counts = cfg.train, meta["counts"]
    if counts["train"] < tc.batch_size:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} exceeds the {counts['train']} training images: "
            "lower the batch size or use more data"
        )
    # Each rank evaluates its share of val and test: a rank with none would skip the forward
    # pass whose collective (DDP's buffer broadcast) the others wait in, until the timeout.
    for split in ("val", "test"):
        if counts[split] < ranks:
            raise ConfigError(
                f"the {split} split holds {counts[split]} image(s), fewer than the {ranks} "
                "ranks: train with fewer workers or use more data"
            )


def check_run_id(cfg: PipelineConfig, store: ObjectStore, processed_uri: str, run_id: str) -> None:
    """A run id that holds a checkpoint of another config or data is refused now, from the
    checkpoint's small state object. The trainer refuses it too, but only after its start;
    under torchrun, whose agent restarts any failed worker, max_restarts times over."""
    bucket, _, prefix = resume.location(cfg, run_id)
    state = resume.load_state(store, bucket, prefix)
    if state is not None:
        resume.check_resumable(state, resume.config_hash(cfg, processed_uri), bucket, prefix)


def tracking_ready(uri: str, wait_s: float) -> Ready:
    """The tracking server may still be starting (a local one starts beside the data steps):
    the launcher waits for it while the trainer imports torch and loads the data, not before.
    The trainer's exit ends the wait too: its exit code then says why, where a config error
    would otherwise wait wait_s and be blamed on the tracking server."""
    local = local_server()  # the run's own: its exit ends the wait too, and its log is named

    def ready(trainer: warm.Process) -> None:
        watched, hint = (EitherExit(trainer, local[0]), local[1:]) if local else (trainer, ())
        try:
            wait_healthy(uri, wait_s, watched, *hint)  # type: ignore[arg-type]
        except PipelineError:
            if trainer.poll() is None:  # the server's failure, not the trainer's
                raise

    return ready


class EitherExit:
    """A trainer and the run's MLflow server, polled as one process that exits when either
    does."""

    def __init__(self, trainer: warm.Process, server: ServerPid):
        self.trainer, self.server = trainer, server
        self.returncode: int | str | None = None

    def poll(self) -> int | str | None:
        self.returncode = self.trainer.poll()
        if self.returncode is None:
            self.returncode = self.server.poll()
        return self.returncode


def train_model(
    cfg: PipelineConfig, store: ObjectStore, processed_uri: str, run_id: str | None = None
) -> TrainResult:
    """Run training/train.py (torchrun for several workers, one process for one) and return
    what rank 0 recorded."""
    run_id = run_id or new_run_id()
    if not cfg.mlflow.tracking_uri:
        raise ConfigError("mlflow.tracking_uri is unset: set MLFLOW_TRACKING_URI")
    if cfg.runtime == "local":
        check_here(cfg.train.precision)
    check_feasible(cfg, store, processed_uri)
    check_run_id(cfg, store, processed_uri, run_id)
    if (done := resume.completed(store, cfg, run_id)) is not None:
        # A resumed run stopped after its model was complete: the model it registered, as is.
        log.info("run %s trained its model before it was stopped: going on with it", run_id)
        return done
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
    program = [
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
    # Where a rank's expected error lands (torchrun's own exit code is 1 whatever the rank's):
    # the step then fails with that message and exit code, a config error as exit 2.
    error_report = run_dir / "train-error.json"
    error_report.unlink(missing_ok=True)
    env[REPORT_ENV] = str(error_report)
    ready = tracking_ready(cfg.mlflow.tracking_uri, cfg.mlflow.wait_s)
    log.info("%s: %d process(es), run %s", "torchrun" if workers > 1 else "train", workers, run_id)
    if workers == 1:
        logs = run_dir / "train-logs"
        code, attempts = run_single(program, env, cfg.train.max_restarts, logs, ready)
        tries = f"{attempts} attempt(s)"
    else:
        logs = run_dir / "torchrun"
        code = run_torchrun(program, env, workers, cfg.train.max_restarts, logs, ready)
        tries = f"up to {cfg.train.max_restarts} restart(s)"
    if code != 0 or not result_file.exists():
        fail_abandoned(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, run_id)
        where = f"training {exit_words(code)}, after {tries}; logs in {logs}"
        error = reported(error_report)
        if error is not None:
            failed = type(error)(f"{error} ({where})")
            failed.final = error.final  # on a cluster, Argo's retry reads it (errors.FINAL_MARK)
            raise failed
        raise PipelineError(f"training failed ({where}); the rank logs above say why")
    return TrainResult(**json.loads(result_file.read_text()))


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processed",
        required=True,
        type=s3_uri_arg,
        metavar="URI",
        help="feature-engineering's output, s3://processed-data/ID/HASH/",
    )
    parser.add_argument(
        "--run-id",
        type=run_id_arg,
        metavar="ID",
        help="pipeline run id; the same id resumes (default: a new one)",
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
