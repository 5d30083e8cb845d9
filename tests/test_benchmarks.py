"""The benchmark report states each target against its measured value, or says it is missing."""

from __future__ import annotations

from benchmarks.report import targets
from pipelines.config import PipelineConfig


def test_targets_are_judged_from_the_results() -> None:
    tc = PipelineConfig().train
    docs = {
        "time_to_accuracy": {
            "figures": [
                {
                    "profile": "quick",
                    "test_accuracy": 0.83,
                    "val_accuracy": 0.84,
                    "wall_s": 580.0,
                    "met": False,
                },
            ]
        },
        "pipeline_overhead": {"summary": {"overhead_warm_median_s": 18.0, "overhead_cold_s": 25}},
        "serving": {"summary": {"p50_ratio": 1.2, "throughput_ratio": 0.5}},
        "train_throughput": {
            "figures": [{"stem": tc.stem, "precision": tc.precision, "ddp_ratio": 0.93}]
        },
    }
    rows = {r["target"].split(",")[0]: r for r in targets(docs)}
    assert rows["`quick` profile"]["verdict"] == "NOT met"
    assert rows["`quick` profile"]["measured"] == "83.00% test / 84.00% val in 9.7 min"
    assert rows["`full` profile"]["verdict"] == "not measured"
    assert rows["pipeline overhead (smoke"]["verdict"] == "met"
    assert rows["serving p50"]["verdict"] == "met"
    assert rows["serving 16-client throughput / in-process batched"]["verdict"] == "NOT met"
    ddp = next(r for k, r in rows.items() if k.startswith("DDP"))
    assert ddp["verdict"] == "met" and ddp["measured"] == "0.93x"
    assert rows["ResNet-18 to 94% on one H100"]["verdict"] == "not measured"
