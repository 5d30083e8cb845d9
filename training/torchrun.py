"""torchrun as a training pod's command, whose exit code says what ended it: 128+N for signal N.

The Training Operator's ExitCode restart policy gives a replica a new pod for 130, 137, 138 and
143 (a kill: a drained node's SIGTERM, the OOM killer) and fails the job for any other code.
torchrun itself exits 1 for both: a SIGTERM is raised in it as SignalException, and a rank the
OOM killer ended is a ChildFailedError of exit code -9. Here the same launcher (its flags and
PET_* variables unchanged) exits as the signal says, or with the failed rank's own code (2 for a
config error), printing torchrun's table of the failure instead of a traceback.

    python -m training.torchrun [torchrun flags] -m training.train ...
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

SIGNAL_BASE = 128  # a shell's exit code for a process a signal ended


def exit_code(returned: int) -> int:
    """A rank's exit code as a shell reports it: -N (ended by signal N) is 128+N."""
    return SIGNAL_BASE - returned if returned < 0 else returned


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun(argv)  # its children are stopped before either error reaches here
    except SignalException as exc:
        print(f"torchrun: stopped by {exc.sigval.name}", file=sys.stderr)
        return SIGNAL_BASE + int(exc.sigval)
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr)
        return exit_code(exc.get_first_failure()[1].exitcode) or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
