"""Local service processes: the loopback host, free ports, stopping and waiting on them."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from pipelines.errors import PipelineError

HOST = "127.0.0.1"  # every embedded service binds loopback only
# Between a waiting server's health checks: at 0.25 s a run waited up to that long past each
# server's start, and the overhead benchmark's start-up times were good to 0.25 s only.
POLL_S = 0.02
# Run before a service's command, in its own process: arm Linux's parent-death signal, then
# exec the command (the signal survives exec). An exec, not a preexec_fn, which is unsafe in a
# process with threads.
_GUARD = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "  # 1: PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or sys.exit(143); "  # its starter already died
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def die_with_parent(cmd: list[str]) -> list[str]:
    """`cmd`, made to get SIGTERM when this process dies, however it dies (a SIGKILL runs no
    clean-up): no S3 or MLflow server outlives its run on the state dir. As is where the
    kernel offers no such signal."""
    if sys.platform != "linux":
        return cmd
    return [sys.executable, "-S", "-c", _GUARD, str(os.getpid()), *cmd]


# The pid whose end stops a model server started with it in its environment: `run --serve`'s
# and `serve`'s driver, which a SIGKILL ends without its clean-up.
OWNER_ENV = "MLOPS_OWNER_PID"


def stop_with_owner() -> None:
    """SIGTERM this process once the process OWNER_ENV names has ended, however it ended. The
    model server `run --serve` keeps up outlives the deploy step that started it, so the
    kernel's parent-death signal cannot tie it to the driver; a pidfd, readable once its
    process has ended, can (and is not fooled by a reused pid)."""
    owner = os.environ.get(OWNER_ENV, "")
    if not owner.isdigit() or not hasattr(os, "pidfd_open"):
        return
    try:
        fd = os.pidfd_open(int(owner))
    except ProcessLookupError:  # gone already
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, once the caller has closed everything that
    holds state: tearing down torch (and mlflow or KServe) took 0.4-2 s a process here, on the
    pipeline's critical path. Logs and the standard streams are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_status(code: object) -> int:
    """SystemExit's argument as the interpreter turns it into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def start_service(
    cmd: list[str], env: dict[str, str], log_file: IO[bytes], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """A run's S3 or MLflow server: its output in log_file, ended with this process however
    it ends (die_with_parent), and out of the terminal's process group: a Ctrl-C stopped it
    at once, before the trainer could end its MLflow run or finish its uploads. The driver
    stops it, after the steps."""
    return subprocess.Popen(
        die_with_parent(cmd),
        cwd=cwd,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def terminate(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within timeout_s."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bind_error(port: int, host: str = HOST) -> OSError | None:
    """Why a server could not listen on host:port now (None: it could), bound as uvicorn binds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    with socket.socket(family) as sock:
        # A port whose last connections linger in TIME_WAIT is free to uvicorn.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def require_free(port: int, setting: str, hint: str = "pass --port N") -> None:
    """A clear config error, before anything starts, when a fixed port is taken."""
    from pipelines.errors import ConfigError

    error = bind_error(port)
    if error is None:
        return
    if error.errno == errno.EADDRINUSE:
        raise ConfigError(f"{setting}={port}: the port is in use; {hint}")
    # Another cause said as it is: a port below 1024 without the right to bind it was "in use".
    raise ConfigError(f"{setting}={port}: cannot listen on it ({error.strerror}); {hint}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_http_ok(
    url: str,
    timeout_s: float,
    proc: subprocess.Popen | None,
    what: str,
    hint: str,
    state: str = "ready",
) -> None:
    """Poll url until it answers 200; fail fast if proc exits, and after timeout_s."""
    import urllib.error
    import urllib.request

    from pipelines.errors import PipelineError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            code = proc.returncode
            told = f" with code {code}" if isinstance(code, int) else ""  # not ours to read
            raise PipelineError(f"{what} exited{told}: {hint}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(POLL_S)
    raise PipelineError(f"{what} was not {state} within {timeout_s:.0f} s: {hint}")


def process_ended(pid: int) -> bool:
    """Whether the process has ended. A zombie still answers os.kill(pid, 0), so polling that
    alone would wait for it forever: one of ours is reaped here, another's is read as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not our child: its parent reaps it
        import psutil

        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True


def server_log(model_dir: Path) -> Path:
    """Where a model server started for model_dir (state/serving/NAME-PORT) logs: beside it."""
    return model_dir.parent / f"{model_dir.name}.log"


def serve_until_stopped(pid: int, model_dir: Path) -> None:
    """Block while the model server serves: Ctrl-C stops it (and re-raises); a server that
    ends on its own is a failed run, not a quiet exit 0, and its log says why."""
    wait_for_pid(pid)
    raise PipelineError(f"the model server (pid {pid}) exited; its log: {server_log(model_dir)}")


def wait_for_pid(pid: int | None) -> None:
    """Block until the process exits; Ctrl-C stops it and re-raises."""
    if pid is None:
        return
    try:
        while not process_ended(pid):
            time.sleep(1)
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        raise
