"""An untrained classifier saved in the layout the server loads (for tests and benchmarks)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from serving.loader import MODEL_JSON
from training.model import build_classifier

MEAN, STD = 0.5, 0.25  # any normalisation will do for random weights


def write_untrained_model(
    folder: Path,
    classes: list[str],
    stem: str,
    shape: tuple[int, int, int] = (3, 32, 32),
    seed: int = 0,
    flip_tta: bool = False,
) -> Path:
    """model.safetensors and model.json (sha256, classes, stem, flip_tta, input,
    normalisation), the fields train.py records and serving/loader.py reads; the weights are
    random (seeded)."""
    torch.manual_seed(seed)
    channels = shape[0]
    model = build_classifier(len(classes), channels, stem, [MEAN] * channels, [STD] * channels)
    weights = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    record = {
        "weights": "model.safetensors",
        "sha256": hashlib.sha256(weights).hexdigest(),
        "classes": classes,
        "num_classes": len(classes),
        "stem": stem,
        "flip_tta": flip_tta,
        "input": {"shape": list(shape), "dtype": "uint8", "layout": "NCHW"},
        "normalization": {"mean": [MEAN] * channels, "std": [STD] * channels, "scale": 255},
    }
    (folder / MODEL_JSON).write_text(json.dumps(record))
    return folder
