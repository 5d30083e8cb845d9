"""Shared fixtures: a real S3 server process per test, and configs pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.config import PipelineConfig, load_config
from pipelines.s3server import EmbeddedS3
from pipelines.storage import ObjectStore

MakeConfig = Callable[..., PipelineConfig]


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
