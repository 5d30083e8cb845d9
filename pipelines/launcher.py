"""Start training/train.py on this machine: torchrun for several ranks, a plain process for one."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from pipelines import warm
from pipelines.errors import REPORT_ENV, exit_words, reported
from pipelines.processes import terminate

log = logging.getLogger("mlops.train_step")
ROOT = Path(__file__).resolve().parent.parent
PREFIX_TEMPLATE = "[rank${rank}] "  # torchrun's --log-line-prefix-template
PREFIX = PREFIX_TEMPLATE.replace("${rank}", "0")  # the one rank run_single starts
# What torchrun's agent handles (and forwards to its workers) by default.
TORCHRUN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
USAGE_EXIT = 2  # a config error in the trainer: a restart would fail the same way


Ready = Callable[[warm.Process], None]  # waits for what the process needs, given it


def _supervise(proc: warm.Process, ready: Ready) -> int:
    """Wait for `ready` (run while the process starts), then for the process; stop it if
    either is interrupted or fails."""
    try:
        ready(proc)
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
    ready: Ready,
) -> int:
    """`torchrun --standalone --nproc_per_node=<workers> PROGRAM`; its exit code."""
    # torchrun handles these whatever this process ignores: under nohup its SIGHUP handler
    # stopped the training, and its workers started with SIGHUP at its default.
    handled = [s.name for s in TORCHRUN_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={workers}",
        f"--max-restarts={max_restarts}",
        "--tee=3", f"--log-line-prefix-template={PREFIX_TEMPLATE}",
        f"--log-dir={log_dir}", f"--signals-to-handle={','.join(handled)}",
        *program,
    ]  # fmt: skip
    # Worker output goes to stderr, so this step's stdout carries only its JSON result.
    return _supervise(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sys.stderr), ready)


def _tee(source: TextIO, path: Path) -> None:
    """Copy the worker's lines to stderr, prefixed, and to its log, until the pipe closes. A
    failed write is dropped, never fatal: a reader that stopped would block the worker."""
    with open(path, "w", encoding="utf-8", errors="replace", buffering=1) as log_file:
        for line in source:
            for out, text in ((sys.stderr, PREFIX + line), (log_file, line)):
                with contextlib.suppress(OSError, ValueError):
                    out.write(text)


def _start(program: list[str], env: dict[str, str]) -> tuple[warm.Process, TextIO]:
    """`python PROGRAM` (forked where warm.start can); its stdout and stderr as one stream."""
    started = warm.piped(lambda fds: warm.start(program, env, ROOT, fds))
    assert started is not None  # warm.start always starts one
    return started


def _final(env: dict[str, str]) -> bool:
    """Whether the worker reported an error that a restart meets again: a shard that does not
    match its sha256 was read, and refused, once per restart."""
    error = reported(Path(env[REPORT_ENV])) if env.get(REPORT_ENV) else None
    return error is not None and error.final


def run_single(
    program: list[str],
    env: dict[str, str],
    max_restarts: int,
    log_dir: Path,
    ready: Ready,
) -> tuple[int, int]:
    """One rank without torchrun's agent, under the variables torchrun would set. The agent
    imports torch before it starts its worker, about 4 s on the critical path here, and for one
    rank it has no peers to rendezvous or restart together. What it does for one rank is kept:
    up to max_restarts restarts (each resumes from the last checkpoint; none after a config
    error, or another error that a restart meets again), rank-prefixed lines on stderr, and each
    attempt's log in a folder of log_dir per launch, as torchrun keeps them. Returns the exit
    code and the number of attempts."""
    log_dir = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log_dir.mkdir(parents=True)
    env = dict(env, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    code, attempts = 0, 0
    while attempts <= max_restarts:
        env["TORCHELASTIC_RESTART_COUNT"] = str(attempts)  # as torchrun counts them
        if env.get(REPORT_ENV):  # what the last attempt reports, not an earlier one
            Path(env[REPORT_ENV]).unlink(missing_ok=True)
        proc, output = _start(program, env)
        path = log_dir / f"attempt-{attempts}.log"
        tee = threading.Thread(target=_tee, args=(output, path), daemon=True)
        tee.start()
        attempts += 1
        try:
            code = _supervise(proc, ready if attempts == 1 else lambda _: None)
        finally:
            tee.join(timeout=10)  # the pipe closes once the process has gone
            if tee.is_alive():  # something the worker started holds it open
                log.warning("%s may miss the end of the worker's output", path)
        if code in (0, USAGE_EXIT) or attempts > max_restarts or _final(env):
            break
        log.warning(
            "the trainer ended (%s): restart %d of %d, from its last checkpoint",
            exit_words(code),
            attempts,
            max_restarts,
        )
    return code, attempts
