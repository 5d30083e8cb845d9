"""Training building blocks: rank batches, augmentation, schedule, stems, checkpoints, cores."""

from __future__ import annotations

import gc
import hashlib
import time
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from pipelines.config import TrainConfig
from pipelines.errors import ConfigError
from pipelines.storage import ObjectStore
from training import checkpoint
from training.checkpoint import flatten_optimizer, unflatten_optimizer
from training.data import Tensors, augment, epoch_flips, rank_batches, resolve_hflip
from training.dist import usable_cores
from training.loop import epoch_generator, lr_at, param_groups, run_epoch
from training.model import STEMS, build_classifier, build_model


def test_ranks_split_each_epoch_disjointly_and_reshuffle() -> None:
    parts = [
        torch.cat(list(rank_batches(100, 16, epoch=0, seed=3, rank=r, world=2))) for r in (0, 1)
    ]
    assert len(parts[0]) == len(parts[1]) == 48  # 6 full global batches of 16, 8 per rank
    assert not set(parts[0].tolist()) & set(parts[1].tolist())
    again = torch.cat(list(rank_batches(100, 16, epoch=0, seed=3, rank=0, world=2)))
    later = torch.cat(list(rank_batches(100, 16, epoch=1, seed=3, rank=0, world=2)))
    assert torch.equal(parts[0], again) and not torch.equal(parts[0], later)


def test_batches_the_data_cannot_fill_are_refused() -> None:
    with pytest.raises(ConfigError, match="exceeds the 10 training images"):
        list(rank_batches(10, 16, epoch=0, seed=0, rank=0, world=1))
    with pytest.raises(ConfigError, match="multiple of the 3 ranks"):
        list(rank_batches(100, 16, epoch=0, seed=0, rank=0, world=3))


def test_augment_crops_and_flips_whole_batches() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    out = augment(images, torch.Generator().manual_seed(0), 2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    shifted = [augment(images, torch.Generator().manual_seed(s), 2) for s in range(20)]
    assert any(not torch.equal(o, images) for o in shifted)
    # Every output pixel is an input pixel or padding zero.
    assert set(out.unique().tolist()) <= set(images.unique().tolist()) | {0}
    # No padding, no crop: only the flagged image is mirrored.
    out = augment(images, torch.Generator().manual_seed(0), 0, torch.tensor([True, False]))
    assert torch.equal(out[0], images[0].flip(2)) and torch.equal(out[1], images[1])


def test_cutout_zeroes_one_square_per_image_and_draws_nothing_when_off() -> None:
    images = torch.full((256, 3, 16, 16), 200, dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0), 0, None, cutout=6)
    holes = out[:, 0] == 0
    assert torch.equal(holes, (out == 0).all(1))  # every channel of a pixel alike
    counts = holes.sum((1, 2))
    # A square: at most 6x6, whole where its centre lies far enough in, clipped at the edges.
    assert counts.max() == 36 and counts.min() >= 9 and (counts < 36).any()
    rows, cols = holes.any(2), holes.any(1)
    assert torch.equal(counts, rows.sum(1) * cols.sum(1))
    # Off: the output and the random stream after it as 4932336 gave them, before the setting
    # (a resumed run draws the same crops and flips).
    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.uint8).view(4, 3, 8, 8)
    gen = torch.Generator().manual_seed(1)
    out = augment(images, gen, 2, torch.tensor([True, False, True, False]), cutout=0)
    assert hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16] == "b6e85c682e13e80e"
    assert torch.randint(0, 1000, (3,), generator=gen).tolist() == [759, 432, 248]


def test_hflip_off_never_mirrors_and_is_the_default_for_digits() -> None:
    # Each row rises left to right; a crop only shifts it (zeros come in at the sides), so
    # a row whose middle four pixels fall is a mirrored one.
    images = (torch.arange(8, dtype=torch.uint8) + 1).expand(64, 1, 8, 8).contiguous()

    def mirrored(out: torch.Tensor) -> torch.Tensor:
        middle = out[:, 0, 4, 2:-2].float()
        return (middle[:, 1:] < middle[:, :-1]).all(1)

    gen = torch.Generator().manual_seed(0)
    assert not mirrored(augment(images, gen, 2, None)).any()
    flips = epoch_flips(64, 0, 0, False, gen)
    assert torch.equal(mirrored(augment(images, gen, 2, flips)), flips) and flips.any()
    assert resolve_hflip(None, "mnist") is False and resolve_hflip(None, "cifar10") is True
    assert resolve_hflip(True, "mnist") is True and resolve_hflip(False, "imagefolder") is False


def test_alternating_flips_show_every_image_both_ways_in_two_epochs() -> None:
    gen = lambda epoch: epoch_generator(torch.device("cpu"), 0, epoch, 0)  # noqa: E731
    first = epoch_flips(1000, 0, 7, True, gen(0))
    assert 400 < first.sum() < 600  # a random half
    assert torch.equal(epoch_flips(1000, 1, 7, True, gen(1)), ~first)
    assert torch.equal(epoch_flips(1000, 2, 7, True, gen(2)), first)
    # The same bits on every rank (another generator) and after a resume; another seed differs.
    assert torch.equal(epoch_flips(1000, 2, 7, True, torch.Generator().manual_seed(5)), first)
    assert not torch.equal(epoch_flips(1000, 0, 8, True, gen(0)), first)
    # Random flips: a fresh half each epoch, not the complement of the last.
    again = epoch_flips(1000, 1, 7, False, gen(1))
    assert not torch.equal(again, ~epoch_flips(1000, 0, 7, False, gen(0)))


def test_schedule_warms_up_then_anneals_to_zero() -> None:
    lrs = [lr_at(s, 100, 0.4) for s in range(100)]
    assert lrs[0] < lrs[19] == pytest.approx(0.4) and lrs[-1] < 0.01
    assert max(lrs) == pytest.approx(0.4)


def test_an_epoch_counts_its_images_and_follows_the_schedule() -> None:
    torch.manual_seed(0)
    model = build_classifier(3, 3, "s2", [0.5] * 3, [0.25] * 3)
    data = Tensors(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 3)
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    batches = list(rank_batches(40, 16, epoch=0, seed=0, rank=0, world=1))
    sums, step, lr = run_epoch(
        model,
        optimizer,
        torch.amp.GradScaler(enabled=False),
        torch.nn.CrossEntropyLoss(),
        data,
        batches,
        epoch_generator(torch.device("cpu"), 0, 0, 0),
        lambda: torch.autocast("cpu", enabled=False),
        (5, 10, 0.4),
        2,
        torch.arange(40) % 2 == 0,
    )
    assert step == 7 and sums[2].item() == 32  # 2 full batches of 16, from step 5 of 10
    assert lr == lr_at(6, 10, 0.4) == optimizer.param_groups[0]["lr"]
    assert 0 <= sums[1].item() <= 32 and sums[0].item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("stem", "channels"), [("cifar", 3), ("imagenet", 1), ("s2", 3), ("s1pool", 1)]
)
def test_stems_give_logits_for_every_class(stem: str, channels: int) -> None:
    model = build_model(7, channels, stem).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, 32, 32)).shape == (2, 7)


def test_the_config_offers_every_stem_the_model_builds() -> None:
    assert get_args(TrainConfig.model_fields["stem"].annotation) == STEMS


def test_s1pool_max_pools_a_full_resolution_stem_to_s2s_map_size() -> None:
    """The stem convolves every position at 32x32; layer1 sees the 2x2 maxima at 16x16."""
    torch.manual_seed(0)
    model = build_model(10, 3, "s1pool").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.relu(model.bn1(model.conv1(x)))
        pooled = model.maxpool(full)
        s2 = build_model(10, 3, "s2").eval()
        assert full.shape == (2, 64, 32, 32)
        assert pooled.shape == s2.relu(s2.bn1(s2.conv1(x))).shape == (2, 64, 16, 16)
        assert torch.equal(pooled, full.unflatten(3, (16, 2)).unflatten(2, (16, 2)).amax((3, 5)))


def test_optimizer_state_round_trips_without_pickle() -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    tensors, state = flatten_optimizer(opt)
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    fresh.load_state_dict(unflatten_optimizer(tensors, state))
    for a, b in zip(opt.state.values(), fresh.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_usable_cores_is_positive_and_bounded() -> None:
    import os

    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_flip_tta_averages_the_two_views_in_eval_only() -> None:
    torch.manual_seed(0)
    plain = build_classifier(10, 3, "s2", [0.5] * 3, [0.25] * 3).eval()
    tta = build_classifier(10, 3, "s2", [0.5] * 3, [0.25] * 3, flip_tta=True).eval()
    tta.load_state_dict(plain.state_dict())  # the same weights under the same names
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = (plain(x) + plain(x.flip(3))) / 2
        assert torch.allclose(tta(x), expected, atol=1e-5)
        assert not torch.allclose(tta(x), plain(x), atol=1e-3)
        # Mirror-invariant by construction: the image and its mirror get the same logits.
        assert torch.allclose(tta(x), tta(x.flip(3)), atol=1e-5)
    tta.train(), plain.train()
    with torch.no_grad():  # training sees one view (augmentation flips already)
        assert torch.allclose(tta(x), plain(x), atol=1e-5)


def _torchvision_model(num_classes: int, in_channels: int, stem: str) -> torch.nn.Module:
    """What build_model built from torchvision's resnet18 before it was written out."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if stem == "imagenet":
        if in_channels != 3:
            model.conv1 = torch.nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return model
    stride = 2 if stem == "s2" else 1
    model.conv1 = torch.nn.Conv2d(in_channels, 64, 3, stride=stride, padding=1, bias=False)
    model.maxpool = torch.nn.MaxPool2d(2) if stem == "s1pool" else torch.nn.Identity()
    return model


@pytest.mark.parametrize(
    ("stem", "channels"), [("s2", 3), ("cifar", 1), ("imagenet", 3), ("s1pool", 3)]
)
def test_resnet18_is_torchvisions_weight_for_weight(stem: str, channels: int) -> None:
    """Same seed, same weights under the same names; same logits: models trained before the
    network was written out load and answer as they did."""
    torch.manual_seed(3)
    ours = build_model(7, channels, stem).eval()
    torch.manual_seed(3)
    theirs = _torchvision_model(7, channels, stem).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_checkpoints_upload_in_order_as_they_were_when_saved(store: ObjectStore) -> None:
    """The saver encodes before it returns: training changes the tensors in place while the
    upload runs, and the checkpoint must hold them as they were. The latest one wins."""

    store.ensure_buckets()
    bucket = store.buckets.models
    weights = torch.arange(6, dtype=torch.float32)
    saver = checkpoint.Saver(store, bucket, "m/run/checkpoints/")
    for epoch in (1, 2):
        saver.save(checkpoint.Checkpoint(epoch, {"model.w": weights}, {"history": [epoch]}))
        weights.add_(100)  # the next epoch's update, at once
    saver.wait()
    latest = checkpoint.load_latest(store, bucket, "m/run/checkpoints/")
    assert latest is not None and latest.epoch == 2
    assert latest.state["history"] == [2]
    assert torch.equal(latest.tensors["model.w"], torch.arange(6, dtype=torch.float32) + 100)
    # The current checkpoint and the one before stay (a reader may hold the previous
    # pointer); each older one took the model's size again, for good. A later epoch, of an
    # attempt of the same run still writing, is not this upload's to remove.
    for epoch in (3, 9, 4):
        checkpoint.upload(
            store,
            bucket,
            "m/run/checkpoints/",
            checkpoint.encode(checkpoint.Checkpoint(epoch, {"model.w": weights}, {})),
        )
    kept = sorted(o.key.removeprefix("m/run/checkpoints/") for o in store.list(bucket, "m/run/"))
    assert kept == [f"epoch-000{n}.{ext}" for n in (3, 4, 9) for ext in ("json", "safetensors")] + [
        "latest.json"
    ]


def test_a_trainers_end_lets_the_checkpoint_on_its_way_finish(store: ObjectStore) -> None:
    """A stop just after an epoch ended the process while that epoch's checkpoint uploaded:
    the resume trained the epoch again. The store here is slow as a remote one can be."""
    store.ensure_buckets()
    bucket, prefix = store.buckets.models, "m/run/checkpoints/"
    put = store.put_bytes

    def slow_put(*args: Any, **kwargs: Any) -> str:
        time.sleep(0.3)
        return put(*args, **kwargs)

    store.put_bytes = slow_put  # type: ignore[method-assign]

    def train() -> None:  # as the trainer's loop: its Saver is a local, unwound by the stop
        saver = checkpoint.Saver(store, bucket, prefix)
        saver.save(checkpoint.Checkpoint(1, {"model.w": torch.zeros(3)}, {"history": [1]}))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train()
    gc.collect()  # the Saver is gone, as it was when the trainer's end waited for it
    checkpoint.settle_uploads()  # the upload takes 0.9 s at least: three objects
    latest = checkpoint.load_latest(store, bucket, prefix)
    assert latest is not None and latest.epoch == 1


def test_a_resumed_run_finds_the_version_it_registered_before_it_was_stopped(
    tmp_path: Path,
) -> None:
    """A stop between the registration and model.json: the resume registered the same run's
    weights a second time. MLflow's own sqlite store."""
    import mlflow

    from pipelines.mlflow_server import create_database
    from training.tracking import registered_version

    create_database(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    client.create_registered_model("pets")
    assert registered_version(client, "pets", runs[0]) is None
    for run in (runs[1], runs[0], runs[0]):
        client.create_model_version("pets", f"runs:/{run}/model", run_id=run)
    assert registered_version(client, "pets", runs[0]) == "3"
    assert registered_version(client, "pets", runs[1]) == "1"


PINNED = """
import os, threading, time
from training.dist import Dist, pin_rank
cores = sorted(os.sched_getaffinity(0))
early = threading.Thread(target=time.sleep, args=(2,))  # a thread started before
early.start()
pin_rank(Dist(rank=1, world=2, local_rank=LOCAL, local_world=WORLD))
print(sorted(os.sched_getaffinity(0)) == cores, sorted(os.sched_getaffinity(early.native_id)))
"""


def test_ranks_take_a_core_each_only_where_the_cores_are_theirs() -> None:
    import os
    import subprocess
    import sys

    cores = sorted(os.sched_getaffinity(0))
    root = Path(__file__).resolve().parent.parent
    pinned = f"False [{cores[-1]}]" if len(cores) > 1 else f"True {cores}"  # one rank: never
    for local, world, expected in [
        (len(cores) - 1, len(cores), pinned),  # one core a rank: that core
        (0, len(cores) + 1, f"True {cores}"),  # more ranks than cores: left to the scheduler
    ]:
        code = PINNED.replace("LOCAL", str(local)).replace("WORLD", str(world))
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected, (local, world, out.stdout)


def test_momentum_zero_is_plain_sgd_not_a_crash() -> None:
    from pipelines.config import load_config
    from training.loop import optimisation

    tc = load_config("smoke", overrides={"train.momentum": 0}).train
    optimizer, _, _ = optimisation(torch.nn.Linear(2, 2), tc, "fp32")
    assert optimizer.param_groups[0]["nesterov"] is False


def test_resume_ignores_settings_that_change_no_training_state() -> None:
    from pipelines.config import load_config
    from training.resume import config_hash

    cfg = load_config("smoke")
    base = config_hash(cfg, "s3://processed-data/x/abc/")
    same = load_config(
        "smoke",
        overrides={"train.max_restarts": 5, "train.flip_tta": False, "train.eval_every": 3},
    )
    assert config_hash(same, "s3://processed-data/x/abc") == base
    other = load_config("smoke", overrides={"train.lr": 0.123})
    assert config_hash(other, "s3://processed-data/x/abc/") != base
    cut = load_config("smoke", overrides={"train.cutout": 8})
    assert config_hash(cut, "s3://processed-data/x/abc/") != base


def test_a_run_id_that_names_no_folder_is_refused_where_it_becomes_a_key() -> None:
    """KFP's run id is a pipeline parameter: no command line checks it on its way to the
    train step, where '../x' was the S3 client's ValueError and 'a/b' nested the folder."""
    from pipelines.config import load_config
    from training.resume import location

    cfg = load_config("smoke", environ={})
    assert location(cfg, "image-classifier-x7k2p")[1] == f"{cfg.model_name}/image-classifier-x7k2p/"
    for bad in ("../x", "a/b", ".", ""):
        with pytest.raises(ConfigError, match="is not a run id"):
            location(cfg, bad)


def test_a_checkpoint_of_an_earlier_version_still_resumes() -> None:
    """The profiles' hashes as 4932336 computed them, before train.cutout: a setting added at
    the value that trains as before must not refuse a run stopped under the earlier version.
    (A new setting that changes the hash at its default fails here: add it to ADDED_SINCE.)"""
    from pipelines.config import load_config
    from training.resume import config_hash

    before = {"smoke": "897f3fe06c1ea018", "quick": "d7d4babb859bca81", "full": "a03f0f8ca821f128"}
    for profile, digest in before.items():
        cfg = load_config(profile, environ={})
        assert config_hash(cfg, "s3://processed-data/cifar10/abc/") == digest, profile


def test_the_fp16_loss_scale_travels_in_a_checkpoint() -> None:
    import json

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    ckpt = checkpoint.Checkpoint(1, {"rng.torch": torch.zeros(1)}, {"scaler": scaler.state_dict()})
    _, _, state = checkpoint.encode(ckpt)  # the state travels as JSON
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(json.loads(state)["scaler"])
    assert fresh.get_scale() == 1024.0 and fresh.get_growth_interval() == 7


def test_the_curves_say_which_loss_is_label_smoothed() -> None:
    """The train loss is smoothed and val's is not: side by side on one chart, unlabelled, the
    train curve read as underfitting (1.30 against 0.59 at 0.88 and 0.98 accuracy)."""
    from training.tracking import _curves

    row = {"train_loss": 1.3, "train_accuracy": 0.88, "val_loss": 0.59, "val_accuracy": 0.98}
    loss, accuracy = _curves([{"epoch": 1, **row}], 0.1).axes[:2]
    legend = [t.get_text() for t in loss.get_legend().get_texts()]
    assert legend == ["train (label smoothing 0.1)", "val"]
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["train", "val"]
    unsmoothed = _curves([{"epoch": 1, **row}], 0.0).axes[0]
    assert [t.get_text() for t in unsmoothed.get_legend().get_texts()] == ["train", "val"]


def test_a_resumes_changed_settings_are_the_runs_tags_while_they_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MLflow run's params cannot change, and a resume may change flip TTA: the value each
    attempt ran under is a tag, set back too when a later resume restores the param's."""
    import mlflow

    from pipelines.config import PipelineConfig
    from training import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(tracking, "wait_tracking", lambda *args: None)  # no server: a file
    base = PipelineConfig()
    base = base.model_copy(update={"mlflow": base.mlflow.model_copy(update={"tracking_uri": uri})})
    meta = {"manifest_sha256": "m", "feature_hash": "f"}
    seen, tag = [], "mlops.resumed.train.flip_tta"
    for flip in (True, False, True):  # trained, resumed with it off, resumed with it on
        cfg = base.model_copy(update={"train": base.train.model_copy(update={"flip_tta": flip})})
        run_id = tracking.Tracker.start(cfg, "run-x", 1, meta, "c", "fp32").run_id
        mlflow.end_run()
        run = mlflow.MlflowClient(uri).get_run(run_id)
        seen.append((run.data.params["train.flip_tta"], run.data.tags.get(tag)))
    assert seen == [("True", None), ("True", "False"), ("True", "True")]


def test_a_cluster_trainers_log_and_its_error_are_kept_in_the_store(make_cfg, store) -> None:
    """A failed workflow's exit handler deletes the PyTorchJob, and the trainer's log with its
    pods: the log each rank writes, and the error that ends it, are kept beside the model."""
    import logging

    from pipelines.errors import DataError
    from training.dist import Dist
    from training.runlog import kept_log

    store.ensure_buckets()
    cfg = make_cfg().model_copy(update={"runtime": "kubernetes"})
    with pytest.raises(DataError), kept_log(cfg, "run-x", Dist(rank=1, world=2)):
        logging.getLogger("mlops.train").warning("epoch 1/3 slow")
        raise DataError("shard x is damaged")
    bucket = cfg.storage.buckets.models
    (key,) = [o.key for o in store.list(bucket, f"{cfg.model_name}/run-x/logs/")]
    assert key.endswith("-rank1.log")
    text = store.get_bytes(bucket, key).decode()
    assert "WARNING mlops.train: epoch 1/3 slow" in text
    assert text.endswith("error: shard x is damaged\n")
    # Locally each attempt's log is in the run's folder: nothing more is stored.
    with kept_log(make_cfg(), "run-y", Dist()):
        logging.getLogger("mlops.train").warning("epoch 1/3")
    assert not list(store.list(bucket, f"{cfg.model_name}/run-y/"))
