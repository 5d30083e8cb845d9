"""A fork server for local runs: one interpreter imports torch, MLflow and KServe, and forks."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import logging
import os
import select
import selectors
import shlex
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from setproctitle import setproctitle

from pipelines.errors import IGNORABLE
from pipelines.processes import exit_now, exit_status
from pipelines.warm import HEADER, PRELOAD, TARGETS, WAIT_FOR, send_message

log = logging.getLogger("mlops.warm")
TITLE_MAX = 300  # a step's arguments hold its whole config
ARRIVING = "arriving"  # the selector's mark on a connection whose request is not read yet
STOP_GRACE_S = 5.0  # within the 10 s the driver gives this server before its SIGKILL


def _end_with_client(conn: socket.socket, ending: threading.Event) -> None:
    """A child ends with its client (the step or driver that asked for it), as a child of a
    killed process would: the client sends nothing after its request, so its end turning
    readable is its exit. The server sees to that (client_gone) while it lives; a child whose
    server had died (killed: it is the largest process here, the OOM killer's pick) trained on,
    orphaned, after a stopped run, restarted its trainer and rewrote its step's record.
    `ending` is set before the exit code is sent, after which the client closes."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1):
                pass
        if not ending.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="client-watch", daemon=True).start()


@dataclass
class Request:
    conn: socket.socket
    body: dict
    fds: list[int]  # the client's stdin, stdout and stderr, held open until the fork

    def close(self) -> None:
        self.conn.close()
        for fd in self.fds:
            os.close(fd)


@dataclass
class Server:
    listener: socket.socket
    targets: frozenset[str]
    selector: selectors.BaseSelector
    wait_for: dict[str, str] = field(default_factory=dict)  # target: the import it waits for
    loaded: set[str] = field(default_factory=set)  # the imports a wait may be for, done
    pending: list[Request] = field(default_factory=list)  # waiting for an import
    arriving: list[socket.socket] = field(default_factory=list)  # accepted, request not read
    children: dict[int, socket.socket] = field(default_factory=dict)  # pid: its client
    doomed: dict[int, float] = field(default_factory=dict)  # pid: when SIGTERM turns to SIGKILL
    private_fds: list[int] = field(default_factory=list)  # the server's own, closed in a child

    def accept(self) -> None:
        """Every connection that is waiting, read once its request arrives (arrived): one
        that sent nothing held up every other client for receive's 10 s."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                break
            if select.select([conn], [], [], 0)[0]:  # sent with its connect, as spawn does
                self.take(conn)
            else:
                self.arriving.append(conn)
                self.selector.register(conn, selectors.EVENT_READ, ARRIVING)

    def arrived(self, conn: socket.socket) -> None:
        """A new connection turned readable."""
        self.selector.unregister(conn)
        self.arriving.remove(conn)
        self.take(conn)

    def take(self, conn: socket.socket) -> None:
        """A connection's request, forked once its target may."""
        if (request := self.receive(conn)) is not None:
            self.pending.append(request)

    def ready(self, request: Request) -> bool:
        needs = self.wait_for.get(request.body["target"])
        return needs is None or needs in self.loaded

    def release(self) -> None:
        """Fork each pending request whose target's import is in."""
        for request in [request for request in self.pending if self.ready(request)]:
            # Off the list just before its fork: a child closes what is on it, which holds
            # every other request not forked yet (their sockets, and their streams, whose
            # readers would otherwise wait for this child's end).
            self.pending.remove(request)
            self.fork(request)

    def drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def refuse(self, request: Request, exc: Exception) -> None:
        log.warning("refused a request: %s", exc)
        with contextlib.suppress(OSError):
            send_message(request.conn, {"error": str(exc)})
        request.close()

    def receive(self, conn: socket.socket) -> Request | None:
        """Read and check one request; {"error"} and None when it is refused."""
        fds: list[int] = []
        try:
            conn.setblocking(True)
            conn.settimeout(10)
            data, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
            if len(fds) != 3 or len(data) != HEADER.size:
                raise ValueError("a request carries its length and three file descriptors")
            body = json.loads(_recv_exactly(conn, HEADER.unpack(data)[0]))
            if body["target"] not in self.targets:
                raise ValueError(f"target {body['target']!r} is not one this server runs")
            if _peer_uid(conn) != os.getuid():
                raise ValueError("the client runs as another user")
        except (ValueError, KeyError, TypeError, OSError) as exc:
            self.refuse(Request(conn, {}, fds), exc)
            return None
        return Request(conn, body, fds)

    def fork(self, request: Request) -> None:
        """Fork the request's child, which answers {"pid"} itself; {"error"} from here
        otherwise. The connection stays open to carry the child's exit code."""
        conn = request.conn
        try:
            if _closed_by_peer(conn):  # it gave up waiting for the preload: it runs its own
                raise ValueError("the client left before its turn")
            conn.setblocking(True)
            pid = os.fork()
            if pid == 0:
                self.become_child(request)
        except (ValueError, OSError) as exc:
            self.refuse(request, exc)
            return
        for fd in request.fds:
            os.close(fd)
        log.info("forked %s as pid %d", request.body["target"], pid)
        self.children[pid] = conn  # the child says {"pid"} itself, before its exit code
        # A client sends nothing after its request: its end turning readable is its exit.
        self.selector.register(conn, selectors.EVENT_READ)

    def become_child(self, request: Request) -> None:
        """In the forked child: the client's streams, environment, directory and arguments,
        then the target; never returns to the server loop."""
        req, fds, conn = request.body, request.fds, request.conn
        code, ending = 1, threading.Event()
        try:
            # A fresh process's signal handling before its pid leaves: the client may signal
            # it at once, and the server's SIGTERM handler (sys.exit(0)) would end it with 0.
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig in req.get("ignored", []):  # as a fresh process inherits its ignored ones
                if sig in IGNORABLE:
                    signal.signal(sig, signal.SIG_IGN)
            # Its pid first, then its exit code, on its own connection: in this order whatever
            # the server does meanwhile (it may be busy importing). Nothing else of the
            # server's stays open here.
            try:
                send_message(conn, {"pid": os.getpid()})
            except OSError:  # the client has gone: so does its child
                os._exit(1)
            self.listener.close()
            for client in self.children.values():
                client.close()
            for other in self.pending:
                other.close()
            for other in self.arriving:
                other.close()
            for fd in self.private_fds:
                os.close(fd)
            self.selector.close()
            log.handlers.clear()  # the server's, on its log file
            log.propagate = True
            for target_fd, fd in enumerate(fds):
                os.dup2(fd, target_fd)
            for fd in set(fds) - {0, 1, 2}:  # a second copy kept a reader from seeing its EOF
                os.close(fd)
            module, name = req["target"].split(":")
            # What `ps` would show for a fresh process. Before the environment is replaced:
            # setproctitle then found no room to write, and every child showed the server's
            # own command line.
            setproctitle(shlex.join([sys.executable, "-m", module, *req["args"]])[:TITLE_MAX])
            # sys.argv[0] as `python -m` sets it, the module's file: MLflow names a run's
            # source, and finds its git commit, from it.
            spec = importlib.util.find_spec(module)
            sys.argv = [spec.origin if spec and spec.origin else module, *req["args"]]
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            _end_with_client(conn, ending)
            # As a fresh interpreter would: line-buffered, or unbuffered under PYTHONUNBUFFERED.
            unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
            sys.stdout.reconfigure(line_buffering=True, write_through=unbuffered)
            _threads_from_env()
            # What the server imported stays out of the child's collections, as it does once
            # the preload is done: a child forked before then spent 1.5 s in its first full
            # collection, over some 900,000 objects whose pages it copied as it went.
            gc.freeze()
            gc.enable()
            code = getattr(importlib.import_module(module), name)(req["args"])
        except SystemExit as exc:
            code = exit_status(exc.code)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            ending.set()  # its client closes once it has the exit code below: no SIGTERM then
            # As the trainer and the model server end (processes.exit_now): what the target
            # opened is closed; the interpreter's teardown is skipped.
            code = (code if isinstance(code, int) else 1) & 0xFF  # as the exit status holds it
            with contextlib.suppress(BaseException):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                # (The server reports a death by signal, which a child cannot.)
                send_message(conn, {"returncode": code})
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
                send_message(client, {"returncode": os.waitstatus_to_exitcode(status)})
            self.drop(client)

    def client_gone(self, conn: socket.socket) -> None:
        """A client closed its end (it exited or was killed): its child goes with it, as a
        child of a killed step would. (It is reaped, and forgotten, once it has exited.)"""
        self.terminate(pid for pid, client in self.children.items() if client is conn)
        self.drop(conn)

    def terminate(self, pids: Iterable[int]) -> None:
        """SIGTERM, and SIGKILL from enforce() if still there after STOP_GRACE_S: a trainer
        ends its MLflow run on SIGTERM (as KILLED), which a SIGKILL leaves RUNNING."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            self.doomed.setdefault(pid, time.monotonic() + STOP_GRACE_S)

    def enforce(self) -> None:
        for pid, deadline in list(self.doomed.items()):
            if pid not in self.children:  # reaped
                del self.doomed[pid]
            elif time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                del self.doomed[pid]

    def stop(self) -> None:
        """Every child terminated, and waited for up to STOP_GRACE_S. With no server left
        to answer, MLflow's retries would keep a trainer alive for minutes, an orphan."""
        self.terminate(list(self.children))
        while self.doomed:
            time.sleep(0.05)
            self.reap()
            self.enforce()


def serve(
    path: str, preload: Sequence[str], targets: Sequence[str], wait_for: dict[str, str]
) -> None:
    """Listen at once, import `preload` in order, serving a request between two imports (a
    child imports what is not loaded yet itself, unless its target waits for an import), then
    fork for each request until SIGTERM or until the parent has gone."""
    gc.disable()  # collections would touch, and so copy, every page the children share
    old = os.umask(0o177)  # the socket file: this user only
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.umask(old)
    listener.listen(64)
    listener.setblocking(False)  # accept() takes every waiting connection, then returns
    os.rename(path + ".tmp", path)  # so that a client never finds it bound but not listening
    parent = os.getppid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the fd above
    for sig in IGNORABLE:  # the driver stops this server itself
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    selector = selectors.DefaultSelector()
    server = Server(listener, frozenset(targets), selector, wait_for, private_fds=[wake_r, wake_w])
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)

    def turn(timeout: float) -> None:
        for key, _ in selector.select(timeout):
            if key.fileobj is listener:
                server.accept()
            elif key.data is ARRIVING:
                server.arrived(key.fileobj)  # type: ignore[arg-type]
            elif key.fileobj == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            else:
                server.client_gone(key.fileobj)  # type: ignore[arg-type]
        server.reap()
        server.enforce()
        server.release()

    try:
        start = time.monotonic()
        for name in preload:
            try:
                importlib.import_module(name)
            except Exception as exc:  # a child imports it itself, and fails there if it must
                log.warning("preload of %s failed: %s", name, exc)
            server.loaded.add(name)
            turn(0)
        server.loaded.update(wait_for.values())  # a wait for a module not preloaded ends now
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


def _threads_from_env() -> None:
    """torch read OMP_NUM_THREADS when this server imported it; a child may set its own."""
    torch = sys.modules.get("torch")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def _wait_pair(text: str) -> tuple[str, str] | None:
    """TARGET=MODULE for --wait-for; None for `none`."""
    if text == "none":
        return None
    target, _, module = text.partition("=")
    if ":" not in target or not module:
        raise argparse.ArgumentTypeError(f"{text!r}: give TARGET=MODULE, e.g. a.b:main=torch")
    return target, module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.warm_server",
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
    parser.add_argument(
        "--wait-for",
        action="append",
        type=_wait_pair,
        metavar="TARGET=MODULE",
        help="fork TARGET only once the preload has imported MODULE, repeatable; `none` for "
        "no waits (default: " + ", ".join(f"{t}={m}" for t, m in WAIT_FOR.items()) + ")",
    )
    args = parser.parse_args(argv)
    # Its own handler, not the root logger's: the children set up their logging themselves.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        pairs = args.wait_for if args.wait_for is not None else list(WAIT_FOR.items())
        wait_for = dict(pair for pair in pairs if pair is not None)
        serve(args.socket, args.preload or PRELOAD, args.target or TARGETS, wait_for)
    finally:
        # Its children are stopped and the socket removed: tearing down what it imported took
        # seconds, at the end of every run.
        exit_now(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
