"""Evaluation over a whole split, sharded across ranks, in the precision the model trained in."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.data import Tensors
from training.dist import Dist


def make_autocast(device: torch.device, precision: str) -> Any:
    """A factory of autocast contexts for the precision (fp32: a disabled one)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Tensors, d: Dist, batch: int, num_classes: int, autocast: Any
) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, confusion matrix) over the whole split, each rank taking a strided part."""
    model.eval()
    part = Tensors(data.images[d.rank :: d.world], data.labels[d.rank :: d.world])
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, count
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for start in range(0, len(part), batch):
        x = part.images[start : start + batch].to(device)
        y = part.labels[start : start + batch].to(device)
        with autocast():
            logits = model(x).float()
        totals[0] += nn.functional.cross_entropy(logits, y, reduction="sum")
        totals[1] += len(y)
        confusion += torch.bincount(
            y * num_classes + logits.argmax(1), minlength=num_classes**2
        ).view(num_classes, num_classes)
    if d.world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(confusion)
    model.train()
    n = max(totals[1].item(), 1)
    return totals[0].item() / n, confusion.diag().sum().item() / n, confusion.cpu()
