"""The processed features' metadata.json: its name, its format, and reading it back checked."""

from __future__ import annotations

from typing import Any

from data.manifest import read_checked
from pipelines.errors import DataError
from pipelines.storage import ObjectStore, s3_uri

FORMAT = "mlops.processed/v1"
METADATA = "metadata.json"  # written last: the features' commit marker


def _numbers(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int | float) for v in value)
    )


def problem(meta: Any) -> str | None:
    """What makes stored metadata unusable, if anything. It carries the shards' sha256 and the
    normalisation the model is built with: a field edited away was a traceback in every step
    that read it, and values of the wrong length a model that normalised wrongly."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for field, kind in (("shards", dict), ("counts", dict), ("classes", list), ("image", dict)):
        if not isinstance(meta.get(field), kind):
            return f"no {field} ({kind.__name__})"
    channels = meta["image"].get("channels")
    if not isinstance(channels, int) or not all(
        _numbers(meta.get(k), channels) for k in ("mean", "std")
    ):
        return "mean and std do not give one number per channel"
    for split, shards in meta["shards"].items():
        if not isinstance(shards, list) or not all(
            isinstance(s, dict)
            and isinstance(s.get("key"), str)
            and isinstance(s.get("sha256"), str)
            and isinstance(s.get("size"), int)
            and isinstance(s.get("count"), int)
            for s in shards
        ):
            return f"the {split} shards are not listed with key, sha256, size and count"
    return None


def read(store: ObjectStore, bucket: str, prefix: str) -> tuple[dict[str, Any] | None, str | None]:
    """The metadata under prefix (None: there is none), and what damages it, if anything."""
    return read_checked(store, bucket, prefix + METADATA, problem)


def load(store: ObjectStore, bucket: str, prefix: str) -> dict[str, Any]:
    """The metadata a trainer reads, or a DataError that says how to get it."""
    uri = s3_uri(bucket, prefix)
    meta, damage = read(store, bucket, prefix)
    if damage:
        raise DataError(
            f"{uri}{METADATA} is damaged ({damage}): run feature-engineering again, which "
            "writes the features anew"
        )
    if meta is None:
        raise DataError(f"{uri} has no {METADATA}: run feature-engineering first")
    return meta
