"""Image loaders: one backend per module, the same preprocessing semantics, the same batch contract.

Every loader takes a *batch plan* (a list of row-index arrays; batches never span store units) and
yields one :class:`Batch` per planned batch, in order, covering exactly the planned rows. A row whose
file cannot be decoded gets a zero placeholder image and a reason in ``Batch.errors``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UsageError
from .batch import Batch, Loader, normalize_on_device

if TYPE_CHECKING:  # torch is imported where used: `featstore --help` needs none
    import torch

    from ..manifest import Manifest
    from ..preprocess import Preprocess

__all__ = ["AUTO", "LOADERS", "Batch", "Loader", "choose_loader", "dali_available", "make_loader", "normalize_on_device", "shard_loader"]

LOADERS = ("dali", "torch", "nvjpeg")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # any import failure (missing wheel, missing CUDA libs) means: no DALI
        return False
    return True


# What ``--loader auto`` picks on each kind of device: the loader that ran fastest end to end there,
# in the measurements recorded in benchmarks/RESULTS.md (issue 22 / issue 23 item 8):
# - CPU: the torch DataLoader. On a 2-core CPU, ResNet-18 at 224 px over the same 700 photos ran at
#   17.0 img/s with it against 11.5 with DALI's CPU pipeline (issue 23), and again ahead in the
#   side-by-side run of issue 22 after DALI read its own files: on a CPU the model takes the cores,
#   and DALI's threads compete with it for them while the DataLoader's workers wait in between.
# - CUDA: nvJPEG, which ran 1.1-1.8x DALI's steady rate on every row measured on an H200 (2026-11-29).
#   benchmarks/gpu/run_gpu.sh measures both again after issue 22 and targets22.py says which to pick.
AUTO = {"cpu": "torch", "cuda": "nvjpeg"}


def choose_loader(name: str, device: torch.device) -> str:
    """``auto``: what measured fastest on this kind of device (``AUTO``; torch where it is not listed).
    ``dali`` without DALI is an error."""
    if name == "auto":
        return AUTO.get(device.type, "torch")
    if name not in LOADERS:
        raise UsageError(f"unknown loader {name!r}", f"use one of auto, {', '.join(LOADERS)}")
    if name == "dali" and not dali_available():
        raise UsageError("--loader dali, but NVIDIA DALI cannot be imported", "pip install nvidia-dali-cuda130, or use --loader torch")
    return name


def make_loader(
    name: str, preprocess: Preprocess, device: torch.device, workers: int, max_decode_pixels: int | None = None, shards: bool = False
) -> Loader:
    """The loader ``name``, decoding under a budget of ``max_decode_pixels`` (default: from the
    machine's memory; see ``featstore.decode_budget``). ``shards``: its paths are tar members
    (``manifest.member_ref``: a WebDataset), read through ``members``."""
    from PIL import Image

    from ..decode_budget import default_max_decode_pixels
    from ..image_header import image_size_from_header
    from .budget import BudgetedLoader
    from .members import member_size, read_member_verified

    read = read_member_verified if shards else None
    inner: Loader
    if name == "dali":
        if shards:
            from .dali_shards import DaliShardLoader

            inner = DaliShardLoader(preprocess, device, workers)
        else:
            from .dali import DaliLoader

            inner = DaliLoader(preprocess, device, workers)
    elif name == "nvjpeg":
        from .nvjpeg import NvjpegLoader

        inner = NvjpegLoader(preprocess, device, workers, **({"read": read} if read else {}))
    else:
        from .dataloader import TorchLoader

        inner = TorchLoader(preprocess, device, workers, **({"read": read} if read else {}))
    budget = max_decode_pixels or default_max_decode_pixels(Image.MAX_IMAGE_PIXELS)
    return BudgetedLoader(inner, preprocess, device, budget, workers, size_of=member_size if shards else image_size_from_header)


def shard_loader(requested: str, chosen: str, manifest: Manifest) -> str:
    """The loader for a WebDataset: ``chosen`` (what ``choose_loader`` gave for ``requested``), except
    that DALI's reader takes local shards only: ``auto`` then reads URLs with torch."""
    urls = manifest.shards is not None and any("://" in s for s in manifest.shards.shards)
    if chosen == "dali" and urls:
        if requested == "dali":
            raise UsageError(
                "--loader dali reads local shards only, and these are URLs",
                "use --loader torch (or nvjpeg on CUDA), or copy the shards locally",
            )
        return "torch"
    return chosen
