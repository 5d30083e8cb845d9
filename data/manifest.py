"""The raw-data manifest: objects' sha256 and size, class counts; written last, as commit marker."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from data.raw import RawDataset

MANIFEST = "manifest.json"
FORMAT = "mlops.raw-manifest/v1"


def content_hash(objects: dict[str, str]) -> str:
    """The identity of a dataset's content: sha256 over its sorted (key, sha256) pairs."""
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()


def object_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    return {key: obj["sha256"] for key, obj in manifest["objects"].items()}


def build(
    name: str, key: str, objects: dict[str, tuple[str, int]], raw: RawDataset, source: str
) -> dict[str, Any]:
    height, width, channels = raw.shape
    class_counts = raw.class_counts()
    hashes = {k: sha for k, (sha, _) in objects.items()}
    return {
        "format": FORMAT,
        "dataset": name,
        "id": key,
        "content_sha256": content_hash(hashes),
        "objects": {k: {"sha256": sha, "size": size} for k, (sha, size) in objects.items()},
        "classes": raw.classes,
        "counts": {split: sum(c.values()) for split, c in class_counts.items()},
        "class_counts": class_counts,
        "image": {"height": height, "width": width, "channels": channels},
        "source": source,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
