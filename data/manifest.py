"""The raw-data manifest: objects' sha256 and size, class counts; written last, as commit marker."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from data.raw import RawDataset
from pipelines.errors import IntegrityError

if TYPE_CHECKING:
    from pipelines.storage import ObjectStore

MANIFEST = "manifest.json"
FORMAT = "mlops.raw-manifest/v1"


def content_hash(objects: dict[str, str]) -> str:
    """The identity of a dataset's content: sha256 over its sorted (key, sha256) pairs."""
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()


def problem(manifest: Any) -> str | None:
    """What makes a stored manifest unusable, if anything: it is read for its objects' sha256
    and sizes, its dataset, content hash and counts (a key renamed in it was a KeyError and a
    traceback in verify-data and feature-engineering)."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    for field, kind in (("dataset", str), ("content_sha256", str), ("objects", dict)):
        if not isinstance(manifest.get(field), kind):
            return f"no {field} ({kind.__name__})"
    for key, obj in manifest["objects"].items():
        if not isinstance(obj, dict) or not isinstance(obj.get("sha256"), str):
            return f"object {key!r} has no sha256"
    return None


def read_checked(
    store: ObjectStore, bucket: str, key: str, problem: Callable[[Any], str | None]
) -> tuple[dict[str, Any] | None, str | None]:
    """A stored JSON document (None: there is none), and what damages it, if anything: not
    JSON, not its recorded sha256, or what `problem` finds in its structure."""
    try:
        doc = store.read_json(bucket, key)
    except IntegrityError as exc:
        return None, str(exc)
    return doc, problem(doc) if doc is not None else None


def read(store: ObjectStore, bucket: str, prefix: str) -> tuple[dict[str, Any] | None, str | None]:
    """The stored manifest under prefix (None: there is none), and what damages it, if any."""
    return read_checked(store, bucket, prefix + MANIFEST, problem)


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
