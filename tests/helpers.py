"""Small helpers only the tests use (kept out of the package)."""

from __future__ import annotations

from pathlib import Path

import torch


def digit_index_from_path(path: str) -> int:
    """The row of ``sklearn.datasets.load_digits()`` a digits image was written from (its file name)."""
    return int(Path(path).stem)


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """The backbone tensors of a checkpoint file, loaded safely, with wrappers, copies and prefixes removed."""
    from featstore.models.checkpoints import load_checkpoint

    return load_checkpoint(path, trust).tensors


def autograd_step(heads, patches, cls, target, protocol):
    """The reference step: autograd through ``heads.losses`` (the per-pixel loss), diverged heads held still;
    the (G,) losses before it."""
    heads.w.requires_grad_(True)
    heads.b.requires_grad_(True)
    loss = heads.losses(patches, cls, target)
    finite = torch.isfinite(loss)
    gw, gb = torch.autograd.grad(torch.where(finite, loss, torch.zeros_like(loss)).sum(), [heads.w, heads.b])
    heads.w.requires_grad_(False)
    heads.b.requires_grad_(False)
    with torch.no_grad():
        heads.step(gw, gb, protocol, 1.0)
    return loss.detach()
