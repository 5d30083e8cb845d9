"""Step feature-engineering: decode, split, compute stats, and write safetensors shards."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from data import manifest as mf
from data import processed
from data.raw import RawDataset, Split
from data.sources import READERS, check_expected
from pipelines.cli import step_main
from pipelines.config import PipelineConfig
from pipelines.console import parallel_map
from pipelines.errors import DataError
from pipelines.storage import ObjectStore, s3_uri

log = logging.getLogger("mlops.features")

STD_FLOOR = 1 / 255  # one pixel level: a channel of a smaller std is treated as flat


@dataclass
class FeaturesResult:
    dataset: str
    processed_uri: str
    feature_hash: str
    skipped: bool
    counts: dict[str, int]
    mean: list[float]
    std: list[float]


def stratified_holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices, holding out `fraction` of every class (at least one if it can)."""
    held = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        held.append(idx[:n])
    held_idx = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_idx), held_idx


def split_dataset(
    raw: RawDataset, val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, Split], str]:
    """train/val/test; test is the dataset's own when it has one, else carved out of train."""
    rng = np.random.default_rng(seed)
    train = raw.splits["train"]
    pick = lambda s, i: Split(s.images[i], s.labels[i])  # noqa: E731
    if "test" in raw.splits:
        test, test_source = raw.splits["test"], "dataset"
    else:
        keep, held = stratified_holdout(train.labels, test_fraction, rng)
        train, test, test_source = pick(train, keep), pick(train, held), "carved"
        # Both fractions are of the source's train split: 0.1 + 0.1 of 50,000 is 5,000 each.
        val_fraction = val_fraction / (1 - test_fraction)
    keep, held = stratified_holdout(train.labels, val_fraction, rng)
    splits = {"train": pick(train, keep), "val": pick(train, held), "test": test}
    check_splits(splits, raw.classes)
    return splits, test_source


def check_splits(splits: dict[str, Split], classes: list[str]) -> None:
    """Every class trains, and val and test hold something: an empty train split gave NaN
    statistics, and an empty val split failed training with a hint about its ranks."""
    counts = np.bincount(splits["train"].labels, minlength=len(classes))
    if not counts.all():
        empty = [classes[c] for c in np.flatnonzero(counts == 0)]
        raise DataError(
            f"the split leaves {len(empty)} class(es) no training image ({', '.join(empty[:5])}): "
            "lower dataset.val_fraction and dataset.test_fraction, or add images"
        )
    for name in ("val", "test"):
        if not len(splits[name]):
            raise DataError(
                f"the split leaves {name} empty: a class gives one only when it has two images "
                "or more; add images"
            )


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels scaled to [0, 1], accumulated in float64 by chunks."""
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        squares += np.square(block).sum(axis=(0, 1, 2))
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    # A channel that hardly varies in train (one colour throughout, say) carries no signal:
    # dividing by its std, zero or near it, would blow up whatever it holds at test time, and
    # a zero std is no valid model. Such a channel is centred, not scaled.
    flat = std < STD_FLOOR
    if flat.any():
        log.warning(
            "channel(s) %s hardly vary in train: centred, not scaled", np.flatnonzero(flat).tolist()
        )
    std = np.where(flat, 1.0, std)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def feature_hash(manifest: dict[str, Any], transform: dict[str, Any]) -> str:
    doc = {
        "format": processed.FORMAT,
        "manifest": manifest["content_sha256"],
        "transform": transform,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _complete(store: ObjectStore, bucket: str, prefix: str, meta: dict[str, Any]) -> bool:
    shards = [s for split in meta["shards"].values() for s in split]
    infos = parallel_map(lambda s: store.stat(bucket, prefix + s["key"]), shards, "checking shards")
    # The sha256 is the one put_bytes stored with the shard, read without a download: an object
    # replaced since (same size or not) is written again, not found corrupt by every reader.
    if not all(
        i is not None and i.size == s["size"] and i.sha256 == s["sha256"]
        for i, s in zip(infos, shards, strict=True)
    ):
        return False
    # Then read through, as verify-data reads the raw objects: bit rot, or a copy that kept the
    # metadata, passes the check above, and every training refused the reused shard.
    damaged = sorted(store.failures(bucket, prefix, {s["key"]: s["sha256"] for s in shards}))
    if damaged:
        log.warning(
            "%d shard(s) of %s do not match their sha256 (%s): writing the features again",
            len(damaged),
            s3_uri(bucket, prefix),
            ", ".join(damaged[:3]),
        )
    return not damaged


def _result(key: str, uri: str, fhash: str, skipped: bool, meta: dict[str, Any]) -> FeaturesResult:
    return FeaturesResult(key, uri, fhash, skipped, meta["counts"], meta["mean"], meta["std"])


def engineer_features(cfg: PipelineConfig, store: ObjectStore) -> FeaturesResult:
    """Turn the verified raw dataset into processed shards plus metadata.json (written last)."""
    ds, buckets = cfg.dataset, cfg.storage.buckets
    manifest, damage = mf.read(store, buckets.raw, f"{ds.key}/")
    if damage:
        raise DataError(
            f"{s3_uri(buckets.raw, ds.key + '/' + mf.MANIFEST)} is damaged ({damage}): run "
            "verify-data with --data pointing at the original source to write it again"
        )
    if manifest is None:
        raise DataError(
            f"{s3_uri(buckets.raw, ds.key + '/')} has no manifest: run verify-data first"
        )
    transform = {
        "val_fraction": ds.val_fraction,
        "test_fraction": ds.test_fraction,
        "seed": ds.seed,
        "image_size": ds.image_size,
        "shard_size": cfg.features.shard_size,
        # Image files are turned upright by their EXIF orientation since this key was added:
        # features decoded before then are not reused.
        "exif_upright": True,
        "std_floor": STD_FLOOR,  # likewise: features of a flat channel had a zero std
    }
    fhash = feature_hash(manifest, transform)
    prefix = f"{ds.key}/{fhash}/"
    uri = s3_uri(buckets.processed, prefix)
    meta, damage = processed.read(store, buckets.processed, prefix)
    if damage:
        log.warning(
            "%s%s is damaged (%s): writing the features again", uri, processed.METADATA, damage
        )
    elif meta is not None and _complete(store, buckets.processed, prefix, meta):
        log.info("inputs unchanged: %s is already processed, skipping", uri)
        return _result(ds.key, uri, fhash, True, meta)

    (cfg.state_dir / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.state_dir / "tmp") as tmp:
        objects = manifest["objects"]
        files = {k: Path(tmp) / k for k in objects}
        parallel_map(
            lambda k: store.get_file(buckets.raw, f"{ds.key}/{k}", files[k], objects[k]["sha256"]),
            objects,
            "downloading raw data",
        )
        raw = READERS[manifest["dataset"]](files, ds.image_size)
    check_expected(manifest["dataset"], raw)
    splits, test_source = split_dataset(raw, ds.val_fraction, ds.test_fraction, ds.seed)
    mean, std = channel_stats(splits["train"].images)

    shards: dict[str, list[dict[str, Any]]] = {}
    jobs = []
    for name, split in splits.items():
        shards[name] = []
        for i, start in enumerate(range(0, max(len(split), 1), cfg.features.shard_size)):
            stop = min(start + cfg.features.shard_size, len(split))
            shards[name].append({"key": f"{name}-{i:05d}.safetensors", "count": stop - start})
            jobs.append((shards[name][-1], split, start, stop))

    def write(job: tuple[dict[str, Any], Split, int, int]) -> None:
        entry, split, start, stop = job
        payload = save_safetensors(
            {
                "images": np.ascontiguousarray(split.images[start:stop]),
                "labels": np.ascontiguousarray(split.labels[start:stop]),
            }
        )
        entry["sha256"] = store.put_bytes(buckets.processed, prefix + entry["key"], payload)
        entry["size"] = len(payload)

    parallel_map(write, jobs, "writing shards", unit="shard", workers=4)
    height, width, channels = raw.shape
    meta = {
        "format": processed.FORMAT,
        "dataset": ds.key,
        "name": manifest["dataset"],
        "feature_hash": fhash,
        "manifest_uri": s3_uri(buckets.raw, f"{ds.key}/{mf.MANIFEST}"),
        "manifest_sha256": manifest["content_sha256"],
        "classes": raw.classes,
        "image": {"height": height, "width": width, "channels": channels},
        "mean": mean,
        "std": std,
        "counts": {name: len(s) for name, s in splits.items()},
        "class_counts": RawDataset(raw.classes, splits).class_counts(),
        "shards": shards,
        "transform": {**transform, "test_source": test_source},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store.write_json(buckets.processed, prefix + processed.METADATA, meta)  # last: commit marker
    log.info("wrote %s: %s", uri, ", ".join(f"{k} {v}" for k, v in meta["counts"].items()))
    return _result(ds.key, uri, fhash, False, meta)


def main(argv: list[str] | None = None) -> int:
    return step_main(
        lambda cfg, store, _: engineer_features(cfg, store),
        "components.feature_engineering",
        __doc__,
        ["--dataset", "--state-dir"],
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
