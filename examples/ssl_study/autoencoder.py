"""A convolutional autoencoder (Hinton & Salakhutdinov 2006, "Reducing the dimensionality of
data with neural networks"; the convolutional form of Masci et al. 2011, "Stacked convolutional
auto-encoders for hierarchical feature extraction"), at small scale.

The encoder (the shared backbone, convolutions then global average pooling) compresses the image
into one 256-d code, the very vector a linear probe later reads; a decoder (a linear layer back
to a 1/16-resolution map, then transposed convolutions) reconstructs the image from that code
alone; the loss is the mean squared error against the (normalized) input. Decoding from the
pooled code, not from the last spatial map, makes the probed vector itself the bottleneck. The
decoder is thrown away after training.

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
from encoder import SmallResNet


def up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AutoEncoder(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.encoder = SmallResNet()
        w = (32, 64, 128, 256)
        self.side = size // 16  # four x2 upsamplings undo the stem and the three stages
        self.decoder = nn.Sequential(
            nn.Linear(w[3], w[3] * self.side * self.side), nn.Unflatten(1, (w[3], self.side, self.side)), nn.ReLU(inplace=True),
            up(w[3], w[2]), up(w[2], w[1]), up(w[1], w[0]), nn.ConvTranspose2d(w[0], 3, 4, 2, 1))
        # light augmentation only: the input itself is the target
        self.augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()])

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(each(self.augment, images), self.decoder[0].weight.device)
        return F.mse_loss(self.decoder(self.encoder(x)), x)
