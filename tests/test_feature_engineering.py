"""feature-engineering on a real S3 server: every format, shards, stats, splits, the skip."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from components.feature_engineering import engineer_features
from components.verify_data import verify_data
from data import cifar10, synthetic
from pipelines.errors import DataError, IntegrityError
from pipelines.storage import ObjectStore


def _load_split(store: ObjectStore, prefix: str, meta: dict, split: str):
    images, labels = [], []
    for shard in meta["shards"][split]:
        payload = store.get_bytes("processed-data", prefix + shard["key"])
        assert hashlib.sha256(payload).hexdigest() == shard["sha256"]
        tensors = load_safetensors(payload)
        assert len(tensors["labels"]) == shard["count"]
        images.append(tensors["images"])
        labels.append(tensors["labels"])
    return np.concatenate(images), np.concatenate(labels)


FORMATS = [
    # (dataset name, source file or folder to generate, expected HWC)
    ("cifar10", cifar10.ARCHIVE, (32, 32, 3)),
    ("mnist", "idx", (28, 28, 1)),
    ("imagefolder", "folder", (32, 32, 3)),
    ("imagefolder", "images.tar.gz", (32, 32, 3)),
    ("imagefolder", "images.zip", (32, 32, 3)),
]


@pytest.mark.parametrize(("name", "target", "shape"), FORMATS)
def test_every_format_end_to_end(make_cfg, store, tmp_path, name, target, shape) -> None:
    source = synthetic.write(name, tmp_path / target, per_class=30)
    cfg = make_cfg(dataset__name=name, dataset__source=str(source), features__shard_size=128)
    data = verify_data(cfg, store)
    assert data.counts == {"train": 300, "test": 60}
    result = engineer_features(cfg, store)
    assert not result.skipped
    prefix = result.processed_uri.removeprefix("s3://processed-data/")
    meta = store.read_json("processed-data", prefix + "metadata.json")
    assert meta["manifest_sha256"] == data.content_sha256
    assert (meta["image"]["height"], meta["image"]["width"], meta["image"]["channels"]) == shape
    assert len(meta["mean"]) == len(meta["std"]) == shape[2]
    assert meta["counts"] == {"train": 270, "val": 30, "test": 60}
    assert len(meta["shards"]["train"]) == 3  # 270 images in shards of 128

    images, labels = _load_split(store, prefix, meta, "train")
    assert images.dtype == np.uint8 and images.shape == (270, *shape)
    assert labels.dtype == np.int64 and set(labels) == set(range(10))
    # The stats are the train split's own, per channel, on a 0-1 scale.
    np.testing.assert_allclose(meta["mean"], (images / 255.0).mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(meta["std"], (images / 255.0).std(axis=(0, 1, 2)), atol=1e-5)
    # Stratified: every class has 3 of its 30 train images in val.
    _, val_labels = _load_split(store, prefix, meta, "val")
    assert np.bincount(val_labels).tolist() == [3] * 10
    assert meta["transform"]["test_source"] == "dataset"


def test_rerun_with_unchanged_inputs_is_skipped(make_cfg, store) -> None:
    cfg = make_cfg(dataset__name="synthetic")
    verify_data(cfg, store)
    first = engineer_features(cfg, store)
    again = engineer_features(cfg, store)
    assert (first.skipped, again.skipped) == (False, True)
    assert again.processed_uri == first.processed_uri and again.counts == first.counts
    # A different split config is a different hash, so it is computed, not skipped.
    other = engineer_features(make_cfg(dataset__name="synthetic", dataset__seed=1), store)
    assert not other.skipped and other.feature_hash != first.feature_hash


def test_missing_or_replaced_shard_is_recomputed_not_skipped(make_cfg, store) -> None:
    cfg = make_cfg(dataset__name="synthetic")
    verify_data(cfg, store)
    first = engineer_features(cfg, store)
    prefix = first.processed_uri.removeprefix("s3://processed-data/")
    key = prefix + "train-00000.safetensors"
    good = store.get_bytes("processed-data", key)
    store.remove("processed-data", key)
    assert not engineer_features(cfg, store).skipped
    assert store.get_bytes("processed-data", key) == good
    # Same size, one byte flipped, written by another client (so no sha256 of ours).
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF
    store.client.put_object("processed-data", key, io.BytesIO(bytes(damaged)), len(damaged))
    assert not engineer_features(cfg, store).skipped
    assert store.get_bytes("processed-data", key) == good


def test_a_shard_damaged_under_its_recorded_sha256_is_written_again(
    make_cfg, store, caplog
) -> None:
    """Bit rot, or a copy that kept the metadata: it was reused as unchanged, then refused by
    every training. The reuse check reads the shards through, as verify-data does raw data."""
    from training.data import load_processed

    cfg = make_cfg(dataset__name="synthetic")
    verify_data(cfg, store)
    uri = engineer_features(cfg, store).processed_uri
    prefix = uri.removeprefix("s3://processed-data/")
    key = prefix + "train-00000.safetensors"
    good = store.get_bytes("processed-data", key)
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF
    recorded = store.stat("processed-data", key).sha256
    store.client.put_object(
        "processed-data",
        key,
        io.BytesIO(bytes(damaged)),
        len(damaged),
        metadata={"sha256": recorded},
    )
    assert store.stat("processed-data", key).sha256 == recorded  # complete, by its metadata
    # Damaged after feature-engineering ran: training names the way out.
    with pytest.raises(IntegrityError, match="Run the pipeline again: feature-engineering"):
        load_processed(store, uri)
    assert not engineer_features(cfg, store).skipped
    assert "1 shard(s) of" in caplog.text and "train-00000.safetensors" in caplog.text
    assert store.get_bytes("processed-data", key) == good
    load_processed(store, uri)
    assert engineer_features(cfg, store).skipped  # intact now: reused


def _replace(store, key: str, data: bytes, sha256: str | None) -> None:
    """Put bytes in place of an object, as another client would: with the sha256 given as
    our metadata (bit rot, or a copy that kept it), or none."""
    metadata = {"sha256": sha256} if sha256 else None
    store.client.put_object("processed-data", key, io.BytesIO(data), len(data), metadata=metadata)


@pytest.mark.parametrize(
    "damage",
    ["digit flipped", "not JSON", "shards removed", "mean of another length"],
)
def test_damaged_metadata_is_written_again_and_refused_by_training(
    make_cfg, store, caplog, damage: str
) -> None:
    """metadata.json was read as found: a digit flipped in the mean (same size, its recorded
    sha256 kept) trained a model that normalised wrongly, and damage that broke its structure
    was a traceback in every step after it."""
    from training.data import load_processed

    cfg = make_cfg(dataset__name="synthetic")
    verify_data(cfg, store)
    uri = engineer_features(cfg, store).processed_uri
    key = uri.removeprefix("s3://processed-data/") + "metadata.json"
    good = store.get_bytes("processed-data", key)
    meta = json.loads(good)
    recorded = store.stat("processed-data", key).sha256
    if damage == "digit flipped":
        text = good.decode()
        digit = text.index(json.dumps(meta["mean"][0])) + 3  # in the first channel's mean
        flipped = "1" if text[digit] != "1" else "2"
        _replace(store, key, (text[:digit] + flipped + text[digit + 1 :]).encode(), recorded)
    elif damage == "not JSON":
        _replace(store, key, b"X" + good[1:], recorded)
    else:  # valid JSON under a sha256 of its own, as a hand edit through another client
        if damage == "shards removed":
            del meta["shards"]
        else:
            meta["mean"] = meta["mean"][:1] + meta["mean"]
        _replace(store, key, json.dumps(meta).encode(), None)
    with pytest.raises(
        DataError, match=r"metadata.json is damaged .*run feature-engineering again"
    ):
        load_processed(store, uri)
    assert not engineer_features(cfg, store).skipped
    assert "metadata.json is damaged" in caplog.text
    assert json.loads(store.get_bytes("processed-data", key))["mean"] == json.loads(good)["mean"]
    assert engineer_features(cfg, store).skipped  # intact now: reused


def test_test_split_is_carved_when_the_source_has_none(make_cfg, store, tmp_path: Path) -> None:
    raw = synthetic.generate(per_class=50)
    del raw.splits["test"]
    from data import imagefolder

    folder = imagefolder.write(raw, tmp_path / "classes")
    for split_dir in [folder / "train"]:  # no split folders: <class>/* directly
        for cls in split_dir.iterdir():
            cls.rename(folder / cls.name)
        split_dir.rmdir()
    cfg = make_cfg(dataset__name="imagefolder", dataset__source=str(folder))
    assert verify_data(cfg, store).counts == {"train": 500}
    result = engineer_features(cfg, store)
    # 10% test and 10% val, both of the whole source.
    assert result.counts == {"train": 400, "val": 50, "test": 50}


def test_without_verified_data_it_says_to_run_verify_first(make_cfg, store) -> None:
    store.ensure_buckets()
    with pytest.raises(DataError, match="run verify-data first"):
        engineer_features(make_cfg(dataset__name="synthetic"), store)


def test_a_channel_that_never_varies_is_centred_not_divided_by_zero(
    make_cfg, store, tmp_path: Path
) -> None:
    """Images whose green and blue are one value throughout: their std is 0, which a model's
    normalisation divided by (and the server's loader refuses). They are centred only."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(20):
            pixels = np.zeros((8, 8, 3), np.uint8)
            pixels[..., 0] = rng.integers(0, 256, (8, 8))
            pixels[..., 2] = 7
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    cfg = make_cfg(dataset__name="imagefolder", dataset__source=str(tmp_path / "imgs"))
    verify_data(cfg, store)
    prefix = engineer_features(cfg, store).processed_uri.removeprefix("s3://processed-data/")
    meta = store.read_json("processed-data", prefix + "metadata.json")
    images, _ = _load_split(store, prefix, meta, "train")
    assert meta["std"][1:] == [1.0, 1.0] and meta["mean"][1:] == [0.0, round(7 / 255, 6)]
    np.testing.assert_allclose(meta["std"][0], (images[..., 0] / 255.0).std(), atol=1e-5)


def test_a_file_named_like_a_download_in_progress_is_data_like_any_other(
    make_cfg, store, tmp_path: Path
) -> None:
    """x.png.part beside x.png: the store's download of x.png wrote through x.png.part,
    which the parallel download of the real x.png.part replaced or removed."""
    source = synthetic.write("imagefolder", tmp_path / "folder", per_class=10)
    for png in list(source.rglob("*.png")):
        (png.parent / f"{png.name}.part").write_bytes(png.read_bytes())
    cfg = make_cfg(dataset__name="imagefolder", dataset__source=str(source))
    verify_data(cfg, store)
    result = engineer_features(cfg, store)
    assert result.counts == {"train": 90, "val": 10, "test": 20}


@pytest.mark.parametrize(
    ("per_class", "fractions", "message"),
    [
        (5, (0.49, 0.49), "the split leaves 2 class\\(es\\) no training image \\(a, b\\)"),
        (1, (0.1, 0.1), "the split leaves val empty"),
    ],
)
def test_a_split_that_leaves_a_class_or_a_split_empty_is_refused(
    make_cfg, store, tmp_path: Path, per_class: int, fractions: tuple, message: str
) -> None:
    """Before, train came out empty with NaN statistics (exit 0), or val empty, which failed
    training later with a hint about its ranks."""
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    val, test = fractions
    cfg = make_cfg(
        dataset__name="imagefolder",
        dataset__source=str(tmp_path / "imgs"),
        dataset__val_fraction=val,
        dataset__test_fraction=test,
    )
    verify_data(cfg, store)
    with pytest.raises(DataError, match=message):
        engineer_features(cfg, store)
