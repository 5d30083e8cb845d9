"""A fork server for local runs, the client's side: start one, and fork through it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from pipelines.errors import IGNORABLE, exit_words
from pipelines.processes import terminate

log = logging.getLogger("mlops.warm")

SOCKET_ENV = "MLOPS_WARM_SOCKET"  # set for the step processes of a run that has a fork server
# What a fresh process of a run spends seconds importing (kfp about 1 s, torch 2-4 s, mlflow
# 2-3 s, KServe and ONNX Runtime about 1 s here), once for all of them, beside the data steps.
# In the order the run needs them: KFP's executor and the data steps', the trainer's, then what
# it imports as it starts (dynamo, for its first optimizer, 2-3 s; GitPython, for MLflow's run
# tags), then deploy's.
PRELOAD = (
    "kfp.dsl.executor_main",
    "pipelines.steps",
    "components.verify_data",
    "components.feature_engineering",
    "torch",
    "mlflow",
    "training.train",
    "torch._dynamo",
    "git",
    "components.verify_model",
    "components.deploy",
    "serving.__main__",
)
# The only functions a client may have run: (argv) -> exit code.
TARGETS = (
    "pipelines.kfp_task:main",
    "training.train:main",
    "serving.__main__:main",
)
# A fork of these targets waits until the preload has imported the module named, rather than
# import it itself beside the server's own import of it: twice the CPU, on 2 cores. (Before, the
# trainer forked between the trainer's and dynamo's imports, and took 3.3 s to its optimiser.)
WAIT_FOR = {"training.train:main": "git", "serving.__main__:main": "serving.__main__"}
PACKAGE_MAIN = {"serving": "serving.__main__"}  # `python -m PACKAGE` runs PACKAGE.__main__
HEADER = struct.Struct("!I")  # the request's JSON length, sent with the client's three fds
READY_WAIT_S = 120.0  # a client waits this long for the preload before it starts its own


class WarmProcess:
    """A forked child, driven as subprocess.Popen is: pid, poll, wait, returncode, signals."""

    def __init__(self, conn: socket.socket, pid: int):
        self.conn = conn
        self.pid = pid
        self.returncode: int | None = None

    def _read(self, timeout: float | None) -> None:
        if not select.select([self.conn], [], [], timeout)[0]:
            return
        self.conn.settimeout(None)
        try:
            reply = _recv_reply(self.conn)
        except (OSError, ValueError):
            reply = {}
        # With no reply the server has gone; it cannot say how its child ended.
        self.returncode = int(reply.get("returncode", -signal.SIGKILL))
        self.conn.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._read(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Process = subprocess.Popen | WarmProcess  # what the callers of spawn drive


def spawn(
    target: str,
    args: Sequence[str],
    env: dict[str, str],
    cwd: str | Path,
    fds: tuple[int, int, int] = (0, 1, 2),
) -> WarmProcess | None:
    """Fork `target(args)` from the run's fork server, with these stdin, stdout and stderr.
    None when the run has none or it cannot fork now: the caller then starts a fresh process."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    ignored = [int(sig) for sig in IGNORABLE if signal.getsignal(sig) is signal.SIG_IGN]
    request = {"target": target, "args": list(args), "env": env, "cwd": str(cwd)}
    body = json.dumps({**request, "ignored": ignored}).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(READY_WAIT_S)  # the server accepts once it has preloaded
        conn.connect(path)
        socket.send_fds(conn, [HEADER.pack(len(body))], list(fds))
        conn.sendall(body)
        reply = _recv_reply(conn)
    except (OSError, ValueError) as exc:
        log.warning("fork server unavailable (%s): starting a fresh process", exc)
        conn.close()
        return None
    if "pid" not in reply:
        log.warning("fork server refused %s (%s): starting a fresh process", target, reply)
        conn.close()
        return None
    return WarmProcess(conn, int(reply["pid"]))


def start(
    python_args: Sequence[str],
    env: dict[str, str],
    cwd: str | Path,
    fds: tuple[int, int, int],
    fork: bool = True,
) -> Process:
    """`python PYTHON_ARGS` with these stdin, stdout and stderr: forked from the run's fork
    server where it runs `-m MODULE` (MODULE's main(argv)), else a fresh process."""
    child = None
    if fork and python_args[0] == "-m":
        module = PACKAGE_MAIN.get(python_args[1], python_args[1])
        child = spawn(f"{module}:main", python_args[2:], env, cwd, fds)
    if child is not None:
        return child
    stdin, stdout, stderr = fds
    return subprocess.Popen(
        [sys.executable, *python_args], cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr
    )


def piped(
    open_child: Callable[[tuple[int, int, int]], Process | None],
) -> tuple[Process, TextIO] | None:
    """open_child(fds) with stdin from /dev/null and stdout and stderr into one text stream,
    which ends when the child does; None where open_child gave no child."""
    read_end, write_end = os.pipe()
    stdin = os.open(os.devnull, os.O_RDONLY)
    try:
        child = open_child((stdin, write_end, write_end))
    finally:
        os.close(stdin)
        os.close(write_end)  # the child holds its own copy
    if child is None:
        os.close(read_end)
        return None
    return child, open(read_end, encoding="utf-8", errors="replace")


@contextlib.contextmanager
def fork_server(
    env: dict[str, str],
    log_path: Path,
    preload: Sequence[str] = PRELOAD,
    targets: Sequence[str] = TARGETS,
    wait_for: dict[str, str] | None = None,
) -> Iterator[dict[str, str]]:
    """Run a fork server for the block; yields the variable that points the steps at it. Its
    socket lies in a new folder of env's TMPDIR (0700: only this user may connect), or of the
    system's where that path would be too long for a socket (107 bytes at most)."""
    scratch = env.get("TMPDIR")
    if scratch and len(os.path.join(scratch, "mlops-warm-12345678", "socket.tmp")) > 100:
        scratch = None
    folder = tempfile.mkdtemp(prefix="mlops-warm-", dir=scratch)
    path = os.path.join(folder, "socket")
    flags = [f"--preload={name}" for name in preload] + [f"--target={name}" for name in targets]
    waits = WAIT_FOR if wait_for is None else wait_for
    flags += [f"--wait-for={t}={m}" for t, m in waits.items()] or ["--wait-for=none"]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.warm_server", path, *flags],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(path, proc)
        yield {SOCKET_ENV: path}
    finally:
        if (code := proc.poll()) is not None:
            # Only "fork server unavailable" lines showed it: the steps after its end started
            # as fresh processes, each its imports (seconds) slower.
            log.warning(
                "the fork server ended during the run (%s): the steps after that started as "
                "fresh processes; see %s",
                exit_words(code),
                log_path,
            )
        terminate(proc)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_listening(path: str, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """The server binds before it imports anything: within a fraction of a second."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------
# Both ends (pipelines/warm_server.py is the other)


def send_message(conn: socket.socket, msg: dict) -> None:
    """One newline-terminated JSON message."""
    conn.sendall(json.dumps(msg).encode() + b"\n")


def _recv_reply(conn: socket.socket) -> dict:
    """One newline-terminated JSON message; read byte-wise, so nothing after it is consumed."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            raise ValueError("the fork server closed the connection")
        data += chunk
    return json.loads(data)
