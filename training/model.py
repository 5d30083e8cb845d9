"""ResNet-18 from torchvision with a stem chosen for the image size and the compute at hand."""

from __future__ import annotations

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


def build_classifier(
    num_classes: int, in_channels: int, stem: str, mean: list[float], std: list[float]
) -> nn.Module:
    """The trained and served network: uint8 NCHW in, logits out (normalisation inside)."""
    return nn.Sequential(Normalize(mean, std), build_model(num_classes, in_channels, stem))
