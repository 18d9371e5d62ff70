"""A convolutional autoencoder (Hinton & Salakhutdinov 2006, "Reducing the dimensionality of
data with neural networks"; the convolutional form of Masci et al. 2011, "Stacked convolutional
auto-encoders for hierarchical feature extraction"), at small scale.

The encoder (the shared backbone) maps the image to its last feature map (256 channels at 1/16
of the resolution: a 16x smaller spatial code with 4x fewer values than the normalized image has
pixel values, the bottleneck); a decoder of transposed convolutions, mirror of the encoder's
four stride-2 stages, rebuilds the image from that map; the loss is the mean squared error
against the (normalized) input. The decoder is thrown away after training and the probe reads the
map's global average, as for every method of the study.

Decoding from the spatial map, not from its global average: measured at CI scale (docs/ssl_study.md,
the table of variants), an autoencoder whose decoder started from the pooled 256-d vector probed
below random init, the spatial one above it.

Layout of the checkpoint: ``encoder.*`` and ``decoder.*``, the two attributes of the usual PyTorch
autoencoder (``self.encoder = nn.Sequential(...)``, ``self.decoder = nn.Sequential(...)``, e.g.
the PyTorch Lightning autoencoder tutorial's LitAutoEncoder), so ``--weights`` has to strip
``encoder.`` and drop the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from augment import each, normalize
from encoder import WIDTHS, SmallResNet


def up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AutoEncoder(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.encoder = SmallResNet()
        w = WIDTHS
        # four x2 upsamplings undo the stem and the three stages
        self.decoder = nn.Sequential(up(w[3], w[2]), up(w[2], w[1]), up(w[1], w[0]), nn.ConvTranspose2d(w[0], 3, 4, 2, 1))
        # light augmentation only: the input itself is the target
        self.augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()])

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(each(self.augment, images), self.decoder[-1].weight.device)
        return F.mse_loss(self.decoder(self.encoder.feature_map(x)), x)
