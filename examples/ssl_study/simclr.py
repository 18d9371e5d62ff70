"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv:2002.05709), at small scale.

Two independently augmented views of every image go through the backbone and a projection head;
the NT-Xent loss (eq. 1 of the paper) makes each view pick out its partner among the 2N-1 other
views of the batch. After training the projection head is thrown away and the backbone kept.

Layout of the checkpoint: ``backbone.*`` and ``projection_head.layers.*``, the attribute names of
lightly's SimCLR example (lightly/examples/pytorch/simclr.py: ``self.backbone``,
``self.projection_head = SimCLRProjectionHead(...)``, whose layers are Linear(no bias), BatchNorm1d,
ReLU, Linear), so ``featstore extract --weights`` has to strip ``backbone.`` and drop the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from augment import each, normalize
from encoder import SmallResNet


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalized-temperature cross entropy over the 2N views; positives are (i, i+N) and (i+N, i)."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is never its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def simclr_augment(size: int) -> v2.Compose:
    """The paper's augmentation (appendix A) without blur, as it does for 32-px CIFAR-10: random
    resized crop (scale 0.08-1), flip, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SimCLR(nn.Module):
    def __init__(self, size: int, temperature: float = 0.5, out_dim: int = 128):
        super().__init__()
        self.backbone = SmallResNet()
        self.projection_head = ProjectionHead(self.backbone.out_dim, self.backbone.out_dim, out_dim)
        self.temperature = temperature
        self.augment = simclr_augment(size)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        device = self.projection_head.layers[0].weight.device
        views = normalize(torch.cat([each(self.augment, images), each(self.augment, images)]), device)
        z = self.projection_head(self.backbone(views))  # both views in one pass: BatchNorm sees 2N
        z0, z1 = z.chunk(2)
        return nt_xent(z0, z1, self.temperature)
