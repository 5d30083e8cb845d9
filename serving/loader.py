"""Load a trained model from a model dir: model.json, then the weights, only via safetensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from torch import nn

from pipelines.errors import DataError, IntegrityError
from serving.launch import MODEL_JSON
from training.model import build_classifier


def load_model(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network in eval mode and its record; the weights' sha256 must match the record."""
    try:
        meta = json.loads((model_dir / MODEL_JSON).read_text())
        weights = (model_dir / meta["weights"]).read_bytes()
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"{model_dir} holds no readable model ({exc})") from None
    actual = hashlib.sha256(weights).hexdigest()
    if actual != meta["sha256"]:
        raise IntegrityError(
            f"{model_dir / meta['weights']}: sha256 mismatch (model.json records "
            f"{meta['sha256'][:12]}…, the file has {actual[:12]}…): refusing to load it"
        )
    channels = meta["input"]["shape"][0]
    norm = meta["normalization"]
    model = build_classifier(
        meta["num_classes"],
        channels,
        meta["stem"],
        norm["mean"],
        norm["std"],
        flip_tta=meta.get("flip_tta", False),  # served exactly as it was evaluated
    )
    model.load_state_dict(load_safetensors(weights), strict=True)
    return model.eval(), meta
