"""`mlflow server` in one process: the CLI's own checks and set-up, then its uvicorn server here.

    python -m pipelines.mlflow_serve server [the `mlflow server` options]

Stock `mlflow server` checks its options, migrates the database, then starts uvicorn as a child
that imports MLflow a second time. On 2 cores that made the server healthy 9-11 s after its
start, against 4-6 s for this; the trainer waits on it before its first epoch. Only the spawn of
a uvicorn child is replaced: every option, check and environment variable is MLflow's own, so
the cluster's stock `mlflow server` runs the same app with the same settings.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import mlflow.server
from mlflow.cli import cli
from uvicorn.main import main as uvicorn_cli

from pipelines.processes import exit_now

log = logging.getLogger("mlops.mlflow")

# MLflow 3 starts a job runner and a huey consumer for its GenAI jobs by default: two more
# processes polling on the cores that train, and started only once the server has returned,
# which here is when it has shut down. The pipeline runs no such job.
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"


def serve_here(cmd: list[str], *, extra_env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Stands in for the `_exec_cmd` that `mlflow server` starts its server with: a uvicorn
    command runs in this process, with the environment MLflow would have given the child."""
    if cmd[1:3] != ["-m", "uvicorn"]:  # --gunicorn-opts or --waitress-opts: as MLflow does
        return spawn(cmd, extra_env=extra_env, **kwargs)
    os.environ.update(extra_env or {})
    code: Any = 0
    try:
        uvicorn_cli.main(args=cmd[3:], prog_name="uvicorn", standalone_mode=False)
    except SystemExit as exc:  # uvicorn could not start (a taken port): its exit status
        code = exc.code
    # uvicorn has shut down gracefully (SIGTERM) or never started: all the CLI has left to do
    # is wait on the child this process was, so skip it and the interpreter's teardown.
    exit_now(code if isinstance(code, int) else 1)


spawn = getattr(mlflow.server, "_exec_cmd", None)


def main() -> None:
    if spawn is None:  # a newer MLflow starts its server otherwise: let it, in two processes
        log.warning("this MLflow starts no server through _exec_cmd; running stock mlflow server")
    else:
        mlflow.server._exec_cmd = serve_here
    cli.main(prog_name="mlflow")


if __name__ == "__main__":
    main()
