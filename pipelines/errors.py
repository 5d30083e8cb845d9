"""Expected failures: each maps to an exit code and a one-line message, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

INTERRUPTED = 130  # the exit code of a Ctrl-C, as a shell reports a process ended by SIGINT
TERMINATED = 143  # and of a SIGTERM
STOPPED = (INTERRUPTED, TERMINATED)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a service manager, a CI runner's cancel) raised in a command that
    started services, so that it unwinds as Ctrl-C does and stops every one of them."""


def stopped_by(exc: KeyboardInterrupt) -> tuple[int, str]:
    """A Ctrl-C's or a SIGTERM's exit code (128 + the signal, as a shell reports it) and word."""
    return (
        (TERMINATED, "terminated") if isinstance(exc, Terminated) else (INTERRUPTED, "interrupted")
    )


class _Sigterm:
    # Whether a SIGTERM has been raised as Terminated and is unwinding this process. A stopped
    # process often gets a second (a trainer: the fork server's, then its step's terminate),
    # and raised again in an except or finally clause it would escape with a traceback. A
    # second is ignored, unless the first was lost in a finalizer (see redeliver_interrupts).
    unwinding = False


# The signals that stop a process as Ctrl-C does: SIGTERM, and SIGHUP (a closed terminal, a
# dropped SSH session), which ended every process of the run at once, its clean-up unrun: the
# MLflow run read RUNNING for good, and no summary named the way to resume.
TERMINATING = (signal.SIGTERM, signal.SIGHUP)
# What may be ignored where a process starts (`nohup` ignores SIGHUP; a shell, SIGINT in a
# background job): a forked process takes its client's choice, as a fresh one inherits it.
IGNORABLE = (signal.SIGINT, signal.SIGHUP)


def raise_on_sigterm(first: Callable[[], None] | None = None) -> None:
    """A SIGTERM (or SIGHUP) unwinds this process as Ctrl-C does: the services it started
    stop, and a step records its end (a step killed outright left no record: 0.0 s in the
    summary). `first` runs before the first one is raised; a repeat, while that unwinds, is
    ignored. A signal ignored where this process started stays ignored."""

    def terminated(signum: int, frame: object) -> None:
        if _Sigterm.unwinding:
            return
        _Sigterm.unwinding = True
        if first is not None:
            first()
        raise Terminated

    def interrupted(signum: int, frame: object) -> None:
        # A Ctrl-C unwinds too: the SIGTERM that follows it (a trainer's, from its step, which
        # took the same Ctrl-C) landed in run_main's `except KeyboardInterrupt` when both were
        # pending after a long C call, and escaped as a traceback.
        _Sigterm.unwinding = True
        raise KeyboardInterrupt

    for sig in TERMINATING:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where ignored
        signal.signal(signal.SIGINT, interrupted)


def redeliver_interrupts() -> None:
    """A Ctrl-C (or a SIGTERM raised as Terminated) that lands in a finalizer, a __del__ run
    by the garbage collector, is printed as 'Exception ignored' with a traceback and lost: the
    process would go on. Deliver its signal again, to stop the program where it can."""
    default = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            if isinstance(unraisable.exc_value, Terminated):
                _Sigterm.unwinding = False  # it is lost: nothing unwinds, so raise the next
            sig = stopped_by(unraisable.exc_value)[0] - 128
            # From another thread, a moment later: raised here, in the hook, it would be lost
            # again. Should it land in a finalizer again, this hook sends it once more.
            later = threading.Timer(0.05, os.kill, (os.getpid(), sig))
            later.daemon = True  # a process that ends first has stopped anyway
            later.start()
            return
        default(unraisable)

    sys.unraisablehook = hook


def exit_words(code: int) -> str:
    """An exit code as a person reads it. A negative one (Popen's, for a process that a signal
    ended) names the signal: a SIGKILL that nobody sent by hand is most often the kernel's,
    out of memory, and such a process prints nothing of it."""
    if code >= 0:
        return f"exit code {code}"
    try:
        words = f"killed by {signal.Signals(-code).name}"
    except ValueError:
        words = f"killed by signal {-code}"
    if -code == signal.SIGKILL:
        words += " (out of memory is the usual cause: see `dmesg`, or the pod's events)"
    return words


def server_said(exc: Exception) -> str:
    """An API error in one line. Something else on the port (a proxy's login page, another
    service) answers a whole HTML page, which the error printed as it came."""
    text = str(exc).strip() or type(exc).__name__
    page = re.search(r"<(!DOCTYPE|html)", text, re.IGNORECASE)
    if page:
        return text[: page.start()].rstrip(" :`'\"\n") + " (an HTML page, not the API's answer)"
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:300] + "..."


class PipelineError(Exception):
    """A failure the user can act on. The message names the problem and what to do."""

    exit_code = 1
    final = False  # True: the same inputs fail the same way again, so a retry is no use


def disk_full(exc: OSError) -> PipelineError | None:
    """A full disk (or quota) as one line naming the file, not a traceback; None for another
    OSError, which stays unexpected."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return PipelineError(
        f"no space left on the device{where}: free some space, or pass --state-dir on a disk "
        "with more room"
    )


def no_access(exc: OSError) -> PipelineError | None:
    """A file or folder this process may not use (a folder an earlier `sudo` run left, a
    read-only mount) as one line naming it, not a traceback; None for another OSError."""
    if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not exc.filename:
        return None
    return PipelineError(
        f"no access to {exc.filename} ({exc.strerror}): fix its owner or mode (a file or folder "
        "that another user, such as a `sudo` run, made), or use a path this user may (--data, "
        "--state-dir)"
    )


def expected(exc: Exception) -> PipelineError | None:
    """The failure as the one line a user can act on, or None where it is unexpected (and is
    to stay a traceback): a PipelineError, a full disk, or a file this user may not use."""
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, OSError):
        return disk_full(exc) or no_access(exc)
    return None


class ConfigError(PipelineError):
    """Bad usage or an invalid config value."""

    exit_code = 2
    final = True


class StorageError(PipelineError):
    """The object store cannot be reached or refused a request."""


class DataError(PipelineError):
    """The dataset is missing, malformed or does not decode."""


class IntegrityError(DataError):
    """A stored object does not match its recorded sha256."""

    final = True


# Kubernetes' terminationMessagePath: the pod's status carries what a container writes there,
# and Argo puts it in the step's message, which its retry expression reads as lastRetry.message.
TERMINATION_LOG = Path("/dev/termination-log")
FINAL_MARK = "no-retry: "  # begins the message of a final error (argo.retries)
TERMINATION_CHARS = 1000  # Kubernetes keeps 4096 bytes of it


def terminate_message(exc: PipelineError) -> None:
    """In a pod, the error as its termination message, marked when a retry is no use: a
    model below the gate, or an object that does not match its digest, failed the same way
    on each of a step's retries, with its backoff between."""
    if TERMINATION_LOG.exists():  # a pod's; not on a laptop
        text = f"{FINAL_MARK if exc.final else ''}{exc}"[:TERMINATION_CHARS]
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(text)


# A launcher that cannot see its worker's exit code (torchrun reports 1 for any worker failure)
# names a file in this variable; run_main writes the expected error there, so the launching
# step fails with the worker's own message and exit code.
REPORT_ENV = "MLOPS_ERROR_REPORT"


def report(exc: PipelineError) -> None:
    terminate_message(exc)
    path = os.environ.get(REPORT_ENV)
    if path:
        # Written whole, then renamed: ranks that fail together leave one complete report.
        part = Path(f"{path}.{os.getpid()}.part")
        with contextlib.suppress(OSError):  # the message is on stderr either way
            doc = {"exit_code": exc.exit_code, "error": str(exc), "final": exc.final}
            part.write_text(json.dumps(doc))
            part.replace(path)


def reported(path: Path) -> PipelineError | None:
    """The error a worker reported in `path`, as the class its exit code stands for."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    kind = ConfigError if doc.get("exit_code") == ConfigError.exit_code else PipelineError
    error = kind(str(doc.get("error", "")))
    error.final = bool(doc.get("final", kind.final))
    return error
