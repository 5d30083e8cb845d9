"""`mlflow server` in one process: the CLI's own checks and set-up, then its uvicorn server here.

    python -m pipelines.mlflow_serve server [the `mlflow server` options]

Stock `mlflow server` checks its options, migrates the database, then starts uvicorn as a child
that imports MLflow a second time. On 2 cores that made the server healthy 9-11 s after its
start, against 4-6 s for this; the trainer waits on it before its first epoch. Only the spawn of
a uvicorn child is replaced: every option, check and environment variable is MLflow's own, so
the cluster's stock `mlflow server` runs the same app with the same settings.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import mlflow.server
from mlflow.cli import cli
from mlflow.server import security
from mlflow.server.constants import PROMETHEUS_EXPORTER_ENV_VAR
from mlflow.server.handlers import STATIC_PREFIX_ENV_VAR
from uvicorn.main import main as uvicorn_cli

from pipelines.mlflow_server import create_database
from pipelines.processes import exit_now, exit_status

log = logging.getLogger("mlops.mlflow")

# MLflow 3 starts a job runner and a huey consumer for its GenAI jobs by default: two more
# processes polling on the cores that train, and started only once the server has returned,
# which here is when it has shut down. The pipeline runs no such job.
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"


# What mlflow.server reads when it is imported, which here is before the CLI has run: the child
# MLflow would start reads them from the environment the CLI gives it.
IMPORT_TIME = (STATIC_PREFIX_ENV_VAR, PROMETHEUS_EXPORTER_ENV_VAR)


def serve_here(cmd: list[str], *, extra_env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Stands in for the `_exec_cmd` that `mlflow server` starts its server with: a uvicorn
    command runs in this process, with the environment MLflow would have given the child."""
    env = extra_env or {}
    # --gunicorn-opts, --waitress-opts, --static-prefix or --expose-prometheus: as MLflow does.
    if cmd[1:3] != ["-m", "uvicorn"] or any(name in env for name in IMPORT_TIME):
        return spawn(cmd, extra_env=extra_env, **kwargs)
    os.environ.update(env)
    if not mlflow.server.is_running_as_server:
        # The child's import of mlflow.server, under the variables above, sets up the Flask
        # app's host and CORS checks (as the FastAPI app sets up its own): now that the CLI
        # has set --allowed-hosts and --cors-allowed-origins, so here.
        security.init_security_middleware(mlflow.server.app)
    code = 0
    try:
        uvicorn_cli.main(args=cmd[3:], prog_name="uvicorn", standalone_mode=False)
    except SystemExit as exc:  # uvicorn could not start (a taken port): its exit status
        code = exit_status(exc.code)
    # uvicorn never started, or shut down on SIGINT. (On SIGTERM it shuts down gracefully,
    # then raises the signal again, which ends this process before it gets here.) All the CLI
    # has left to do is wait on the child this process was: skip that, and the teardown.
    exit_now(code)


spawn = getattr(mlflow.server, "_exec_cmd", None)


def sqlite_path(argv: list[str]) -> Path | None:
    """The file of a `--backend-store-uri sqlite:///PATH` among the CLI's arguments."""
    for flag, value in itertools.pairwise(argv):
        if flag == "--backend-store-uri" and value.startswith("sqlite:///"):
            return Path(value.removeprefix("sqlite:///"))
    return None


def main() -> None:
    db = sqlite_path(sys.argv)
    if db is not None:
        create_database(db)
    if spawn is None:  # a newer MLflow starts its server otherwise: let it, in two processes
        log.warning("this MLflow starts no server through _exec_cmd; running stock mlflow server")
    else:
        mlflow.server._exec_cmd = serve_here
    cli.main(prog_name="mlflow")


if __name__ == "__main__":
    main()
