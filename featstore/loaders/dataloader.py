"""The reference loader: PIL decode + torchvision transforms in a DataLoader with worker processes."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..preprocess import Preprocess
from .batch import Batch, normalize_on_device
from .decode import decode_failure, decode_rgb
from .verdicts import Verdicts, read_verified


def build_transform(pre: Preprocess):
    from torchvision.transforms import InterpolationMode, v2

    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}
    return v2.Compose(
        [
            v2.Resize(pre.resize, interpolation=interp[pre.interpolation], antialias=True),
            v2.CenterCrop(pre.image_size),
            v2.PILToTensor(),
        ]
    )


class _Images(Dataset):
    def __init__(self, paths: list[str], pre: Preprocess, verdicts: Verdicts | None, read=read_verified):
        self.paths = paths
        self.read = read
        self.verdicts = verdicts
        self.pre = pre
        self.transform = build_transform(pre)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        # the same reading and container checks as the other loaders, so the same files are refused
        data, reason = self.read(self.paths[row], self.verdicts[row] if self.verdicts is not None else None)
        if data is not None:
            try:
                return row, self.transform(decode_rgb(data)), ""
            except Exception as e:  # any decode failure marks the row invalid instead of killing the run
                reason = decode_failure(e, data)
        size = self.pre.image_size
        return row, torch.zeros(3, size, size, dtype=torch.uint8), reason


def _collate(items):
    rows = np.asarray([r for r, _, _ in items], dtype=np.int64)
    images = torch.stack([im for _, im, _ in items])
    errors = {int(r): reason for r, _, reason in items if reason}
    return rows, images, errors


class TorchLoader:
    name = "torch"

    def __init__(self, preprocess: Preprocess, device: torch.device, workers: int, read=read_verified):
        self.pre = preprocess
        self.device = device
        self.workers = workers
        self.read = read  # (path, verdict) → (bytes or None, reason): files, or tar members (members.read_member_verified)

    def batches(
        self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None = None
    ) -> Generator[Batch, None, None]:  # closed early by extraction
        if not plan:
            return
        loader = DataLoader(
            _Images(paths, self.pre, verdicts, self.read),
            batch_sampler=[p.tolist() for p in plan],
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            persistent_workers=False,
        )
        for rows, images, errors in loader:
            yield Batch(rows, normalize_on_device(images, self.pre, self.device, channels_last_input=False), errors)
