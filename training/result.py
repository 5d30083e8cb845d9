"""What a training run reports: the launcher reads it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

# Beside model.json under models/NAME/RUN_ID/, written just before it.
RESULT_OBJECT = "train-result.json"


@dataclass
class TrainResult:
    model_uri: str
    model_sha256: str
    mlflow_run_id: str
    experiment_id: str
    tracking_uri: str
    registered_model: str
    version: str
    val_accuracy: float
    test_accuracy: float
    epochs: int
    resumed_from_epoch: int
    world_size: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    param_digests: list[str] = field(default_factory=list)  # one per rank: DDP keeps them equal
    precision: str = ""  # what train.precision resolved to on the hardware that trained
