"""Train ResNet-18 with DDP: the program torchrun runs locally and a PyTorchJob runs in its pods.

    torchrun --nproc_per_node=2 -m training.train --processed s3://processed-data/x/h/ --run-id r1

Distributed settings come from the environment, as torchrun or the Kubeflow Training Operator
set them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and LOCAL_RANK under torchrun, or from the
train step's launcher for one worker); with none set it runs as one process. Only rank 0 logs
to MLflow and writes checkpoints and the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# `python training/train.py` (a container command) puts training/ first on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from safetensors.torch import save as save_safetensors

from pipelines.cli import add_config_args, config_from_args, run_id_arg, run_main, s3_uri_arg
from pipelines.config import PipelineConfig
from pipelines.errors import INTERRUPTED, TERMINATING, ConfigError, raise_on_sigterm
from pipelines.processes import exit_now
from pipelines.storage import ObjectStore, s3_uri
from serving.launch import MODEL_JSON
from training import checkpoint, resume, tracking
from training.data import epoch_flips, load_processed, rank_batches, resolve_hflip
from training.dist import Dist, detect_dist, init_process_group, place_rank, wrap_ddp
from training.evaluate import evaluate, make_autocast
from training.loop import epoch_generator, optimisation, run_epoch
from training.model import build_classifier
from training.precision import Hardware
from training.precision import resolve as resolve_precision
from training.result import RESULT_OBJECT, TrainResult
from training.runlog import kept_log

log = logging.getLogger("mlops.train")
WEIGHTS = "model.safetensors"  # named in model.json, so readers never assume it


# ----------------------------------------------------------------------------------------------
# Distributed environment and threads: training/dist.py; the schedule, the step and the epoch:
# training/loop.py; evaluation: training/evaluate.py


def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]  # baked into the image at build time
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------
# Training


def train(cfg: PipelineConfig, processed: str, run_id: str, d: Dist) -> TrainResult | None:
    """The whole training run; returns the result on rank 0, None elsewhere."""
    t_start = time.monotonic()
    tc = cfg.train
    # -- device, backend, threads
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{d.local_rank}" if cuda else "cpu")
    precision, warning = resolve_precision(tc.precision, Hardware.detect(device))
    if d.main:
        if warning:
            log.warning("%s", warning)
        log.info("precision %s (train.precision=%s)", precision, tc.precision)
    if cuda:
        torch.cuda.set_device(device)
        # Fixed batch shapes: time cuDNN's kernels once and keep the fastest. The choice may
        # differ between runs, so a resumed run is close to, not bitwise, an unbroken one.
        torch.backends.cudnn.benchmark = True
    place_rank(d)
    if d.world > 1:
        init_process_group(d, "nccl" if cuda else "gloo")
    autocast = make_autocast(device, precision)

    # -- data: every shard sha256-checked, held in memory as uint8
    store = ObjectStore(cfg.storage)
    bucket, prefix, ckpt_prefix = resume.location(cfg, run_id)
    chash = resume.config_hash(cfg, processed)
    if (done := resume.completed(store, cfg, run_id)) is not None:
        # A start after the model was written (the step's own restart, torchrun's, a replaced
        # pod): its result as stored, once the settings are checked against the run's.
        if (state := resume.load_state(store, bucket, ckpt_prefix)) is not None:
            resume.check_resumable(state, chash, bucket, ckpt_prefix)
        if d.main:
            log.info("run %s trained its model before this start: its result as stored", run_id)
        return done if d.main else None
    if cfg.runtime == "kubernetes" and d.main:  # a PyTorchJob's Master: its restarts bounded
        resume.count_start(store, cfg, run_id)
    meta, splits = load_processed(store, processed)
    train_set = splits["train"].to(device)
    steps_per_epoch = len(train_set) // tc.batch_size
    total_steps = steps_per_epoch * tc.epochs
    classes, image = meta["classes"], meta["image"]
    hflip = resolve_hflip(tc.hflip, meta["name"])
    flip_tta = tc.flip_tta and hflip  # a model never trained on mirrors is not asked about them
    if d.main and not hflip:
        log.info("no horizontal flips (train.hflip=%s, dataset %s)", tc.hflip, meta["name"])

    # -- model: normalisation inside, so the model takes uint8 images as served
    torch.manual_seed(tc.seed)
    model = build_classifier(len(classes), image["channels"], tc.stem, meta["mean"], meta["std"])
    model.flip_tta = False  # per-epoch validation stays single-view: it is for the curve
    model = model.to(device, memory_format=torch.channels_last)
    optimizer, scaler, criterion = optimisation(model, tc, precision)

    # -- resume: every rank reads the same checkpoint
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt = checkpoint.load_latest(store, bucket, ckpt_prefix)
    if ckpt is not None:
        resume.check_resumable(ckpt.state, chash, bucket, ckpt_prefix)
        model.load_state_dict({k[6:]: v for k, v in ckpt.tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(checkpoint.unflatten_optimizer(ckpt.tensors, ckpt.state["optim"]))
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        if ckpt.state.get("scaler"):  # fp16: the loss scale found so far, not 2**16 again
            scaler.load_state_dict(ckpt.state["scaler"])
        history, start_epoch = ckpt.state["history"], ckpt.epoch
        if d.main:
            log.info("resuming %s from epoch %d of %d", run_id, start_epoch, tc.epochs)
    ddp = wrap_ddp(model, d)

    # -- tracking (rank 0 only): one MLflow run per training, found again on resume
    tracker = None
    if d.main:
        tracker = tracking.Tracker.start(cfg, run_id, d.world, meta, git_commit(), precision)
        tracker.backfill(history)

    # -- the loop
    saver = checkpoint.Saver(store, bucket, ckpt_prefix)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, tc.epochs):
        t_epoch = time.monotonic()
        batches = rank_batches(
            len(train_set),
            tc.batch_size,
            epoch=epoch,
            seed=tc.seed,
            rank=d.rank,
            world=d.world,
            device=device,
        )
        gen = epoch_generator(device, tc.seed, epoch, d.rank)
        flips = (
            epoch_flips(len(train_set), epoch, tc.seed, tc.alternate_flips, gen) if hflip else None
        )
        sums, step, lr = run_epoch(
            ddp,
            optimizer,
            scaler,
            criterion,
            train_set,
            batches,
            gen,
            autocast,
            (step, total_steps, tc.lr),
            tc.crop_pad,
            flips,
            tc.cutout,
        )
        if d.world > 1:
            dist.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()  # waits for the device: the epoch is done
        seconds = time.monotonic() - t_epoch
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / count,
            "train_accuracy": correct / count,
            "lr": lr,
            "images_per_s": count / seconds,
            "epoch_seconds": seconds,
        }
        validated = ""
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
            val_loss, val_acc, _ = evaluate(ddp, splits["val"], d, 512, len(classes), autocast)
            row |= {"val_loss": val_loss, "val_accuracy": val_acc}
            validated = f"  val_loss {val_loss:.3f}  val_acc {val_acc:.3f}"
        history.append(row)
        if d.main:
            log.info(
                "epoch %d/%d  loss %.3f  acc %.3f%s  %.0f img/s  %.1f s",
                epoch + 1,
                tc.epochs,
                row["train_loss"],
                row["train_accuracy"],
                validated,
                row["images_per_s"],
                seconds,
            )
            tensors, optim_state = checkpoint.flatten_optimizer(optimizer)
            tensors |= {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
            tensors["rng.torch"] = torch.get_rng_state()
            state = {
                "config_hash": chash,
                "history": history,
                "optim": optim_state,
                "scaler": scaler.state_dict(),  # {} unless fp16
            }
            saver.save(checkpoint.Checkpoint(epoch + 1, tensors, state))
            assert tracker is not None
            tracker.log_epoch(row)

    # -- final evaluation on val and test as the model will be served; the model and its record
    model.flip_tta = flip_tta
    val_acc = history[-1]["val_accuracy"] if history else 0.0
    if flip_tta and history:
        _, val_acc, _ = evaluate(ddp, splits["val"], d, 512, len(classes), autocast)
    test_loss, test_acc, confusion = evaluate(ddp, splits["test"], d, 512, len(classes), autocast)
    digest = hashlib.sha256(
        b"".join(p.detach().cpu().float().numpy().tobytes() for p in model.parameters())
    ).hexdigest()
    digests = [digest]
    if d.world > 1:
        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, digest)
        digests = gathered
    if not d.main:
        return None
    assert tracker is not None
    metrics = {
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
    }
    weights = save_safetensors(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    )
    sha = store.put_bytes(bucket, prefix + WEIGHTS, weights)
    example = splits["test"].images[:4].cpu()
    # The last checkpoint uploaded during the evaluations above; it is whole in S3 before the
    # model is registered or complete, so a failure from here on resumes without training.
    saver.wait()
    with tracker.calls():
        version = tracker.finish(
            model, example, metrics, history, confusion, classes, sha, s3_uri(bucket, prefix)
        )
    model_json = {
        "format": "mlops.model/v1",
        "name": cfg.model_name,
        "architecture": tc.arch,
        "stem": tc.stem,
        "flip_tta": flip_tta,
        "precision": precision,
        "classes": classes,
        "num_classes": len(classes),
        "input": {
            "shape": [image["channels"], image["height"], image["width"]],
            "dtype": "uint8",
            "layout": "NCHW",
        },
        "normalization": {"mean": meta["mean"], "std": meta["std"], "scale": 255},
        "metrics": metrics,
        "sha256": sha,
        "weights": WEIGHTS,
        "lineage": {
            "pipeline_run_id": run_id,
            "processed_uri": processed,
            "feature_hash": meta["feature_hash"],
            "manifest_sha256": meta["manifest_sha256"],
            "git_commit": git_commit(),
            "mlflow_run_id": tracker.run_id,
            "registered_model": cfg.model_name,
            "registered_version": version,
            "world_size": d.world,
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result = TrainResult(
        model_uri=s3_uri(bucket, prefix),
        model_sha256=sha,
        mlflow_run_id=tracker.run_id,
        experiment_id=tracker.experiment_id,
        tracking_uri=tracker.uri,
        registered_model=cfg.model_name,
        version=version,
        val_accuracy=metrics["val_accuracy"],
        test_accuracy=test_acc,
        epochs=len(history),
        resumed_from_epoch=start_epoch,
        world_size=d.world,
        seconds=round(time.monotonic() - t_start, 2),
        history=history,
        param_digests=digests,
        precision=precision,
    )
    # What a launcher that cannot read this pod's files (a PyTorchJob) reads back.
    store.write_json(bucket, prefix + RESULT_OBJECT, dataclasses.asdict(result))
    store.write_json(bucket, prefix + MODEL_JSON, model_json)  # last: the model is complete
    freed = checkpoint.release_tensors(store, bucket, ckpt_prefix)
    log.debug("removed %.0f MB of checkpoint tensors: the model is complete", freed / 1e6)
    log.info("test accuracy %.4f; model %s (version %s)", test_acc, s3_uri(bucket, prefix), version)
    return result


# ----------------------------------------------------------------------------------------------
# Entry point: always ends the MLflow run and destroys the process group, even on error.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--processed",
        required=True,
        type=s3_uri_arg,
        metavar="URI",
        help="processed data from feature-engineering, s3://processed-data/ID/HASH/",
    )
    parser.add_argument(
        "--run-id",
        type=run_id_arg,
        metavar="ID",
        help="pipeline run id: models/NAME/ID/ holds its checkpoints and model, and a "
        "restart with the same id resumes (required with several processes; "
        "default for one: a new timestamped id)",
    )
    parser.add_argument(
        "--result",
        type=Path,
        metavar="FILE",
        help="rank 0 writes the result JSON here (default: stdout only)",
    )
    add_config_args(parser, ["--epochs", "--workers"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    d = detect_dist()
    status = "FAILED"

    def stopped() -> None:
        # torchrun stops the surviving ranks with SIGTERM when a peer dies, as a local run does
        # its trainer when it is stopped: exit through the finally below, so the MLflow run
        # (KILLED, as MLflow calls a run stopped from outside) and the process group close.
        # Terminated, not SystemExit: raised in a finalizer, that would be printed and lost;
        # this is delivered again there (pipelines.errors.redeliver_interrupts).
        nonlocal status
        status = "KILLED"

    raise_on_sigterm(stopped)

    def body() -> None:
        nonlocal status
        if not d.main:  # one voice: the other ranks speak only of trouble
            logging.getLogger().setLevel(logging.WARNING)
        cfg = config_from_args(args)
        run_id = args.run_id
        if run_id is None:
            if d.world > 1:
                raise ConfigError("--run-id is required when several processes train together")
            run_id = datetime.now(UTC).strftime("local-%Y%m%d-%H%M%S")
        with kept_log(cfg, run_id, d):
            result = train(cfg, args.processed, run_id, d)
        status = "FINISHED"
        if result is not None:
            text = json.dumps(result.__dict__, sort_keys=True)
            if args.result:
                args.result.write_text(text + "\n")
            print(text)

    try:
        code = run_main(body, args.verbose)
        if code == INTERRUPTED:  # Ctrl-C
            status = "KILLED"
        return code
    finally:
        # A signal now (a Ctrl-C, then the launcher's SIGTERM) would cut the closing short.
        for sig in (signal.SIGINT, *TERMINATING):
            signal.signal(sig, signal.SIG_IGN)
        checkpoint.settle_uploads()
        tracking.end(status)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # Everything is closed above: the MLflow run ended, the process group destroyed, and every
    # S3 write done (train() awaits the last checkpoint upload; after a failure, one cut short
    # leaves the previous checkpoint current). Skipping the interpreter's teardown of torch and
    # mlflow saves about 2 s per process here, on the pipeline's critical path.
    exit_now(main())
