"""The KFP definition compiles to IR whose tasks read like the diagram and share one image."""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml
from kfp import compiler

from pipelines.config import PipelineConfig
from pipelines.kfp_pipeline import image_classifier
from pipelines.steps import STEPS


def test_ir_has_the_five_steps_in_order_on_the_config_image(tmp_path: Path) -> None:
    path = tmp_path / "ir.yaml"
    compiler.Compiler().compile(image_classifier, str(path))
    ir = yaml.safe_load(path.read_text())
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEPS)
    upstream = {name: task.get("dependentTasks", []) for name, task in tasks.items()}
    for before, after in itertools.pairwise(STEPS):
        assert upstream[after] == [before], (after, upstream[after])
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {PipelineConfig().image}
    assert set(ir["root"]["inputDefinitions"]["parameters"]) == {
        "config",
        "run_dir",
        "run_id",
        "serve",
    }
