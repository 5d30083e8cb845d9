"""The embedded S3 server: nanio on 127.0.0.1, a free port, random keys, data in the state dir."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipelines.config import PipelineConfig, StorageConfig
from pipelines.errors import StorageError
from pipelines.processes import HOST, free_port, start_service, terminate
from pipelines.storage import EMBEDDED_ENV

log = logging.getLogger("mlops.s3")

READY_TIMEOUT_S = 30.0


class EmbeddedS3:
    """A real S3 server process for one run. Keys are new each run; the data persists."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = 0
        self.access_key = ""
        self.secret_key = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that point a child process (a step, MLflow, torchrun) at this server."""
        return {
            "MINIO_ENDPOINT": self.endpoint,
            "MINIO_ACCESS_KEY": self.access_key,
            "MINIO_SECRET_KEY": self.secret_key,
        }

    def start(self) -> EmbeddedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_key = "mlops-" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(32)
        scratch = self.data_dir.parent / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            NANIO_ACCESS_KEY=self.access_key,
            NANIO_SECRET_KEY=self.secret_key,
            TMPDIR=str(scratch),
        )
        cmd = [
            sys.executable, "-m", "pipelines.s3serve", "serve",
            "--host", HOST, "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        log_path = self.data_dir.parent / "s3server.log"
        with open(log_path, "ab") as log_file:
            self.proc = start_service(cmd, env, log_file)
        self._wait_ready(log_path)
        os.environ[EMBEDDED_ENV] = f"{self.endpoint} {log_path}"
        log.info("embedded S3 server on %s (data in %s)", self.endpoint, self.data_dir)
        return self

    def _wait_ready(self, log_path: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise StorageError(
                    f"the embedded S3 server exited with code {self.proc.returncode}; "
                    f"see {log_path}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise StorageError(f"the embedded S3 server did not listen within {READY_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        if os.environ.get(EMBEDDED_ENV, "").startswith(f"{self.endpoint} "):
            del os.environ[EMBEDDED_ENV]

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def with_embedded_store(cfg: PipelineConfig, server: EmbeddedS3) -> PipelineConfig:
    """The same config, pointed at a running embedded server."""
    storage = StorageConfig.model_validate(
        {
            **cfg.storage.model_dump(),
            "endpoint": server.endpoint,
            "access_key": server.access_key,
            "secret_key": server.secret_key,
        }
    )
    return cfg.model_copy(update={"storage": storage})
