"""ResNet-18 from torchvision with a stem chosen for the image size and the compute at hand."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from training.data import Normalize

STEMS = ("cifar", "imagenet", "s2")


def build_model(num_classes: int, in_channels: int = 3, stem: str = "imagenet") -> nn.Module:
    """torchvision's resnet18 (random init, no weight download) with one of three stems:

    - imagenet: torchvision's own 7x7 stride-2 conv + maxpool (4x downsampling, cheapest);
    - cifar: 3x3 stride-1 conv, no maxpool (full 32x32 resolution, about 16x the stem cost);
    - s2: 3x3 stride-2 conv, no maxpool (2x downsampling, about a quarter of cifar's cost).
    """
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r}: choose one of {', '.join(STEMS)}")
    model = resnet18(weights=None, num_classes=num_classes)
    if stem == "imagenet":
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return model
    model.conv1 = nn.Conv2d(
        in_channels, 64, 3, stride=1 if stem == "cifar" else 2, padding=1, bias=False
    )
    model.maxpool = nn.Identity()
    return model


class Classifier(nn.Sequential):
    """Normalise, then the network. With flip_tta, eval mode averages the logits of the image
    and of its mirror image: CIFAR-like classes are mirror-symmetric, so the second view adds
    information the first lacks. A Sequential, so the weights keep their names ("0.", "1.")."""

    def __init__(self, norm: nn.Module, net: nn.Module, flip_tta: bool = False):
        super().__init__(norm, net)
        self.flip_tta = flip_tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.flip_tta and not self.training:
            logits = (logits + super().forward(x.flip(3))) / 2  # NCHW: 3 is the width axis
        return logits


def build_classifier(
    num_classes: int,
    in_channels: int,
    stem: str,
    mean: list[float],
    std: list[float],
    flip_tta: bool = False,
) -> Classifier:
    """The trained and served network: uint8 NCHW in, logits out (normalisation inside)."""
    return Classifier(Normalize(mean, std), build_model(num_classes, in_channels, stem), flip_tta)
