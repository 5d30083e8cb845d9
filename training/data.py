"""Processed shards into memory as uint8 tensors; per-rank batches; batched augmentation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from data import processed
from pipelines.config import UNMIRRORED_DATASETS
from pipelines.errors import ConfigError, DataError, IntegrityError
from pipelines.storage import ObjectStore, parse_s3_uri, s3_uri


@dataclass
class Tensors:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Tensors:
        return Tensors(self.images.to(device), self.labels.to(device))

    @classmethod
    def from_nhwc(cls, images: torch.Tensor, labels: torch.Tensor) -> Tensors:
        # NHWC as stored and decoded; NCHW here, the layout convolutions and channels_last expect.
        return cls(images.permute(0, 3, 1, 2).contiguous(), labels)


def load_processed(
    store: ObjectStore, uri: str, only: tuple[str, ...] | None = None
) -> tuple[dict[str, Any], dict[str, Tensors]]:
    """metadata.json and the splits (all, or `only`), each shard checked against its sha256."""
    bucket, prefix = parse_s3_uri(uri.rstrip("/") + "/")
    meta = processed.load(store, bucket, prefix)
    splits = {}
    for split, shards in meta["shards"].items():
        if only is not None and split not in only:
            continue
        images, labels = [], []
        for shard in shards:
            try:
                payload = store.get_bytes(bucket, prefix + shard["key"], shard["sha256"])
            except IntegrityError as exc:
                # Damaged since feature-engineering read it through: a new run does so again,
                # and writes the features anew.
                raise IntegrityError(
                    f"{exc}. Run the pipeline again: feature-engineering reads its shards "
                    "through and writes damaged ones anew"
                ) from None
            tensors = load_safetensors(payload)
            if len(tensors["labels"]) != shard["count"]:
                raise DataError(f"{s3_uri(bucket, prefix + shard['key'])}: wrong image count")
            images.append(tensors["images"])
            labels.append(tensors["labels"])
        splits[split] = Tensors.from_nhwc(torch.cat(images), torch.cat(labels))
    return meta, splits


def rank_batches(
    n: int,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    rank: int,
    world: int,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """This rank's index batches for one epoch, as DistributedSampler(drop_last=True) gives them:
    one seeded permutation shared by all ranks, each rank taking every world-th index. The
    permutation is drawn on the CPU (the same on every device) and moved to `device` once."""
    if batch_size % world:
        raise ConfigError(f"train.batch_size={batch_size} must be a multiple of the {world} ranks")
    per_rank = batch_size // world
    steps = n // batch_size
    if steps == 0:
        raise ConfigError(
            f"train.batch_size={batch_size} exceeds the {n} training images: lower it"
        )
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)[: steps * batch_size][rank::world]
    yield from order.to(device).split(per_rank)


def augment(
    images: torch.Tensor,
    gen: torch.Generator,
    pad: int,
    flips: torch.Tensor | None = None,
    cutout: int = 0,
) -> torch.Tensor:
    """Random crop after `pad` pixels of zero padding, then the images whose bit in `flips` is
    set mirrored left-right (None: none), then a `cutout`-pixel square zeroed at a random
    centre of each (part of it may fall off the edge, as in DeVries & Taylor's Cutout), for a
    whole batch. With cutout 0 nothing more is drawn from gen, so the crops stay the same."""
    n, _, h, w = images.shape
    if pad:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=images.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chan = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chan, rows, cols]
    if flips is not None:
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    if cutout:
        # Zero, as the crop's padding is: the same black the network already sees at the edges.
        cy = torch.randint(0, h, (n, 1, 1), generator=gen, device=images.device) - cutout // 2
        cx = torch.randint(0, w, (n, 1, 1), generator=gen, device=images.device) - cutout // 2
        rows = torch.arange(h, device=images.device)[None, :, None] - cy
        cols = torch.arange(w, device=images.device)[None, None, :] - cx
        hole = (rows >= 0) & (rows < cutout) & (cols >= 0) & (cols < cutout)
        images = images.masked_fill(hole[:, None], 0)
    return images


def epoch_flips(
    n: int, epoch: int, seed: int, alternate: bool, gen: torch.Generator
) -> torch.Tensor:
    """Which of the n training images one epoch mirrors, on gen's device. alternate: a seeded
    random half in even epochs and the other half in odd ones, so that any two epochs in a row
    show every image both ways (airbench's alternating flip: short schedules see more distinct
    views); else a fresh random half from gen. A pure function of its arguments, so every rank
    and a resumed run draw the same bits."""
    if not alternate:
        return torch.rand(n, generator=gen, device=gen.device) < 0.5
    # A stream of its own (rank_batches' permutations seed theirs with seed * 100_003 + epoch),
    # drawn on the CPU so that every device gets the same bits.
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed + 2**40)) < 0.5
    return (first ^ bool(epoch % 2)).to(gen.device)


def resolve_hflip(setting: bool | None, dataset: str) -> bool:
    """train.hflip as set, or unset: on unless the dataset's classes change when mirrored."""
    return setting if setting is not None else dataset not in UNMIRRORED_DATASETS


class Normalize(torch.nn.Module):
    """uint8 NCHW in, float normalised with the train split's mean/std out (channels_last)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)
