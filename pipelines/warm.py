"""A fork server for local runs: one interpreter imports torch, MLflow and KServe, and forks."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import select
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from setproctitle import setproctitle

from pipelines.processes import exit_now

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
HEADER = struct.Struct("!I")  # the request's JSON length, sent with the client's three fds
READY_WAIT_S = 120.0  # a client waits this long for the preload before it starts its own
TITLE_MAX = 300  # a step's arguments hold its whole config


# ----------------------------------------------------------------------------------------------
# Server


@dataclass
class Server:
    listener: socket.socket
    targets: frozenset[str]
    selector: selectors.BaseSelector
    children: dict[int, socket.socket] = field(default_factory=dict)  # pid: its client
    private_fds: list[int] = field(default_factory=list)  # the server's own, closed in a child

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        if self.fork(conn):
            # A client sends nothing after its request: its end turning readable is its exit.
            self.selector.register(conn, selectors.EVENT_READ)

    def drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def fork(self, conn: socket.socket) -> bool:
        """Read one request and fork its child, which answers {"pid"} itself; {"error"} from
        here otherwise. Whether the connection stays open (to carry the child's exit code)."""
        fds: list[int] = []
        try:
            conn.settimeout(10)
            data, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
            if len(fds) != 3 or len(data) != HEADER.size:
                raise ValueError("a request carries its length and three file descriptors")
            req = json.loads(_recv_exactly(conn, HEADER.unpack(data)[0]))
            if req["target"] not in self.targets:
                raise ValueError(f"target {req['target']!r} is not one this server runs")
            if _peer_uid(conn) != os.getuid():
                raise ValueError("the client runs as another user")
            if _closed_by_peer(conn):  # it gave up waiting for the preload: it runs its own
                raise ValueError("the client left before its turn")
            conn.setblocking(True)
            pid = os.fork()
            if pid == 0:
                self.become_child(req, fds, conn)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("refused a request: %s", exc)
            with contextlib.suppress(OSError):
                _send(conn, {"error": str(exc)})
            conn.close()
            return False
        finally:
            for fd in fds:
                os.close(fd)
        log.info("forked %s as pid %d", req["target"], pid)
        self.children[pid] = conn  # the child says {"pid"} itself, before its exit code
        return True

    def become_child(self, req: dict, fds: list[int], conn: socket.socket) -> None:
        """In the forked child: the client's streams, environment, directory and arguments,
        then the target; never returns to the server loop."""
        code = 1
        try:
            # Its pid first, then its exit code, on its own connection: in this order whatever
            # the server does meanwhile (it may be busy importing). Nothing else of the
            # server's stays open here.
            try:
                _send(conn, {"pid": os.getpid()})
            except OSError:  # the client has gone: so does its child
                os._exit(1)
            self.listener.close()
            for client in self.children.values():
                client.close()
            signal.set_wakeup_fd(-1)
            for fd in self.private_fds:
                os.close(fd)
            self.selector.close()
            log.handlers.clear()  # the server's, on its log file
            log.propagate = True
            for sig in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for target_fd, fd in enumerate(fds):
                os.dup2(fd, target_fd)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            module, name = req["target"].split(":")
            sys.argv = [module, *req["args"]]
            # What `ps` would show for a fresh process (the server's own command line, else).
            setproctitle(shlex.join([sys.executable, "-m", module, *req["args"]])[:TITLE_MAX])
            # As a fresh interpreter would: line-buffered, or unbuffered under PYTHONUNBUFFERED.
            unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
            sys.stdout.reconfigure(line_buffering=True, write_through=unbuffered)
            _threads_from_env()
            gc.enable()
            code = getattr(importlib.import_module(module), name)(req["args"])
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            # As the trainer and the model server end (processes.exit_now): what the target
            # opened is closed; the interpreter's teardown is skipped.
            code = (code if isinstance(code, int) else 1) & 0xFF  # as the exit status holds it
            with contextlib.suppress(BaseException):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                _send(conn, {"returncode": code})  # the server's report of a signal comes later
            os._exit(code)

    def reap(self) -> None:
        """Tell each client whose child exited its exit code, as subprocess reports it: a
        child that ended by a signal could not say so itself."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            client = self.children.pop(pid)
            with contextlib.suppress(OSError):
                _send(client, {"returncode": os.waitstatus_to_exitcode(status)})
            self.drop(client)

    def client_gone(self, conn: socket.socket) -> None:
        """A client closed its end (it exited or was killed): its child goes with it, as a
        child of a killed step would. (It is reaped, and forgotten, once it has exited.)"""
        for pid, client in self.children.items():
            if client is conn:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.drop(conn)

    def stop(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def serve(path: str, preload: Sequence[str], targets: Sequence[str]) -> None:
    """Listen at once, import `preload` in order, serving a request between two imports (a
    child imports what is not loaded yet itself), then fork for each request until SIGTERM or
    until the parent has gone."""
    gc.disable()  # collections would touch, and so copy, every page the children share
    old = os.umask(0o177)  # the socket file: this user only
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.umask(old)
    listener.listen(64)
    os.rename(path + ".tmp", path)  # so that a client never finds it bound but not listening
    parent = os.getppid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the fd above
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops this server itself
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    selector = selectors.DefaultSelector()
    server = Server(listener, frozenset(targets), selector, private_fds=[wake_r, wake_w])
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)

    def turn(timeout: float) -> None:
        for key, _ in selector.select(timeout):
            if key.fileobj is listener:
                server.accept()
            elif key.fileobj == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            else:
                server.client_gone(key.fileobj)  # type: ignore[arg-type]
        server.reap()

    try:
        start = time.monotonic()
        for name in preload:
            try:
                importlib.import_module(name)
            except Exception as exc:  # a child imports it itself, and fails there if it must
                log.warning("preload of %s failed: %s", name, exc)
            turn(0)
        gc.collect()
        gc.freeze()
        log.info("preloaded %s in %.1f s", ", ".join(preload), time.monotonic() - start)
        while os.getppid() == parent:
            turn(1.0)
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            os.unlink(path)


# ----------------------------------------------------------------------------------------------
# Client


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
    body = json.dumps({"target": target, "args": list(args), "env": env, "cwd": str(cwd)}).encode()
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


def spawn_piped(
    target: str, args: Sequence[str], env: dict[str, str], cwd: str | Path
) -> tuple[WarmProcess, TextIO] | None:
    """spawn, with stdin from /dev/null and stdout and stderr into one text stream, which
    ends when the child does."""
    read_end, write_end = os.pipe()
    stdin = os.open(os.devnull, os.O_RDONLY)
    try:
        child = spawn(target, args, env, cwd, (stdin, write_end, write_end))
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
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.warm", path, *flags],
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
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_listening(path: str, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """The server binds before it imports anything: within a fraction of a second."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------
# Both ends


def _send(conn: socket.socket, msg: dict) -> None:
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


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("the request ended early")
        data += chunk
    return bytes(data)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _closed_by_peer(conn: socket.socket) -> bool:
    conn.settimeout(0)  # a socket with a timeout waits for data before it reads, flags or not
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


def _exit_code(code: object) -> int:
    """SystemExit's argument as the interpreter turns it into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _threads_from_env() -> None:
    """torch read OMP_NUM_THREADS when this server imported it; a child may set its own."""
    torch = sys.modules.get("torch")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.warm",
        description="Serve forks of one warm interpreter on a Unix socket (the local driver "
        "starts it for a run; see pipelines/local.py).",
    )
    parser.add_argument("socket", help="path of the Unix socket to listen on")
    parser.add_argument(
        "--preload",
        action="append",
        help=f"a module to import before forking, repeatable (default: {', '.join(PRELOAD)})",
    )
    parser.add_argument(
        "--target",
        action="append",
        help=f"a module:function clients may run, repeatable (default: {', '.join(TARGETS)})",
    )
    args = parser.parse_args(argv)
    # Its own handler, not the root logger's: the children set up their logging themselves.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        serve(args.socket, args.preload or PRELOAD, args.target or TARGETS)
    finally:
        # Its children are stopped and the socket removed: tearing down what it imported took
        # seconds, at the end of every run.
        exit_now(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
