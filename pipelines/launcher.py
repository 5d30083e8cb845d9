"""Start training/train.py on this machine: torchrun for several ranks, a plain process for one."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from pipelines.processes import terminate

log = logging.getLogger("mlops.train_step")
ROOT = Path(__file__).resolve().parent.parent
PREFIX = "[rank0] "  # as torchrun's --log-line-prefix-template writes it
USAGE_EXIT = 2  # a config error in the trainer: a restart would fail the same way


def _supervise(proc: subprocess.Popen, ready: Callable[[], None]) -> int:
    """Wait for `ready` (run while the process starts), then for the process; stop it if
    either is interrupted or fails."""
    try:
        ready()
        return proc.wait()
    except BaseException:
        terminate(proc)
        raise


def run_torchrun(
    program: list[str],
    env: dict[str, str],
    workers: int,
    max_restarts: int,
    log_dir: Path,
    ready: Callable[[], None],
) -> int:
    """`torchrun --standalone --nproc_per_node=<workers> PROGRAM`; its exit code."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={workers}",
        f"--max-restarts={max_restarts}",
        "--tee=3", "--log-line-prefix-template=[rank${rank}] ",
        f"--log-dir={log_dir}",
        *program,
    ]  # fmt: skip
    # Worker output goes to stderr, so this step's stdout carries only its JSON result.
    return _supervise(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sys.stderr), ready)


def _tee(source: TextIO, log_file: TextIO) -> None:
    for line in source:
        sys.stderr.write(PREFIX + line)
        log_file.write(line)
    log_file.flush()


def run_single(
    program: list[str],
    env: dict[str, str],
    max_restarts: int,
    log_dir: Path,
    ready: Callable[[], None],
) -> int:
    """One rank without torchrun's agent, under the variables torchrun would set. The agent
    imports torch before it starts its worker, about 4 s on the critical path here, and for one
    rank it has no peers to rendezvous or restart together. What it does for one rank is kept:
    up to max_restarts restarts (each resumes from the last checkpoint), rank-prefixed lines on
    stderr, and each attempt's log in a folder of log_dir per launch, as torchrun keeps them."""
    log_dir = log_dir / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    code = 0
    for attempt in range(max_restarts + 1):
        env["TORCHELASTIC_RESTART_COUNT"] = str(attempt)  # as torchrun counts them
        with open(log_dir / f"attempt-{attempt}.log", "w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, *program],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
            )
            assert proc.stdout is not None
            tee = threading.Thread(target=_tee, args=(proc.stdout, log_file), daemon=True)
            tee.start()
            try:
                code = _supervise(proc, ready if attempt == 0 else lambda: None)
            finally:
                tee.join(timeout=10)  # the pipe closes once the process has gone
        if code in (0, USAGE_EXIT) or attempt == max_restarts:
            break
        log.warning(
            "the trainer exited with code %d: restart %d of %d, from its last checkpoint",
            code,
            attempt + 1,
            max_restarts,
        )
    return code
