"""Training throughput: images/s per stem x precision x (1 process, 2 threads | 2 DDP x 1 thread).

    python -m benchmarks.train_throughput [--steps 12] [--warmup 3] [--repeats 3]

Each configuration runs the training program's own step (augmentation, forward, backward, SGD)
on uint8 CIFAR-shaped batches at the default global batch size; image content does not change
the speed. The 2-process case runs under torchrun with gloo, as `make run ARGS="--workers 2"`
does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

from benchmarks.common import ROOT, median, non_negative, positive, write_result
from pipelines.config import PipelineConfig
from training.data import augment, epoch_flips
from training.dist import detect_dist, init_process_group, place_rank, usable_cores, wrap_ddp
from training.evaluate import make_autocast
from training.loop import param_groups, train_step
from training.model import STEMS, build_classifier

PRECISIONS = ("fp32", "bf16")
LAYOUTS = {"1 proc x 2 threads": 1, "2 procs x 1 thread": 2}


def worker(stem: str, precision: str, steps: int, warmup: int) -> None:
    """Inside one rank: time `steps` training steps after `warmup`; rank 0 prints images/s."""
    d = detect_dist()
    place_rank(d)  # as training does
    if d.world > 1:
        init_process_group(d, "gloo")
    tc = PipelineConfig().train
    per_rank = tc.batch_size // d.world
    model = build_classifier(10, 3, stem, [0.5] * 3, [0.25] * 3)
    model = model.to(memory_format=torch.channels_last)
    ddp = wrap_ddp(model, d)  # as training wraps it
    optimizer = torch.optim.SGD(
        param_groups(model, tc.weight_decay), lr=0.01, momentum=0.9, nesterov=True
    )
    scaler = torch.amp.GradScaler(enabled=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    autocast = make_autocast(torch.device("cpu"), precision)
    gen = torch.Generator().manual_seed(d.rank)
    images = torch.randint(0, 256, (per_rank, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (per_rank,), generator=gen)
    for i in range(warmup + steps):
        if i == warmup:
            if d.world > 1:
                torch.distributed.barrier()
            start = time.perf_counter()
        flips = epoch_flips(per_rank, i, 0, tc.alternate_flips, gen)
        x = augment(images, gen, tc.crop_pad, flips, tc.cutout)
        train_step(ddp, optimizer, scaler, criterion, x, labels, autocast)
    elapsed = time.perf_counter() - start
    if d.main:
        print(json.dumps({"images_per_s": steps * tc.batch_size / elapsed}))
    if d.world > 1:
        torch.distributed.destroy_process_group()


def measure(stem: str, precision: str, procs: int, steps: int, warmup: int) -> float:
    args = [
        "-m",
        "benchmarks.train_throughput",
        "--worker",
        "--stem",
        stem,
        "--precision",
        precision,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    if procs > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, usable_cores() // procs)))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=positive(int), default=12, help="timed steps (default: 12)")
    parser.add_argument(
        "--warmup", type=non_negative(int), default=3, help="untimed steps first (default: 3)"
    )
    parser.add_argument(
        "--repeats",
        type=positive(int),
        default=3,
        help="measurements per cell; medians (default: 3)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stem", choices=STEMS, default="imagenet", help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.stem, args.precision, args.steps, args.warmup)
        return 0
    rows = []
    for stem in STEMS:
        for precision in PRECISIONS:
            # The two layouts alternate, so each ratio compares runs taken side by side.
            runs = {label: [] for label in LAYOUTS}
            ratios = []
            for _ in range(args.repeats):
                for label, procs in LAYOUTS.items():
                    runs[label].append(measure(stem, precision, procs, args.steps, args.warmup))
                ratios.append(runs["2 procs x 1 thread"][-1] / runs["1 proc x 2 threads"][-1])
            row = {"stem": stem, "precision": precision}
            row |= {label: round(median(values), 1) for label, values in runs.items()}
            row["ddp_ratio"] = round(median(ratios), 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    path = write_result(
        "train_throughput",
        rows,
        batch_size=PipelineConfig().train.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
