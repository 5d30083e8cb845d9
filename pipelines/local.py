"""The local driver: the KFP pipeline run by kfp.local, beside embedded S3 and MLflow servers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from components.train import RUN_ID, check_ranks, new_run_id
from pipelines import state_lock
from pipelines.cli import check_state_dir, check_storage, open_store
from pipelines.config import (
    ENV_VARS,
    PipelineConfig,
    config_overrides,
    mlflow_env,
    public_json,
    storage_env,
)
from pipelines.errors import STOPPED, ConfigError, PipelineError, exit_words, stopped_by
from pipelines.kfp_task import forked_tasks
from pipelines.mlflow_server import LocalMlflow, local_workdir, with_tracking
from pipelines.processes import require_free
from pipelines.steps import STEPS, record_path
from pipelines.storage import ObjectStore, s3_uri
from pipelines.warm import fork_server
from serving.launch import MODEL_JSON
from training import resume
from training.precision import check_here

log = logging.getLogger("mlops.local")
ROOT = Path(__file__).resolve().parent.parent
SETTINGS = "settings.json"  # in a run's folder: what --resume restores


@dataclass
class StepReport:
    name: str
    status: str = "skipped"  # succeeded | failed | interrupted | skipped
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    run_id: str = ""
    status: str = "running"
    failed_step: str | None = None
    error: str | None = None
    exit_code: int = 0
    storage_endpoint: str = ""
    tracking_uri: str = ""
    embedded_mlflow: bool = False  # the run's own server, which stops with it
    embedded_s3: bool = False  # likewise, on a port and with keys of this run only
    state_dir: str = ""  # as the command that resumes the run names it: empty for the default
    steps: list[StepReport] = field(default_factory=list)
    seconds: float = 0.0

    def result(self, step: str) -> dict[str, Any]:
        return next((s.result for s in self.steps if s.name == step), {})


def process_values(cfg: PipelineConfig) -> dict[str, str]:
    """What every process of a run inherits: the repository on the import path, the state
    dir for temporary files and library caches, and MLflow's telemetry switch."""
    scratch = (cfg.state_dir / "tmp").resolve()
    (scratch / "matplotlib").mkdir(parents=True, exist_ok=True)
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(scratch),
        "MPLCONFIGDIR": str(scratch / "matplotlib"),
        **mlflow_env(cfg.mlflow),
    }


def step_values(cfg: PipelineConfig) -> dict[str, str]:
    """What each step process inherits besides: the store's and tracker's addresses and keys
    (never in the pipeline's parameters)."""
    return {
        **storage_env(cfg.storage),
        "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri or "",
        **process_values(cfg),
    }


@contextlib.contextmanager
def step_environment(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in this process's environment for the block (the step processes inherit
    it), and restore what was there after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_before_run(cfg: PipelineConfig) -> None:
    """Refuse now (exit 2) what would fail the run later and is known before it starts. The
    config model cannot check these: the same config may be compiled for a cluster, whose
    GPUs and ports are its own."""
    check_state_dir(cfg)
    check_storage(cfg)
    check_ranks(cfg)
    if cfg.runtime == "local":  # train and deploy run on this machine
        cfg.dataset.source_path()  # --data of no such path: before any service starts
        check_here(cfg.train.precision)
        require_free(cfg.serving.port, "serving.port")
    elif not (cfg.storage.endpoint and cfg.mlflow.tracking_uri):
        # It failed at train, after the data steps, and offered a --resume that could not help.
        raise ConfigError(
            "runtime=kubernetes trains and serves in the cluster, whose pods cannot reach this "
            "run's embedded S3 and MLflow servers on 127.0.0.1: set MINIO_ENDPOINT and "
            "MLFLOW_TRACKING_URI to servers the cluster reaches, or run it there with `submit`"
        )


class QuietKfp:
    """kfp.local's stdout, passed on to `out` less KFP's bookkeeping: each step process logs
    its whole executor input (the config as one line of ~1,800 characters) and where it
    loaded its component from, and the driver logs each step's output again, which the
    summary shows. The steps' own lines, the task boundaries and the failures pass. (A log
    level cannot do this: kfp.local logs on the root logger, which it resets to INFO for each
    task, and the step processes set up their logging themselves.)"""

    INDENT = "    "  # kfp.local's, before every line of a step process
    NOISE = (
        "Looking for component",
        "Loading KFP component",
        "Wrote executor output file",
        "Did not write output file",
    )

    def __init__(self, out: TextIO):
        self.out = out
        self.pending = ""
        self.in_input = False  # inside the JSON dump of an executor input

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if self.keep(line):
                self.out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def keep(self, line: str) -> bool:
        if self.in_input:
            body = line.removeprefix(self.INDENT)
            if body == "}":  # the dump's last line
                self.in_input = False
                return False
            if body.startswith((" ", "{")):
                return False
            self.in_input = False  # not JSON: the dump ended unseen, so show this line
        if line.startswith(self.INDENT + "[KFP Executor "):
            self.in_input = line.endswith("Got executor_input:")
            return not self.in_input and not any(n in line for n in self.NOISE)
        task_outputs = " - INFO - Task " in line and line.endswith(" outputs:")
        return not (task_outputs or line.startswith(self.INDENT + "Output: "))

    def __enter__(self) -> QuietKfp:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pending:
            self.out.write(self.pending)
        self.pending = ""
        self.flush()


def run_kfp_local(cfg: PipelineConfig, run_dir: Path, run_id: str, serve: bool) -> list[int]:
    """Execute the KFP pipeline with kfp.local's subprocess runner; it writes in the state dir.
    Returns the steps' exit codes, in the order they ended."""
    from kfp import local

    from pipelines.kfp_pipeline import build_pipeline

    # The local runner executes each component in this environment rather than in its image;
    # that is the point here, so KFP's warning about it is noise.
    warnings.filterwarnings("ignore", message="You may be attemping", category=RuntimeWarning)
    # Nor its warning that the tasks' requests and limits (for a cluster) do nothing here.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    kfp_dir = (cfg.state_dir / "kfp").resolve()
    (kfp_dir / "workspace").mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(kfp_dir / "outputs"),
        workspace_root=str(kfp_dir / "workspace"),
        raise_on_error=False,  # the step records say what failed; the report says it once
    )
    with forked_tasks() as codes:  # each step's process forks from the fork server, if any
        build_pipeline(cfg)(
            config=public_json(cfg), run_dir=str(run_dir), run_id=run_id, serve=serve
        )
    return codes


def collect(report: RunReport, run_dir: Path, last_code: int | None = None) -> None:
    """Fill the report from the steps' records; last_code: the exit code of the last step."""
    for rep in report.steps:
        path = record_path(run_dir, rep.name)
        if not path.exists():
            if report.failed_step is None and report.exit_code == 0:
                # No record: the step died before writing one (a crash, not a checked error).
                rep.status, report.failed_step, report.exit_code = "failed", rep.name, 1
                report.error = crashed(rep.name, last_code)
            continue
        record = json.loads(path.read_text())
        rep.status, rep.seconds = record["status"], record["seconds"]
        if record.get("exit_code") in STOPPED:  # by Ctrl-C or SIGTERM, not failed by itself
            rep.status = "interrupted"
        rep.result = record.get("result", {})
        if rep.status in ("failed", "interrupted"):
            report.failed_step, report.error = rep.name, record["error"]
            report.exit_code = record["exit_code"]


def crashed(step: str, code: int | None) -> str:
    """A step that ended without its record: its own log says why, unless a signal killed it
    (a SIGKILL prints nothing), and then the signal is all there is to say."""
    if code is not None and code < 0:
        return f"{step} was {exit_words(code)}"
    how = f" ({exit_words(code)})" if code is not None else ""
    return f"{step} crashed{how}; its log above says why"


def start_fork_server(cfg: PipelineConfig, run_dir: Path, stack: contextlib.ExitStack) -> dict:
    """The run's fork server (pipelines/warm.py), started first, before the store: its imports
    up to the trainer's are the run's longest chain before the first epoch (about 8 s). The
    variable that points the steps at it, or none where `fork_server` is off."""
    if not cfg.fork_server:
        return {}
    # Imports read a few variables (MLflow's telemetry switch, matplotlib's cache dir): the
    # server imports under those the steps get. It holds no store keys: each child gets its
    # step's environment with its request.
    env = {**os.environ, **process_values(cfg)}
    return stack.enter_context(fork_server(env, run_dir / "fork-server.log"))


def save_settings(cfg: PipelineConfig, run_dir: Path) -> None:
    """The run's profile and the settings its flags and config file chose, as `--set` values:
    `--resume` restores them, so that its one printed line resumes the run as it was. What
    the environment sets (endpoints, the state dir) stays the environment's."""
    env = set(ENV_VARS.values())
    if cfg.dataset.source:  # as typed, relative to where the run started, maybe not the resume
        source = str(Path(cfg.dataset.source).expanduser().absolute())
        cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"source": source})})
    sets = [f"{k}={v}" for k, v in config_overrides(cfg).items() if k not in env]
    new = run_dir / (SETTINGS + ".new")
    new.write_text(json.dumps({"profile": cfg.profile, "set": sets}, indent=1) + "\n")
    new.replace(run_dir / SETTINGS)  # whole or not at all


def stored_settings(cfg: PipelineConfig, run_id: str) -> dict[str, Any] | None:
    """What save_settings kept of a run; None for a run started before it kept any."""
    path = cfg.state_dir / "runs" / run_id / SETTINGS
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {run_id}: {path} cannot be read ({exc})") from None
    if not (
        isinstance(stored, dict)
        and isinstance(stored.get("profile"), str)
        and isinstance(stored.get("set"), list)
        and all(isinstance(x, str) for x in stored["set"])
    ):
        raise ConfigError(f"--resume {run_id}: {path} is not a run's settings file")
    return stored


def check_resume(cfg: PipelineConfig, run_id: str) -> None:
    """--resume names a run of this state dir (and no path: it becomes one)."""
    runs = cfg.state_dir / "runs"
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(
            f"--resume {run_id!r} is not a run id (run-YYYYMMDD-HHMMSS-xxxx, as a run's summary "
            f"and {runs} show)"
        )
    if not (runs / run_id).is_dir():
        known = sorted(p.name for p in runs.glob("run-*") if p.is_dir())
        latest = f"; the latest is {known[-1]}" if known else ""
        raise ConfigError(f"--resume {run_id}: no such run in {runs}{latest}")


def refuse_completed(cfg: PipelineConfig, store: ObjectStore, run_id: str, run_dir: Path) -> None:
    """A run that deployed its model has nothing to resume. One stopped after its model was
    complete, before deploy, goes on from its gate: the train step reuses the model. (It was
    refused, its model never gated nor deployed, and no command went on with it.) Only a
    deploy record that says so refuses it: a resume stopped at its start, after it cleared
    the earlier attempt's records, leaves none, and was refused from then on."""
    bucket, prefix, _ = resume.location(cfg, run_id)
    deploy = record_path(run_dir, "deploy")
    deployed = deploy.exists() and json.loads(deploy.read_text()).get("status") == "succeeded"
    if deployed and store.stat(bucket, prefix + MODEL_JSON) is not None:
        raise ConfigError(
            f"--resume {run_id}: that run completed, its model is {s3_uri(bucket, prefix)}; "
            "nothing to resume (drop --resume for a new run)"
        )


def run_pipeline(
    cfg: PipelineConfig, serve: bool = False, resume_id: str | None = None
) -> RunReport:
    """Run the whole pipeline locally; a failure is recorded in the report, not raised.
    `resume_id`: an earlier run of this state dir whose training continues from its
    last checkpoint (the data steps find their outputs; cfg is its stored settings, under
    the flags given now: run.resumed_config). A run's settings are stored for that."""
    report = RunReport(run_id=resume_id or new_run_id(), steps=[StepReport(name) for name in STEPS])
    if cfg.state_dir != PipelineConfig.model_fields["state_dir"].default:
        report.state_dir = str(cfg.state_dir)
    run_dir = (cfg.state_dir / "runs" / report.run_id).resolve()
    start = time.monotonic()
    began = False  # the steps: before them, the run's records may be an earlier attempt's
    try:
        # Started: the fork server, S3, MLflow. Stopped: the fork server, whose children (a
        # trainer stopped mid-way) end their MLflow run and their writes while both servers are
        # up, then MLflow, then S3.
        with contextlib.ExitStack() as stack:
            # Made here, whether or not a fork server keeps its log in it: with fork_server
            # off, the settings below had no folder, and every new run was a traceback.
            run_dir.mkdir(parents=True, exist_ok=True)
            forks = stack.enter_context(contextlib.ExitStack())
            warm_env = start_fork_server(cfg, run_dir, forks)
            if not resume_id:
                # As the run started: a resume's flags, refused or failed, rewrote them, and
                # the resume the summary had printed was refused from then on.
                save_settings(cfg, run_dir)
            live, store = stack.enter_context(open_store(cfg, "run"))
            report.storage_endpoint = store.endpoint
            report.embedded_s3 = not cfg.storage.endpoint
            store.ensure_buckets()
            if resume_id:
                refuse_completed(live, store, resume_id, run_dir)
                # The earlier attempt's step records: a step this one does not reach must not
                # show that attempt's outcome.
                shutil.rmtree(run_dir / "steps", ignore_errors=True)
            if not live.mlflow.tracking_uri:
                # It needs ~5 s to become healthy: it starts now, beside the data steps, and
                # the train step waits for it (mlflow.wait_s).
                mlflow_server = LocalMlflow(live, local_workdir(live.state_dir)).start()
                report.embedded_mlflow = True
                stack.callback(mlflow_server.stop)
                live = with_tracking(live, mlflow_server.uri)
                state_lock.note(cfg.state_dir, mlflow=mlflow_server.uri)
                warm_env = warm_env | mlflow_server.env()
            stack.callback(forks.close)
            report.tracking_uri = live.mlflow.tracking_uri or ""
            # kfp.local logs to stdout; stdout is for the summary or the --json line.
            quiet = QuietKfp(sys.stderr)
            values = step_values(live) | warm_env
            with step_environment(values), quiet, contextlib.redirect_stdout(quiet):
                began = True
                codes = run_kfp_local(live, run_dir, report.run_id, serve)
            collect(report, run_dir, codes[-1] if codes else None)
    except PipelineError as exc:  # a service failed to start
        report.error, report.exit_code = str(exc), exc.exit_code
    except KeyboardInterrupt as exc:
        # Ctrl-C reached every process of the run (a SIGTERM, this one: the services stopped
        # their children). The steps that ended wrote their records; the first without one was
        # running, whether or not it wrote its own in time. Stopped before the steps began,
        # it is at start-up, and a resume's folder still holds the attempt before's records.
        if began:
            collect(report, run_dir)
            stopped = next((s for s in report.steps if s.status != "succeeded"), None)
            if stopped is not None:
                stopped.status, report.failed_step = "interrupted", stopped.name
        # This process's signal, not the step's record: a step may have taken the services'
        # SIGTERM during its Ctrl-C clean-up.
        report.exit_code, report.error = stopped_by(exc)
    report.seconds = round(time.monotonic() - start, 2)
    report.status = "succeeded" if report.exit_code == 0 else "failed"
    return report
