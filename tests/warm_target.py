"""Functions the fork-server tests have a real fork server run (tests/test_warm.py)."""

from __future__ import annotations

import json
import os
import sys
import time


def report(argv: list[str]) -> int:
    """Print what the child was given, then exit with the code in argv[0]."""
    print(json.dumps({"argv": argv, "cwd": os.getcwd(), "env": os.environ.get("WARM_TEST")}))
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
