"""ResNet-18, torchvision's layout and init, with a stem chosen for the image size and compute."""

from __future__ import annotations

import torch
from torch import nn

from training.data import Normalize

STEMS = ("cifar", "imagenet", "s2", "s1pool")


# torchvision's ResNet-18, written out: importing torchvision costs 2-3 s per process here (it
# pulls in torch._dynamo), and the trainer, the gate and the model server each paid it. The
# module names, the order the weights are created in and their init are torchvision's, so a
# seed gives the same weights and the state dicts load either way (tests/test_training_units.py).


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet18(nn.Module):
    """Four stages of two basic blocks (64, 128, 256, 512 channels), torchvision's stem."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, 1)
        self.layer2 = self._stage(64, 128, 2)
        self.layer3 = self._stage(128, 256, 2)
        self.layer4 = self._stage(256, 512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or cin != cout:  # created before the blocks, as torchvision does
            downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        return nn.Sequential(BasicBlock(cin, cout, stride, downsample), BasicBlock(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(num_classes: int, in_channels: int = 3, stem: str = "imagenet") -> nn.Module:
    """ResNet-18 (random init, nothing downloaded) with one of four stems:

    - imagenet: torchvision's own 7x7 stride-2 conv + maxpool (4x downsampling, cheapest);
    - cifar: 3x3 stride-1 conv, no maxpool (full 32x32 resolution, about 16x the stem cost);
    - s2: 3x3 stride-2 conv, no maxpool (2x downsampling, about a quarter of cifar's cost);
    - s1pool: 3x3 stride-1 conv, then a 2x2 maxpool: s2's 16x16 maps from layer1 on, but the
      stem's features are computed at every position and the strongest of each 2x2 kept, where
      s2 computes them at one position in four (0.88x s2's training pace on 2 CPU cores).
    """
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r}: choose one of {', '.join(STEMS)}")
    model = ResNet18(num_classes)
    if stem == "imagenet":
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return model
    model.conv1 = nn.Conv2d(
        in_channels, 64, 3, stride=2 if stem == "s2" else 1, padding=1, bias=False
    )
    model.maxpool = nn.MaxPool2d(2) if stem == "s1pool" else nn.Identity()
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
