"""Time to 94% on one GPU: ResNet-18 trained by the trainer's own epoch loop on real CIFAR-10.

    python -m benchmarks.gpu_time_to_accuracy [--schedules 12,16,20,24,32,40] [--budget-s 330]

The 50,000 images of ../shared/data's archive (or --data) are decoded by the imagefolder reader,
and 10% of each class is held out (dataset.val_fraction, as feature-engineering holds out val).
The rest go onto the GPU as uint8, once. Each run trains the profile's recipe (`full`: the cifar
stem) with the trainer's own code: training.loop.run_epoch, augmentation on the device, the
autocast precision `auto` resolves to, channels_last. A one-cycle schedule peaks only at its end,
so the time to the target is the training time of the shortest schedule (in epochs) whose final
held-out accuracy, with flip TTA as served, reaches it. The search starts in the middle of
--schedules and moves down after a hit and up after a miss, while the budget lasts.

The clock covers the training steps only, synchronised with the device at each epoch's end:
the warm-up before the first run (cuDNN's kernel choice, and the compile with --compile), the
decode and the per-epoch evaluations are outside it and reported beside it. The held-out images
come from the training archive, so the figure is held-out accuracy, not CIFAR-10 test accuracy.
Without CUDA it prints why and exits 0: a CPU run would take hours.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import recipe, write_result
from benchmarks.runs import SHARED_CIFAR
from components.feature_engineering import channel_stats, stratified_holdout
from data.imagefolder import read
from data.raw import files_of
from pipelines.cli import parse_set, run_main
from pipelines.config import PROFILES, TrainConfig, load_config
from pipelines.errors import ConfigError
from training.data import Tensors, epoch_flips, rank_batches
from training.dist import Dist
from training.evaluate import evaluate, make_autocast
from training.loop import epoch_generator, optimisation, run_epoch
from training.model import build_classifier
from training.precision import Hardware
from training.precision import resolve as resolve_precision

WARMUP_STEPS = 30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(path: Path, val_fraction: float, seed: int) -> tuple[dict[str, Tensors], dict[str, Any]]:
    """(train and val as uint8 NCHW tensors on the CPU, the train split's channel stats)."""
    split = read(files_of(path)).splits["train"]
    keep, held = stratified_holdout(split.labels, val_fraction, np.random.default_rng(seed))
    mean, std = channel_stats(split.images[keep])

    def tensors(idx: np.ndarray) -> Tensors:
        images, labels = split.images[idx], split.labels[idx]
        return Tensors.from_nhwc(torch.from_numpy(images), torch.from_numpy(labels))

    return {"train": tensors(keep), "val": tensors(held)}, {"mean": mean, "std": std}


class Trainer:
    """One model, reset to the same initial weights before every run, so that a compiled
    forward pass compiles once and every schedule starts from the same point."""

    def __init__(
        self, tc: TrainConfig, stats: dict[str, Any], device: torch.device, compile_: bool
    ):
        self.tc, self.device = tc, device
        self.precision, _ = resolve_precision(tc.precision, Hardware.detect(device))
        self.autocast = make_autocast(device, self.precision)
        torch.manual_seed(tc.seed)
        self.model = build_classifier(10, 3, tc.stem, stats["mean"], stats["std"])
        self.model = self.model.to(device, memory_format=torch.channels_last)
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.net: nn.Module = torch.compile(self.model) if compile_ else self.model

    def run(self, data: dict[str, Tensors], epochs: int, *, steps: int | None = None) -> dict:
        """Train `epochs` epochs (or only `steps` steps, for the warm-up) from the initial
        weights; the curve is one-view val accuracy after each epoch against training seconds."""
        tc, device = self.tc, self.device
        self.model.load_state_dict(self.initial)
        self.model.flip_tta = False
        optimizer, scaler, criterion = optimisation(self.model, tc, self.precision)
        # One process, whatever RANK or WORLD_SIZE the environment holds (a pod, torchrun).
        train, d = data["train"], Dist()
        total = len(train) // tc.batch_size * epochs
        step, train_s, eval_s, images, curve = 0, 0.0, 0.0, 0, []
        for epoch in range(epochs):
            batches = rank_batches(
                len(train), tc.batch_size, epoch=epoch, seed=tc.seed, rank=0, world=1, device=device
            )
            if steps is not None:
                batches = itertools.islice(batches, steps)
            sync(device)
            t0 = time.perf_counter()
            gen = epoch_generator(device, tc.seed, epoch, 0)
            sums, step, _ = run_epoch(
                self.net,
                optimizer,
                scaler,
                criterion,
                train,
                batches,
                gen,
                self.autocast,
                (step, total, tc.lr),
                tc.crop_pad,
                epoch_flips(len(train), epoch, tc.seed, tc.alternate_flips, gen),
                tc.cutout,
            )
            images += int(sums[2].item())  # waits for the device
            train_s += time.perf_counter() - t0
            if steps is not None:
                return {"steps": step, "seconds": train_s}
            t1 = time.perf_counter()
            _, acc, _ = evaluate(self.net, data["val"], d, 1024, 10, self.autocast)
            eval_s += time.perf_counter() - t1
            curve.append((round(train_s, 2), acc))
            print(f"  epoch {epoch + 1}/{epochs}: val {acc:.4f} at {train_s:.1f} s", flush=True)
        self.model.flip_tta = tc.flip_tta
        _, final, _ = evaluate(self.net, data["val"], d, 1024, 10, self.autocast)
        return {
            "epochs": epochs,
            "train_s": round(train_s, 2),
            "eval_s": round(eval_s, 2),
            "images_per_s": round(images / train_s),
            "val_accuracy": final,
            "curve": curve,
        }


def search(
    schedules: list[int], target: float, budget_s: float, trial: Any
) -> tuple[list[dict], bool]:
    """Runs from the middle of the sorted schedules, down after a hit and up after a miss,
    until the shortest hit is bracketed or the list ends (complete: True), or until the next
    run would exceed the budget (False). The first run always starts: it measures the rate."""
    runs: list[dict] = []
    lo, hi = 0, len(schedules) - 1  # the unresolved range
    start, rate = time.monotonic(), None  # rate: seconds per epoch, train and evaluation
    while lo <= hi:
        mid = (lo + hi) // 2
        epochs = schedules[mid]
        left = budget_s - (time.monotonic() - start)
        if rate is not None and epochs * rate > left:
            print(f"  {epochs} epochs would take ~{epochs * rate:.0f} s; {left:.0f} s left: stop")
            return runs, False
        run = trial(epochs)
        run["met"] = run["val_accuracy"] >= target
        runs.append(run)
        rate = (run["train_s"] + run["eval_s"]) / epochs * 1.1
        print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
        if run["met"]:
            hi = mid - 1
        else:
            lo = mid + 1
    return runs, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        type=Path,
        help=f"the archive (default: {SHARED_CIFAR}, and a skip, saying so, where it is absent)",
    )
    parser.add_argument(
        "--target",
        type=bounded(0.0, 1.0),
        default=0.94,
        help="held-out accuracy to reach, in (0, 1] (default: 0.94)",
    )
    parser.add_argument(
        "--schedules",
        type=epoch_list,
        default="12,16,20,24,32,40",
        help="epoch counts to search, comma-separated (default: 12,16,20,24,32,40)",
    )
    parser.add_argument(
        "--budget-s",
        type=bounded(0.0, float("inf")),
        default=330.0,
        help="after the first run, none starts that would end after this many seconds of "
        "search (default: 330)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (default: eager)"
    )
    parser.add_argument(
        "--device",
        type=device_arg,
        default="cuda",
        help="where to train; cpu runs the same code as a check of it, with tiny schedules, and "
        "records nothing (default: cuda)",
    )
    parser.add_argument(
        "--profile", choices=list(PROFILES), default="full", help="the recipe (default: full)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.batch_size=512 (default: none)",
    )
    args = parser.parse_args(argv)
    # Bad --set values or data: one line and exit 2 or 1, as the pipeline's commands do.
    return run_main(lambda: measure(args))


def epoch_list(text: str) -> list[int]:
    try:
        epochs = sorted(int(s) for s in text.split(","))
    except ValueError:
        epochs = []
    if not epochs or epochs[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected epoch counts, e.g. 12,16,20")
    return epochs


def device_arg(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cuda, cuda:N or cpu")
    return device


def bounded(low: float, high: float) -> Any:
    """An argparse type: a number in (low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low < value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number in ({low:g}, {high:g}]")
        return value

    return parse


def measure(args: argparse.Namespace) -> None:
    cfg = load_config(args.profile, overrides=parse_set(args.set), environ={})
    device = args.device
    if args.data is not None and not args.data.exists():
        raise ConfigError(f"--data {args.data}: no such file; give the CIFAR-10 archive's path")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (this measures time to accuracy on one GPU)")
        return
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    path = args.data or SHARED_CIFAR
    if not path.exists():
        print(f"skipped: {path} is absent (the real images this measures)")
        return
    torch.backends.cudnn.benchmark = True  # as the trainer sets it on CUDA
    t0 = time.perf_counter()
    data, stats = load(path, cfg.dataset.val_fraction, cfg.dataset.seed)
    decode_s = time.perf_counter() - t0
    data = {name: split.to(device) for name, split in data.items()}
    trainer = Trainer(cfg.train, stats, device, args.compile)
    warm = trainer.run(data, 1, steps=WARMUP_STEPS)
    print(f"decode {decode_s:.1f} s; warm-up {warm['seconds']:.1f} s ({warm['steps']} steps)")
    runs, complete = search(
        args.schedules, args.target, args.budget_s, lambda e: trainer.run(data, e)
    )
    hits = [r for r in runs if r["met"]]
    best = min(hits, key=lambda r: r["epochs"]) if hits else None
    tc = cfg.train
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "recipe": f"{recipe(tc, trainer.precision, epochs=False)}, "
        f"{'compiled' if args.compile else 'eager'}",
        "train_images": len(data["train"]),
        "val_images": len(data["val"]),
        "profile": args.profile,
        "overrides": args.set,
        "target": args.target,
        "schedules": args.schedules,
        "budget_s": args.budget_s,
        # False: the budget stopped the search, so a shorter schedule may also reach the target.
        "search_complete": complete,
        "time_to_target_s": best["train_s"] if best else None,
        "epochs_to_target": best["epochs"] if best else None,
        "decode_s": round(decode_s, 1),
        "warmup_s": round(warm["seconds"], 1),
    }
    print(json.dumps(summary), flush=True)
    if device.type != "cuda":  # a check of the code, not a figure for the GPU's record
        print("not recorded: the result file holds GPU runs only")
        return
    print(write_result("gpu_time_to_accuracy", runs, summary=summary))


if __name__ == "__main__":
    sys.exit(main())
