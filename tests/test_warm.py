"""The fork server of local runs (pipelines/warm.py): a real server process, real forks."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipelines import kfp_task, warm
from pipelines.launcher import run_single

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [f"tests.warm_target:{name}" for name in ("report", "sleep", "fail", "main")]


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fork server with a light preload; this process is its client. Yields its log."""
    log = tmp_path / "fork-server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    with warm.fork_server(env, log, preload=["json"], targets=TARGETS) as variables:
        for key, value in variables.items():
            monkeypatch.setenv(key, value)
        yield log


def gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_child_gets_the_clients_streams_environment_directory_and_arguments(
    server: Path, tmp_path: Path
) -> None:
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    os.write(in_w, b"from stdin\n")
    os.close(in_w)
    env = dict(os.environ, WARM_TEST="the client's")
    child = warm.spawn(
        "tests.warm_target:report", ["3", "x y"], env, tmp_path, (in_r, out_w, out_w)
    )
    os.close(out_w)
    os.close(in_r)
    assert child is not None
    with open(out_r) as out:
        lines = out.read().splitlines()
    assert child.wait(timeout=30) == 3
    seen = json.loads(lines[0])
    # sys.argv[0] is the module's file, as `python -m` sets it (MLflow takes a run's source
    # and git commit from it); and the client's streams are open once each, as 0, 1 and 2
    # (the listing's own descriptor aside), not twice.
    assert seen.pop("argv0") == str(ROOT / "tests" / "warm_target.py")
    assert seen.pop("fds")[:4] == [0, 1, 2, 3]  # 3: the connection to the client
    assert seen == {
        "argv": ["3", "x y"],
        "cwd": str(tmp_path),
        "env": "the client's",
        "ignored": [],
    }
    assert lines[1:] == ["to stderr", "from stdin"]
    assert f"forked tests.warm_target:report as pid {child.pid}" in server.read_text()


def test_a_child_ignores_the_signals_its_client_ignores(server: Path, tmp_path: Path) -> None:
    """As a fresh process inherits them: a run started with SIGINT ignored (a script's
    background job) or under nohup (SIGHUP) was stopped by them in its forked steps only."""
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    os.close(in_w)  # its stdin: at its end at once
    kept = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGHUP)}
    try:
        child = warm.spawn(
            "tests.warm_target:report", ["0"], dict(os.environ), tmp_path, (in_r, out_w, 2)
        )
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
    os.close(out_w)
    os.close(in_r)
    assert child is not None
    with open(out_r) as out:
        seen = json.loads(out.readline())
    assert child.wait(timeout=30) == 0
    assert seen["ignored"] == [signal.SIGINT, signal.SIGHUP]


def test_a_child_is_driven_as_popen_is(server: Path, tmp_path: Path) -> None:
    child = warm.spawn("tests.warm_target:sleep", ["60"], dict(os.environ), tmp_path)
    assert child is not None and child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    child.terminate()
    assert child.wait(timeout=30) == -signal.SIGTERM and child.poll() == -signal.SIGTERM
    crashed = warm.spawn("tests.warm_target:fail", [], dict(os.environ), tmp_path)
    assert crashed is not None and crashed.wait(timeout=30) == 1  # as an uncaught error exits


def test_a_client_that_sends_nothing_holds_up_no_other(server: Path, tmp_path: Path) -> None:
    """The server read each new connection's request at once, for up to 10 s: a connected
    client that sent nothing held up every fork behind it, then was refused."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(os.environ[warm.SOCKET_ENV])
    try:
        child = warm.spawn("tests.warm_target:fail", [], dict(os.environ), tmp_path)
        assert child is not None and child.wait(timeout=30) == 1
        # Served while the silent one is still waiting: it was neither read nor refused.
        assert select.select([silent], [], [], 0)[0] == []
    finally:
        silent.close()
    again = warm.spawn("tests.warm_target:fail", [], dict(os.environ), tmp_path)
    assert again is not None and again.wait(timeout=30) == 1  # its close cost the server nothing


def test_a_child_signalled_as_soon_as_its_pid_arrives_dies_of_the_signal(
    server: Path, tmp_path: Path
) -> None:
    # The child used to take a fresh process's signal handling after it had sent its pid: a
    # SIGTERM in between ran the server's handler and the child reported exit 0 (seen once
    # in CI, in the test below, as 0 == -SIGTERM).
    codes = []
    for _ in range(20):
        child = warm.spawn("tests.warm_target:sleep", ["60"], dict(os.environ), tmp_path)
        assert child is not None
        child.terminate()
        codes.append(child.wait(timeout=30))
    assert codes == [-signal.SIGTERM] * 20


def test_a_target_that_waits_for_an_import_forks_once_the_server_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's fork waits for the server's import of what it needs, instead of importing
    it itself beside the server; a target that waits for nothing forks between two imports.
    Two that wait for the same import fork in one batch, and neither holds the other's
    streams."""
    gates = tmp_path / "gates"
    gates.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path), WARM_GATES=str(gates))
    sleeper, gated, other = (f"tests.warm_target:{n}" for n in ("sleep", "gated", "report"))
    preload = ["tests.warm_gate_a", "tests.warm_gate_b"]
    wait_for = {sleeper: "tests.warm_gate_b", gated: "tests.warm_gate_b"}
    sent = threading.Semaphore(0)
    receive = warm._recv_reply

    def after_sending(conn: Any) -> dict:
        sent.release()  # the request is in the server's backlog: it reads it after an import
        return receive(conn)

    monkeypatch.setattr(warm, "_recv_reply", after_sending)
    log = tmp_path / "log"
    with warm.fork_server(env, log, preload, [sleeper, gated, other], wait_for) as variables:
        for key, value in variables.items():
            monkeypatch.setenv(key, value)
        pipes = {target: os.pipe() for target in (sleeper, gated, other)}
        children: dict[str, Any] = {}

        def request(target: str, args: list[str]) -> None:
            fds = (0, pipes[target][1], 2)
            children[target] = warm.spawn(target, args, dict(os.environ), tmp_path, fds)

        threads = {
            target: threading.Thread(target=request, args=(target, args))
            for target, args in ((sleeper, ["60"]), (gated, []), (other, ["0"]))
        }
        for thread in threads.values():  # in this order, into the server's backlog
            thread.start()
            assert sent.acquire(timeout=30)
        for _, write_end in pipes.values():
            os.close(write_end)
        (gates / "tests.warm_gate_a").touch()  # the server takes the three requests now
        threads[other].join(timeout=30)
        # The other target forked and ended while the server still imports warm_gate_b.
        assert children[other] is not None and children[other].wait(timeout=30) == 0
        assert gated not in children and sleeper not in children
        (gates / "tests.warm_gate_b").touch()  # both waiting requests fork, sleeper first
        for target in (sleeper, gated):
            threads[target].join(timeout=30)
            assert children[target] is not None
        # The sleeper (60 s) holds no copy of the gated child's stdout: it ends with that child.
        lines = read_to_end(pipes[gated][0], within_s=30).splitlines()
        assert children[gated].wait(timeout=30) == 0 and children[sleeper].poll() is None
        children[sleeper].terminate()
        assert children[sleeper].wait(timeout=30) == -signal.SIGTERM
        for target in (sleeper, other):
            os.close(pipes[target][0])
    # Forked before the server froze its heap (it does once the preload is done), the child
    # froze it itself.
    assert json.loads(lines[-1]) == {"imported_by_server": True, "frozen": True}
    assert f"forked {gated}" in log.read_text()


def read_to_end(fd: int, within_s: float) -> str:
    """What a pipe carries until every writer has closed it; fails after within_s."""
    deadline = time.monotonic() + within_s
    data = b""
    while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            os.close(fd)
            return data.decode()
        data += chunk
    raise AssertionError(f"the pipe was still open after {within_s} s: {data!r}")


def test_a_target_not_on_the_list_is_refused_and_the_caller_starts_its_own(
    server: Path, tmp_path: Path
) -> None:
    assert warm.spawn("os:system", ["true"], dict(os.environ), tmp_path) is None
    assert "refused a request: target 'os:system' is not one this server runs" in server.read_text()
    # The server carries on.
    child = warm.spawn("tests.warm_target:report", ["0"], dict(os.environ), tmp_path)
    assert child is not None and child.wait(timeout=30) == 0


def test_without_a_server_spawn_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(warm.SOCKET_ENV, raising=False)
    assert warm.spawn("tests.warm_target:report", ["0"], dict(os.environ), tmp_path) is None
    monkeypatch.setenv(warm.SOCKET_ENV, str(tmp_path / "no-socket"))
    assert warm.spawn("tests.warm_target:report", ["0"], dict(os.environ), tmp_path) is None


CLIENT = """
import os, time
from pipelines import kfp_task, warm
child = warm.spawn("tests.warm_target:sleep", ["60"], dict(os.environ), ".")
os.write(1, f"pid={child.pid}\\n".encode())  # one write: print's two could take the child's between
time.sleep(60)
"""


def test_a_child_ends_with_its_client(server: Path) -> None:
    """A step killed mid-way takes its forked work with it, as it would its own child's."""
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    # The child writes to the client's stdout too: its "sleeping", once it runs its target,
    # may come before or after the client's line.
    lines: list[str] = []
    for line in client.stdout:
        lines.append(line)
        if "sleeping\n" in lines and any(seen.startswith("pid=") for seen in lines):
            break
    pid = int(next(seen for seen in lines if seen.startswith("pid=")).removeprefix("pid="))
    # As `ps` shows it (the server's own command line names the target too: not a proof).
    title = f"{sys.executable} -m tests.warm_target"
    assert Path(f"/proc/{pid}/cmdline").read_text().startswith(title)
    client.kill()
    client.wait()
    assert gone(pid)


def test_the_launcher_forks_each_attempt_of_one_worker(server: Path, tmp_path: Path) -> None:
    """run_single's attempts fork from the server, with torchrun's variables and a log each."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    code, attempts = run_single(["-m", "tests.warm_target", "5"], env, 1, tmp_path, lambda _: None)
    assert (code, attempts) == (0, 2)
    logs = sorted(tmp_path.glob("*/attempt-*.log"))
    firsts = [log.read_text().split()[:2] for log in logs]
    assert firsts == [["attempt", "0"], ["attempt", "1"]]
    pids = [log.read_text().split()[4] for log in logs]
    text = server.read_text()
    assert all(f"forked tests.warm_target:main as pid {pid}" in text for pid in pids)


def test_a_server_that_died_during_the_run_is_named_at_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "fork-server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    with warm.fork_server(env, log, preload=["json"], targets=TARGETS):
        (child,) = psutil.Process().children()
        child.kill()
        # Not child.wait(): it reaps the process, and Popen would read exit code 0.
        deadline = time.monotonic() + 10
        while child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "the fork server ended during the run (killed by SIGKILL" in caplog.text
    assert str(log) in caplog.text
    caplog.clear()
    with warm.fork_server(env, log, preload=["json"], targets=TARGETS):
        pass
    assert "fork server ended" not in caplog.text  # one stopped at the end is no news


def test_the_server_ends_when_its_parent_does(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "from pathlib import Path\n"
            "from pipelines import warm\n"
            "with warm.fork_server(dict(os.environ), Path(sys.argv[1]), ['json'], []):\n"
            "    print('up', flush=True); time.sleep(60)\n",
            str(tmp_path / "log"),
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None and parent.stdout.readline() == "up\n"
    server_pid = next(
        int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(int(p)) == parent.pid
    )
    parent.kill()
    parent.wait()
    assert gone(server_pid)


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_kfp_command_of_another_shape_runs_as_kfp_runs_it(
    server: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only a lightweight component's `sh -ec` command forks; kfp's own runner takes the rest."""
    from kfp.local.subprocess_task_handler import run_local_subprocess

    command = [sys.executable, "-c", "print('fresh', flush=True); raise SystemExit(3)"]
    assert not kfp_task.is_lightweight(command)
    assert kfp_task.run_task(command, fresh=run_local_subprocess) == 3
    assert "fresh" in capsys.readouterr().out
    assert "kfp_task" not in server.read_text()
