"""One command at a time starts services on a state dir: its S3 data, MLflow database and KFP
workspace are not made for two servers or two runs (run, serve, mlflow-ui, a step's CLI)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.errors import ConfigError

LOCK = "lock"  # in the state dir: who holds it, as JSON; the lock is an flock on it
_held: dict[Path, int] = {}  # this process's locks (a run opens the store inside its own)


def held(state_dir: Path) -> bool:
    """Whether this process holds the state dir (hold's block is running)."""
    return (state_dir / LOCK).resolve() in _held


@contextlib.contextmanager
def hold(state_dir: Path, command: str) -> Iterator[None]:
    """Hold the state dir for the block, or refuse (exit 2) naming the command that holds it.
    The kernel releases an flock when its holder dies, however it dies: no stale lock."""
    path = (state_dir / LOCK).resolve()
    if path in _held:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"state_dir {state_dir} is in use by {_holder(fd)}; wait for it to end, or "
                "pass --state-dir DIR"
            ) from None
        _held[path] = fd
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        _write(fd, {"pid": os.getpid(), "command": command, "since": since})
        try:
            yield
        finally:
            del _held[path]
    finally:
        os.close(fd)  # and with it the lock


def note(state_dir: Path, **fields: str) -> None:
    """Add to what a refused command is told, e.g. where the holder's MLflow UI is."""
    fd = _held.get((state_dir / LOCK).resolve())
    if fd is not None:
        _write(fd, _read(fd) | fields)


def _write(fd: int, record: dict[str, object]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def _read(fd: int) -> dict[str, object]:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # caught between the holder's truncate and write
        return {}
    return record if isinstance(record, dict) else {}


def _holder(fd: int) -> str:
    record = _read(fd)
    if "pid" not in record:
        return "another command"
    text = f"`{record.get('command')}` (pid {record['pid']}, since {record.get('since')})"
    if record.get("mlflow"):
        text += f", whose MLflow UI is {record['mlflow']}"
    return text
