"""Logging set-up, and progress that is a bar on a terminal and plain log lines elsewhere."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("mlops")
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Set by a command run with -v, for every process it starts: the steps and the trainer took
# no -v, and logged at INFO whatever the driver was asked.
VERBOSE_ENV = "MLOPS_VERBOSE"


class Unread:
    """A standard stream that outlives its reader. A step, or the driver, that is stopped
    closes the pipe its child writes to before the child has finished; the child's next
    write raised BrokenPipeError wherever it came (one inside MLflow's end_run left a stopped
    trainer's run RUNNING). Once the reader has gone, the stream writes to /dev/null."""

    def __init__(self, stream: object):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.mute()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.mute()

    def mute(self) -> None:
        # The descriptor, not the object: what was written to it before, and what others
        # (a logging handler, C code) write to it, goes to /dev/null too.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.stream.fileno())
        os.close(null)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


def setup_logging(verbose: bool = False) -> None:
    """INFO, or DEBUG with -v here or in the command that started this process."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    verbose = os.environ.get(VERBOSE_ENV) == "1"
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), Unread):
            setattr(sys, name, Unread(getattr(sys, name)))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=LOG_FORMAT,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # The S3 and HTTP clients log every request at INFO; that drowns the step's own lines.
    for noisy in ("urllib3", "botocore", "nanio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def is_terminal() -> bool:
    return sys.stderr.isatty()


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "it",
    every_s: float = 10.0,
) -> Iterator[T]:
    """Yield items with a tqdm bar on a terminal, or a log line every `every_s` seconds."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if is_terminal():
        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s (%.0f %s/s)", desc, done, of, unit, done / (now - start), unit)


def parallel_map(
    fn: Callable[[T], R], items: Iterable[T], desc: str, unit: str = "obj", workers: int = 8
) -> list[R]:
    """fn over items on a thread pool (S3 calls wait on the network, not the CPU), in order."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, item) for item in items]
        for _ in progress(as_completed(futures), desc, total=len(futures), unit=unit):
            pass
        return [f.result() for f in futures]
