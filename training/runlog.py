"""The trainer's log on a cluster, kept in the store beside its model: its pods go with the job."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipelines.config import PipelineConfig
from pipelines.console import LOG_FORMAT
from pipelines.errors import PipelineError, expected
from pipelines.storage import ObjectStore
from training.dist import Dist
from training.resume import location

log = logging.getLogger("mlops.train")
LOGS = "logs/"  # below the run's model prefix: <timestamp>-rank<N>.log, one per process start


@contextlib.contextmanager
def kept_log(cfg: PipelineConfig, run_id: str, d: Dist) -> Iterator[None]:
    """Each rank's log of this start, and the error that ended it, uploaded as it ends. A
    failed workflow's exit handler deletes the PyTorchJob, and its pods' logs with it: the
    trainer's, the one a failed run is looked into for, was lost. Locally the run's folder
    keeps every attempt's log already."""
    if cfg.runtime != "kubernetes":
        yield
        return
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.NamedTemporaryFile("w+", prefix="trainer-", suffix=".log") as file:
        handler = logging.StreamHandler(file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            yield
        except Exception as exc:
            # As the process reports it: one line for an expected error, else the traceback.
            error = expected(exc)
            file.write(f"error: {error}\n" if error else traceback.format_exc())
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (a deleted pod, torchrun's stop)
            file.write(f"stopped: {type(exc).__name__}\n")
            raise
        finally:
            root.removeHandler(handler)
            file.flush()
            bucket, prefix, _ = location(cfg, run_id)
            key = f"{prefix}{LOGS}{started}-rank{d.rank}.log"
            try:
                ObjectStore(cfg.storage).put_file(bucket, key, Path(file.name))
            except (PipelineError, OSError) as exc:  # the training's own outcome comes first
                log.warning("the trainer's log was not kept in the store: %s", exc)
