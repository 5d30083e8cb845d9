"""The optimisation itself, on any device: the schedule, one step, and one epoch of steps."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from training.data import Tensors, augment

if TYPE_CHECKING:
    from pipelines.config import TrainConfig

# ----------------------------------------------------------------------------------------------
# Schedule: linear warm-up, then cosine to zero, as a pure function of the step (so a resumed
# run needs only the step count to be back on the same curve).


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.2) -> float:
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay conv/linear weights only: decaying BatchNorm scales and biases only hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def optimisation(
    model: nn.Module, tc: TrainConfig, precision: str
) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler, nn.Module]:
    """The recipe's optimiser, gradient scaler (on for fp16 only) and loss for `model`."""
    optimizer = torch.optim.SGD(
        param_groups(model, tc.weight_decay),
        lr=tc.lr,
        momentum=tc.momentum,
        nesterov=tc.momentum > 0,  # PyTorch refuses Nesterov without momentum: plain SGD then
    )
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    return optimizer, scaler, nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the (detached) loss and logits."""
    with autocast():
        logits = model(x)
        loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


def epoch_generator(device: torch.device, seed: int, epoch: int, rank: int) -> torch.Generator:
    """The augmentation's random stream for one epoch of one rank: a pure function of the
    three, so a resumed run draws the same crops and flips as one that never stopped."""
    return torch.Generator(device).manual_seed(seed * 7919 + epoch * 131 + rank)


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    data: Tensors,
    batches: Iterable[torch.Tensor],
    gen: torch.Generator,
    autocast: Any,
    schedule: tuple[int, int, float],
    pad: int,
    flips: torch.Tensor | None,
    cutout: int = 0,
) -> tuple[torch.Tensor, int, float]:
    """One epoch over `batches` (index tensors on data's device), the lr set before each step
    from schedule = (first step, total steps, peak lr), each image cropped after `pad` pixels of
    padding, mirrored where its bit in `flips` (indexed like data) is set, and a `cutout`-pixel
    square of it erased.
    Returns (loss sum, correct, count) as a float64 tensor on the device, the next step and the
    last lr.

    Nothing in here waits for the device, so a GPU can run ahead of Python: the counts stay on
    it and the indices are already there. (In fp16, the gradient scaler's inf check does wait.)"""
    step, total, peak = schedule
    sums = torch.zeros(3, dtype=torch.float64, device=data.images.device)
    lr = lr_at(step, total, peak)
    for idx in batches:
        lr = lr_at(step, total, peak)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = augment(data.images[idx], gen, pad, None if flips is None else flips[idx], cutout)
        y = data.labels[idx]
        loss, logits = train_step(model, optimizer, scaler, criterion, x, y, autocast)
        step += 1
        sums[:2] += torch.stack([loss * len(y), (logits.argmax(1) == y).sum()]).double()
        sums[2] += len(y)
    return sums, step, lr
