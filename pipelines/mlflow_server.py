"""The local MLflow server: sqlite in the state dir, artifacts proxied to the S3 `mlflow` bucket."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from pipelines import state_lock
from pipelines.config import PipelineConfig, mlflow_env
from pipelines.mlflow_runs import fail_left_running
from pipelines.processes import (
    HOST,
    free_port,
    process_ended,
    start_service,
    terminate,
    wait_http_ok,
)

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("mlops.mlflow")

# The local server, for the steps that wait on it: "PID:LOG". Its death ends their wait at once,
# and its log, not MLFLOW_TRACKING_URI, is what they point to.
LOCAL_SERVER_ENV = "MLOPS_LOCAL_MLFLOW"
DB_NAME = "mlflow.db"
READY_TIMEOUT_S = 90.0  # about 5 s on 2 idle cores; slower while the data steps run


def wait_healthy(
    uri: str,
    timeout_s: float,
    proc: subprocess.Popen | None = None,
    hint: str = "check MLFLOW_TRACKING_URI, or unset it to use a local server",
) -> None:
    """Poll <uri>/health until it answers 200, the process exits, or the time is up."""
    wait_http_ok(
        f"{uri.rstrip('/')}/health", timeout_s, proc, f"the MLflow server at {uri}", hint, "healthy"
    )


class ServerPid:
    """The run's own MLflow server, polled as a process by a step or a trainer that did not
    start it: it exits, or not. Its exit code is the driver's to read (returncode says "?")."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: str | None = None

    def poll(self) -> str | None:
        if self.returncode is None and process_ended(self.pid):
            self.returncode = "?"
        return self.returncode


def local_server() -> tuple[ServerPid, str] | None:
    """The run's own server, as LOCAL_SERVER_ENV names it to the steps and the trainer: the
    process to watch, and what to read when it has gone (its log). None for another server."""
    pid, _, log_path = os.environ.get(LOCAL_SERVER_ENV, "").partition(":")
    return (ServerPid(int(pid)), f"see {log_path}") if pid.isdigit() else None


def wait_tracking(uri: str, timeout_s: float) -> None:
    """wait_healthy, in a step or the trainer: the run's own server's exit ends the wait at
    once, and its log is named; a restarted trainer waited wait_s for a server that had died."""
    local = local_server()
    wait_healthy(uri, timeout_s, *(local or ()))  # type: ignore[arg-type]


# MLflow's client retries a refused connection 7 times, backing off to 2 minutes: about 4
# minutes a call, and a trainer makes several. A server that has gone fails a step in seconds.
# Set as a command starts (cli.run_main), not at an import: a step or trainer forked from the
# fork server gets its environment after its imports, and one set then was lost.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def bound_retries() -> None:
    """CLIENT_ENV in this process's environment, where it does not set its own values."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def create_database(db: Path) -> None:
    """A new sqlite store, built aside and renamed into place once whole. MLflow builds one
    through some sixty alembic migrations (seconds); a server stopped among them (a Ctrl-C,
    or a run that failed that early) left a half-migrated database that every later start
    refused. An existing database is left to MLflow, as is any other store."""
    if db.exists():
        return
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    new = db.with_name(db.name + ".new")
    for leftover in (new, new.with_name(new.name + "-journal")):  # from an interrupted build
        leftover.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{new}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(new, db)


def local_workdir(state_dir: Path) -> Path:
    """The local server's folder in a state dir: its database, log and scratch space."""
    return state_dir / "mlflow"


def local_db(state_dir: Path) -> Path:
    return local_workdir(state_dir) / DB_NAME


def with_tracking(cfg: PipelineConfig, uri: str) -> PipelineConfig:
    """The same config, pointed at a running tracking server."""
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})


class LocalMlflow:
    """`mlflow server` on 127.0.0.1. start() returns at once; wait() blocks until healthy."""

    def __init__(
        self,
        cfg: PipelineConfig,
        workdir: Path,
        port: int = 0,
        extra_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ):
        self.cfg = cfg
        self.workdir = workdir
        self.port = port  # 0: a free one
        self.extra_args = extra_args  # e.g. ("--app-name", "basic-auth") as in production
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir.resolve() / "server.log"

    def start(self) -> LocalMlflow:
        storage = self.cfg.storage
        assert storage.endpoint and storage.access_key and storage.secret_key
        scratch = self.workdir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        # The server, not the clients, holds the S3 keys: artifacts are proxied through it.
        env = dict(
            os.environ,
            MLFLOW_S3_ENDPOINT_URL=storage.endpoint,
            AWS_ACCESS_KEY_ID=storage.access_key.get_secret_value(),
            AWS_SECRET_ACCESS_KEY=storage.secret_key.get_secret_value(),
            AWS_DEFAULT_REGION=storage.region,
            TMPDIR=str(scratch),  # its db lock files too stay in the state dir
            **mlflow_env(self.cfg.mlflow),  # also what the UI's /telemetry endpoint answers
        )
        env.update(self.extra_env)
        db = (self.workdir / DB_NAME).resolve()
        if state_lock.held(self.cfg.state_dir):  # no trainer can be writing a run, then
            fail_left_running(db)
        cmd = [
            sys.executable,
            "-m",
            "pipelines.mlflow_serve",  # `mlflow server`, in one process
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{storage.buckets.mlflow}/artifacts",
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as out:
            self.proc = start_service(cmd, env, out, cwd=ROOT)
        return self

    def env(self) -> dict[str, str]:
        """LOCAL_SERVER_ENV for the steps, once started."""
        assert self.proc is not None
        return {LOCAL_SERVER_ENV: f"{self.proc.pid}:{self.log_path}"}

    def wait(self) -> str:
        # This server is ours: its log, not the user's MLFLOW_TRACKING_URI, says what failed.
        wait_healthy(self.uri, READY_TIMEOUT_S, self.proc, f"see {self.log_path}")
        log.info("MLflow server on %s (UI and API)", self.uri)
        return self.uri

    def stop(self) -> None:
        """SIGTERM: uvicorn shuts down gracefully, closing the database, then ends the
        process by that signal, without its interpreter's teardown."""
        proc, self.proc = self.proc, None
        terminate(proc, timeout_s=15)
