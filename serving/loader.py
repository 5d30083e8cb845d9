"""Load a trained model from a model dir: model.json, then the weights, only via safetensors."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from pipelines.errors import DataError, IntegrityError
from serving.launch import MODEL_JSON, WEIGHTS_NAME
from training.model import build_classifier

FIX = "train the model again or restore the file"


class _Strict(BaseModel):
    # A string is not taken for a number: the record is used as read, not as converted here.
    model_config = ConfigDict(strict=True)


class _Input(_Strict):
    shape: list[PositiveInt] = Field(min_length=3, max_length=3)  # C, H, W


class _Normalization(_Strict):
    mean: list[float]
    std: list[PositiveFloat]


class ModelRecord(_Strict):
    """The fields of model.json that loading and serving read; train.py writes more (metrics,
    lineage), which are not checked here."""

    weights: str = Field(pattern=f"^{WEIGHTS_NAME}$")
    sha256: str
    classes: list[str]
    num_classes: PositiveInt
    stem: str
    flip_tta: bool = False
    input: _Input
    normalization: _Normalization


def read_record(path: Path) -> dict[str, Any]:
    """model.json as a dict, its types and required fields checked: a bad record is a one-line
    DataError here, not a KeyError or a 500 on every request later."""
    try:
        text = path.read_text()
        record = ModelRecord.model_validate_json(text)
    except OSError as exc:
        raise DataError(f"{path.parent} holds no readable model ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'the record'}: {e['msg']}" for e in exc.errors()
        )
        raise DataError(f"{path}: not a valid model record ({problems}); {FIX}") from None
    if len(record.classes) != record.num_classes:
        raise DataError(
            f"{path}: names {len(record.classes)} classes but num_classes is "
            f"{record.num_classes}; {FIX}"
        )
    return json.loads(text)


def load_model(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network in eval mode and its record; the weights' sha256 must match the record."""
    meta = read_record(model_dir / MODEL_JSON)
    path = model_dir / meta["weights"]
    try:
        weights = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{model_dir} holds no readable model ({exc})") from None
    actual = hashlib.sha256(weights).hexdigest()
    if actual != meta["sha256"]:
        raise IntegrityError(
            f"{path}: sha256 mismatch (model.json records "
            f"{meta['sha256'][:12]}…, the file has {actual[:12]}…): refusing to load it"
        )
    norm = meta["normalization"]
    try:
        model = build_classifier(
            meta["num_classes"],
            meta["input"]["shape"][0],
            meta["stem"],
            norm["mean"],
            norm["std"],
            flip_tta=meta.get("flip_tta", False),  # served exactly as it was evaluated
        )
        model.load_state_dict(load_safetensors(weights), strict=True)
    # ValueError: a stem build_classifier does not know; RuntimeError: weights of another shape
    # (num_classes, channels or stem differ from what was trained); SafetensorError: a file
    # whose recorded sha256 was rewritten to match its damage.
    except (ValueError, RuntimeError, SafetensorError) as exc:
        # load_state_dict lists every mismatched tensor on its own line: the first says enough.
        detail = next((line.strip() for line in str(exc).splitlines()[1:2]), str(exc))
        detail = textwrap.shorten(detail, 240)
        raise DataError(
            f"{model_dir / MODEL_JSON}: cannot build the network it describes from {path.name} "
            f"({detail}); {FIX}"
        ) from None
    return model.eval(), meta
