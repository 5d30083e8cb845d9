"""The KFP definition compiles to IR whose tasks read like the diagram and share one image."""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml
from kfp import compiler

from pipelines.config import PipelineConfig
from pipelines.kfp_pipeline import build_pipeline
from pipelines.steps import STEPS


def test_ir_has_the_five_steps_in_order_on_the_config_image(tmp_path: Path) -> None:
    path = tmp_path / "ir.yaml"
    compiler.Compiler().compile(build_pipeline(PipelineConfig()), str(path))
    ir = next(yaml.safe_load_all(path.read_text()))  # then the platform config
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


def test_cluster_pods_get_the_secrets_and_train_a_memory_backed_shm(tmp_path: Path) -> None:
    """kfp-kubernetes platform config: what the Argo pods get, for the KFP pods too."""
    path = tmp_path / "ir.yaml"
    compiler.Compiler().compile(build_pipeline(PipelineConfig()), str(path))
    _, platform = yaml.safe_load_all(path.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{step}" for step in STEPS}
    cluster = PipelineConfig().cluster
    for name, spec in executors.items():
        secrets = {s["secretName"]: s for s in spec["secretAsEnv"]}
        s3 = {e["envVar"] for e in secrets[cluster.s3_secret]["keyToEnv"]}
        assert s3 == {"MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"}, name
        assert secrets[cluster.s3_secret]["optional"] is False
        assert secrets[cluster.mlflow_secret]["optional"] is True
        # proto3 JSON writes an int64 as a string.
        user = {k: str(v) for k, v in spec["securityContext"].items() if k != "runAsNonRoot"}
        assert user == {"runAsUser": "1000", "runAsGroup": "1000"}, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
    # No task is served from KFP's cache: verify-data's check would be skipped.
    tasks = next(yaml.safe_load_all(path.read_text()))["root"]["dag"]["tasks"]
    assert all(t["cachingOptions"].get("enableCache") is not True for t in tasks.values())
    (shm,) = executors["exec-train"]["emptyDirMounts"]
    assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    assert not any("emptyDirMounts" in s for n, s in executors.items() if n != "exec-train")


def test_the_ir_follows_the_config_it_is_built_from(tmp_path: Path) -> None:
    """The components took the default config's image and Secrets at import, so `compile` and
    `submit --backend kfp` with another image ran the steps on the old one, beside a
    PyTorchJob on the new; nor did the step resources reach the tasks."""
    from pipelines.config import load_config

    cfg = load_config(
        overrides={
            "image": "registry.example/mlops:0.2.0",
            "cluster.s3_secret": "team-s3",
            "cluster.step_resources.cpu": "3",
            "cluster.step_resources.memory": "5Gi",
        },
        environ={},
    )
    path = tmp_path / "ir.yaml"
    compiler.Compiler().compile(build_pipeline(cfg), str(path))
    ir, platform = yaml.safe_load_all(path.read_text())
    containers = [e["container"] for e in ir["deploymentSpec"]["executors"].values()]
    assert {c["image"] for c in containers} == {"registry.example/mlops:0.2.0"}
    for c in containers:
        res = c["resources"]
        # The strings are what KFP's backend puts in the pod; the numbers, its old fields.
        assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == ("3", "3"), res
        assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == ("5Gi", "5Gi")
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for spec in executors.values():
        assert "team-s3" in {s["secretName"] for s in spec["secretAsEnv"]}
