"""How far each loader's pixels are from the reference eval transform, on the photos shipped with the
tests (tests/data/photos: two 640 x 427, one 512 x 600), at several resize/crop settings.

    PYTHONPATH=. .venv/bin/python benchmarks/loader_agreement.py
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/loader_agreement.py --out before.json

The reference is torchvision's classic eval transform (``transforms.Resize(resize)`` +
``CenterCrop(crop)``, antialiased, the interpolation of featstore's preprocessing), what timm's and
the papers' evaluation code apply. Every loader available on this machine (``torch``, ``dali`` on CPU
threads, ``nvjpeg``'s code on CPU) loads the photos; the difference is in 0–255 gray levels
(normalization undone): the mean over the image, its 99.9th percentile and its maximum, per photo.
Which featstore is measured is whichever ``import featstore`` finds (PYTHONPATH), so one command
measures a baseline checkout and this one alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import OUT_DIR, machine, table, write_json  # noqa: E402

PHOTOS = sorted((REPO / "tests" / "data" / "photos").glob("*.jpg"))
# (crop, resize, interpolation): the default; a half crop offset (383 - 226 = 157); timm's 0.875 at
# 299 (342 → 512.6 and 400.8 px long sides, half offsets); resize == crop; crop_pct 0.95; bilinear
SETTINGS = [
    (224, 256, "bicubic"),
    (226, 256, "bicubic"),
    (299, 342, "bicubic"),
    (224, 224, "bicubic"),
    (224, 235, "bicubic"),
    (224, 256, "bilinear"),
]


def reference(path: Path, crop: int, resize: int, interpolation: str):
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    mode = getattr(transforms.InterpolationMode, interpolation.upper())
    t = transforms.Compose([transforms.Resize(resize, interpolation=mode, antialias=True), transforms.CenterCrop(crop)])
    return np.asarray(t(Image.open(path).convert("RGB")), dtype=np.float64)  # H, W, 3 in 0–255


def loaded(loader_name: str, files: list[str], crop: int, resize: int, interpolation: str):
    import numpy as np
    import torch

    from featstore.preprocess import Preprocess

    pre = Preprocess(crop, resize, interpolation)
    cpu = torch.device("cpu")
    if loader_name == "torch":
        from featstore.loaders.dataloader import TorchLoader

        loader = TorchLoader(pre, cpu, 0)
    elif loader_name == "dali":
        from featstore.loaders.dali import DaliLoader

        loader = DaliLoader(pre, cpu, 2)
    else:
        from featstore.loaders.nvjpeg import NvjpegLoader

        loader = NvjpegLoader(pre, cpu, 2)
    (batch,) = list(loader.batches(files, [np.arange(len(files))]))
    assert not batch.errors, batch.errors
    x = batch.images.float() * torch.tensor(pre.std).view(1, 3, 1, 1) + torch.tensor(pre.mean).view(1, 3, 1, 1)
    return (x * 255).permute(0, 2, 3, 1).numpy().astype(np.float64)  # N, H, W, 3 in 0–255


def main() -> None:
    import numpy as np

    import featstore
    from featstore.loaders import dali_available

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loaders", default="torch,dali,nvjpeg")
    parser.add_argument("--out", default=str(OUT_DIR / "loader_agreement.json"))
    args = parser.parse_args()
    names = [n for n in args.loaders.split(",") if n != "dali" or dali_available()]
    files = [str(p) for p in PHOTOS]
    rows = []
    for crop, resize, interpolation in SETTINGS:
        refs = [reference(p, crop, resize, interpolation) for p in PHOTOS]
        for name in names:
            images = loaded(name, files, crop, resize, interpolation)
            for path, ref, img in zip(PHOTOS, refs, images):
                diff = np.abs(img - ref)
                rows.append(
                    dict(
                        setting=f"{crop}/{resize} {interpolation}",
                        loader=name,
                        photo=path.name,
                        mean=float(diff.mean()),
                        p999=float(np.quantile(diff, 0.999)),
                        max=float(diff.max()),
                    )
                )
    print(f"featstore from {Path(featstore.__file__).parent}")
    columns = [
        ("setting", "crop/resize", "s"),
        ("loader", "loader", "s"),
        ("photo", "photo", "s"),
        ("mean", "mean", ".2f"),
        ("p999", "p99.9", ".1f"),
        ("max", "max", ".1f"),
    ]
    print(table(rows, columns))
    path = write_json(args.out, {"machine": machine(), "featstore": str(Path(featstore.__file__).parent), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
