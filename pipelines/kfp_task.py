"""kfp.local's step processes, forked from the run's fork server instead of started by `sh`."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines import warm

TARGET = "pipelines.kfp_task:main"
Runner = Callable[..., int]  # kfp.local.subprocess_task_handler.run_local_subprocess


def is_lightweight(command: list[str]) -> bool:
    """The command KFP gives a lightweight Python component: `sh -ec SCRIPT SOURCE ARGS...`,
    where SCRIPT writes SOURCE to a file and runs kfp.dsl.executor_main on it with ARGS."""
    return command[:2] == ["sh", "-ec"] and "kfp.dsl.executor_main" in command[2]


def run_task(
    full_command: list[str], env_vars: dict[str, str] | None = None, *, fresh: Runner
) -> int:
    """What kfp.local's run_local_subprocess does, through a fork: the step's lines printed as
    they come, then a blank line, and its exit code. Any other command, or no fork server,
    goes to `fresh`, kfp's own."""
    if not is_lightweight(full_command):
        return fresh(full_command=full_command, env_vars=env_vars)
    env = {**os.environ, **(env_vars or {}), "_KFP_RUNTIME": "true"}  # as SCRIPT sets it
    forked = warm.piped(lambda fds: warm.spawn(TARGET, full_command[3:], env, os.getcwd(), fds))
    if forked is None:
        return fresh(full_command=full_command, env_vars=env_vars)
    child, output = forked
    with output:
        for line in output:
            print(line, end="")
    print("\n")  # kfp's separation after a task's lines
    return child.wait()


def main(argv: list[str]) -> int:
    """SCRIPT, in the fork: SOURCE written to a new folder, then KFP's executor on it."""
    from kfp.dsl.executor_main import executor_main

    source, *args = argv
    path = Path(tempfile.mkdtemp()) / "ephemeral_component.py"
    path.write_text(source)
    sys.argv = ["kfp.dsl.executor_main", "--component_module_path", str(path), *args]
    executor_main()  # it parses sys.argv
    return 0


@contextlib.contextmanager
def forked_tasks() -> Iterator[list[int]]:
    """kfp.local runs its tasks through run_task for the block (kfp is pinned: its handler
    calls this module-level function; a command of another shape still runs as kfp runs it).
    Yields the tasks' exit codes as they end: a step killed before it could write its record
    is known by its code alone."""
    from kfp.local import subprocess_task_handler as handler

    fresh = handler.run_local_subprocess
    codes: list[int] = []

    def run(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        codes.append(run_task(full_command, env_vars, fresh=fresh))
        return codes[-1]

    handler.run_local_subprocess = run
    try:
        yield codes
    finally:
        handler.run_local_subprocess = fresh
