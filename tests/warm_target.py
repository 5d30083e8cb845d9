"""Functions the fork-server tests have a real fork server run (tests/test_warm.py)."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path


def report(argv: list[str]) -> int:
    """Print what the child was given, then exit with the code in argv[0]."""
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    seen = {"argv": argv, "cwd": os.getcwd(), "env": os.environ.get("WARM_TEST")}
    seen["ignored"] = [s for s in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(s) == 1]
    print(json.dumps(seen | {"argv0": sys.argv[0], "fds": fds}))
    print("to stderr", file=sys.stderr)
    print(sys.stdin.read(), end="")
    return int(argv[0])


def sleep(argv: list[str]) -> int:
    print("sleeping", flush=True)
    time.sleep(float(argv[0]))
    return 0


def fail(argv: list[str]) -> int:
    raise RuntimeError("an unexpected error in a forked child")


def main(argv: list[str]) -> int:
    """A trainer stand-in for the launcher: fails its first attempt, then succeeds."""
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    print(f"attempt {attempt} in pid {os.getpid()} rank {os.environ['RANK']}")
    return int(argv[0]) if attempt == 0 else 0


def hold(module: str) -> int:
    """Block the import of `module` until the file $WARM_GATES/MODULE exists (60 s at most);
    the importing process's pid."""
    flag = Path(os.environ["WARM_GATES"]) / module
    deadline = time.monotonic() + 60
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()


def gated(argv: list[str]) -> int:
    """Whether the fork server, not this child, imported tests.warm_gate_b, and whether what
    it had imported is out of this child's garbage collections."""
    frozen = gc.get_freeze_count()  # before this child imports anything itself
    from tests import warm_gate_b

    imported_by_server = os.getpid() != warm_gate_b.IMPORTED_BY
    print(json.dumps({"imported_by_server": imported_by_server, "frozen": frozen > 0}))
    return 0
