"""Shared fixtures: a real S3 server process per test, and configs pointed at it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from components.feature_engineering import engineer_features
from components.verify_data import verify_data
from pipelines.config import PipelineConfig, load_config
from pipelines.mlflow_server import LocalMlflow, with_tracking
from pipelines.s3server import EmbeddedS3, with_embedded_store
from pipelines.storage import ObjectStore

MakeConfig = Callable[..., PipelineConfig]

# The test process imports mlflow before pytest marks a test as running, and MLflow decides on
# its telemetry at import: no usage report from the tests either.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The stop tests send Ctrl-C and hang-ups as a terminal does, and every process a test starts
# keeps the signals this one ignores, as a run's steps keep the driver's: a runner that starts
# the suite in the background (SIGINT ignored) or under nohup (SIGHUP) made each a no-op.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[EmbeddedS3]:
    with EmbeddedS3(tmp_path / "s3") as server:
        yield server


@pytest.fixture
def make_cfg(s3: EmbeddedS3, tmp_path: Path) -> MakeConfig:
    """A smoke-profile config on the test's S3 server; keyword args are dotted overrides."""

    def make(**overrides: Any) -> PipelineConfig:
        dotted = {k.replace("__", "."): v for k, v in overrides.items()}
        dotted.setdefault("state_dir", str(tmp_path / "state"))
        return load_config("smoke", overrides=dotted, environ=s3.env())

    return make


@pytest.fixture
def store(make_cfg: MakeConfig) -> ObjectStore:
    return ObjectStore(make_cfg().storage)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One S3 server, one MLflow server, and processed synthetic data for the whole module."""
    root = tmp_path_factory.mktemp("train")
    with EmbeddedS3(root / "s3") as s3:
        overrides = {"state_dir": str(root / "state"), "dataset.name": "synthetic"}
        cfg = with_embedded_store(load_config("smoke", overrides=overrides, environ={}), s3)
        store = ObjectStore(cfg.storage)
        store.ensure_buckets()
        server = LocalMlflow(cfg, root / "mlflow").start()
        try:
            verify_data(cfg, store)
            processed = engineer_features(cfg, store).processed_uri
            cfg = with_tracking(cfg, server.wait())
            yield SimpleNamespace(
                cfg=cfg, store=store, processed=processed, s3=s3, root=root, mlflow=server
            )
        finally:
            server.stop()
