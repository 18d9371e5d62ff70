"""The backbone every method of the study trains, and ``build`` for featstore.

    featstore extract --model examples/ssl_study/encoder.py:build --weights simclr.pth \\
        --image-size 64 --resize 72 --interpolation bilinear --dataset DIR --out simclr.zarr

A small ResNet-style CNN for 64-px images (a ResNet-18 with a small-image stem was measured
~33x slower per image on the 2-core CPU this study targets; see docs/ssl_study.md): a stride-2
3x3 stem and three stages of two 3x3 convolutions (the first with stride 2), BatchNorm and ReLU,
a residual shortcut per stage, then global average pooling. ``forward`` returns the pooled
(B, 256) vector; ``feature_map`` is the last spatial map, which the autoencoder's decoder starts
from. Any input size works (jigsaw feeds it 14- to 28-px tiles).

``build`` returns the same network with three feature views for featstore, all from one forward
pass: ``features`` (the pooled output of the last stage, what every method trains; the primary
view) and ``layer1``/``layer2`` (the pooled outputs of the first two stages, 64-d and 128-d).
A pretext task can shape the last stage for itself and leave the general features earlier
(Goyal et al., "Scaling and Benchmarking Self-Supervised Visual Representation Learning", ICCV
2019, probe every stage of a ResNet-50 and find jigsaw's best at res4, not res5), so the study
probes every stage; its claims are made on ``features``, fixed before any number was seen.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (32, 64, 128, 256)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Stage(nn.Module):
    """Two 3x3 convolutions (the first downsamples) with a 1x1 strided shortcut, as a ResNet block."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, stride=2)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        self.stem = conv_bn_relu(3, widths[0], stride=2)
        self.layer1 = Stage(widths[0], widths[1])
        self.layer2 = Stage(widths[1], widths[2])
        self.layer3 = Stage(widths[2], widths[3])
        self.out_dim = widths[-1]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))


class StageViews(SmallResNet):
    """The backbone as featstore sees it: ``{view: (B, D)}`` with the pooled output of every stage.
    The same parameters under the same names as SmallResNet, so every method's checkpoint loads."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h1 = self.layer1(self.stem(x))
        h2 = self.layer2(h1)
        return {"features": self.layer3(h2).mean(dim=(2, 3)), "layer1": h1.mean(dim=(2, 3)), "layer2": h2.mean(dim=(2, 3))}


def build() -> nn.Module:
    """The untrained backbone with its three views; featstore's ``--weights`` loads a checkpoint of
    any of the three methods."""
    return StageViews()
