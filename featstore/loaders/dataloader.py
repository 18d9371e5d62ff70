"""The reference loader: PIL decode + torchvision transforms in a DataLoader with worker processes.

With augmented views (``featstore.augment``) each image is decoded once and cropped K + 1 times:
the center crop, and K crops by torchvision's ``resized_crop`` (+ ``hflip``) of the upright decoded
image with the row's drawn parameters, exactly what ``RandomResizedCrop`` + ``RandomHorizontalFlip``
give with those parameters.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..augment import ViewPlan, no_views
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


def crop_view(image, params, pre: Preprocess) -> torch.Tensor:
    """One augmented view of a decoded upright PIL image: (3, S, S) uint8 from (top, left, height, width, flip)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    top, left, height, width, flip = (int(p) for p in params)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}
    view = F.resized_crop(image, top, left, height, width, [pre.image_size, pre.image_size], interp[pre.interpolation], antialias=True)
    if flip:
        view = F.horizontal_flip(view)
    return F.pil_to_tensor(view)


class _Images(Dataset):
    def __init__(self, paths: list[str], pre: Preprocess, verdicts: Verdicts | None, read=read_verified, augment: ViewPlan | None = None):
        self.paths = paths
        self.read = read
        self.verdicts = verdicts
        self.pre = pre
        self.transform = build_transform(pre)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        # the same reading and container checks as the other loaders, so the same files are refused
        data, reason = self.read(self.paths[row], self.verdicts[row] if self.verdicts is not None else None)
        if data is not None:
            try:
                image = decode_rgb(data)
                if self.augment is None:
                    return row, self.transform(image), ""
                params = self.augment.params(row, image.height, image.width)
                views = torch.stack([crop_view(image, p, self.pre) for p in params])
                return row, self.transform(image), "", views, params
            except Exception as e:  # any decode failure marks the row invalid instead of killing the run
                reason = decode_failure(e, data)
        size = self.pre.image_size
        blank = torch.zeros(3, size, size, dtype=torch.uint8)
        if self.augment is None:
            return row, blank, reason
        k = self.augment.views
        return row, blank, reason, blank.expand(k, 3, size, size).clone(), no_views(k)


def _collate(items):
    rows = np.asarray([item[0] for item in items], dtype=np.int64)
    images = torch.stack([item[1] for item in items])
    errors = {int(item[0]): item[2] for item in items if item[2]}
    if len(items[0]) == 3:
        return rows, images, errors, None, None
    return rows, images, errors, torch.stack([item[3] for item in items]), np.stack([item[4] for item in items])


class TorchLoader:
    name = "torch"

    def __init__(self, preprocess: Preprocess, device: torch.device, workers: int, read=read_verified):
        self.pre = preprocess
        self.device = device
        self.workers = workers
        self.read = read  # (path, verdict) → (bytes or None, reason): files, or tar members (members.read_member_verified)

    def batches(
        self, paths: list[str], plan: list[np.ndarray], verdicts: Verdicts | None = None, augment: ViewPlan | None = None
    ) -> Generator[Batch, None, None]:  # closed early by extraction
        if not plan:
            return
        loader = DataLoader(
            _Images(paths, self.pre, verdicts, self.read, augment),
            batch_sampler=[p.tolist() for p in plan],
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            persistent_workers=False,
        )
        for rows, images, errors, views, params in loader:
            normalized = normalize_on_device(images, self.pre, self.device, channels_last_input=False)
            if views is None:
                yield Batch(rows, normalized, errors)
                continue
            flat = normalize_on_device(views.flatten(0, 1), self.pre, self.device, channels_last_input=False)
            yield Batch(rows, normalized, errors, flat.unflatten(0, tuple(views.shape[:2])), params)
