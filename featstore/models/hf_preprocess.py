"""A transformers folder's ``preprocessor_config.json`` as featstore's :class:`Preprocess`.

The image processors of the layouts featstore loads (BitImageProcessor for DINOv2, CLIPImageProcessor,
SiglipImageProcessor, ViTImageProcessor) resize, center-crop, rescale by ``rescale_factor`` and
normalize. featstore's loaders resize the shorter side and crop the center; a processor that resizes
to a fixed height × width (SigLIP, ViT) stretches a non-square image instead: that is recorded as a
note (the two agree on square images). Without the file, the defaults of the layout's own
evaluation apply, and the provenance says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FeatstoreError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
# PIL's resampling numbers (Image.Resampling), as image processors store them
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_CLOSEST = {1: ("bicubic", "LANCZOS"), 4: ("bilinear", "BOX"), 5: ("bilinear", "HAMMING")}


def default_preprocess(model_type: str, image_size: int) -> tuple[Preprocess, str]:
    """Preprocessing when a folder has no preprocessor_config.json: its layout's usual evaluation."""
    if model_type.startswith("clip"):
        # CLIPImageProcessor's defaults: shortest edge = crop, bicubic, CLIP's mean/std
        return Preprocess(image_size, image_size, "bicubic", CLIP_MEAN, CLIP_STD), "CLIPImageProcessor defaults"
    if model_type.startswith("siglip"):
        return Preprocess(image_size, image_size, "bicubic", HALF, HALF), "SiglipImageProcessor defaults"
    # DINO, DINOv2, MAE and I-JEPA linear evaluations: resize 256, crop 224 (scaled to the crop), ImageNet mean/std
    resize = round(image_size * 256 / 224)
    return Preprocess(image_size, resize, "bicubic", IMAGENET_MEAN, IMAGENET_STD), "resize 256 / crop 224 ImageNet evaluation defaults"


def read_preprocessor_config(path: Path) -> tuple[Preprocess, str, list[str]]:
    """(preprocessing, its source, notes) of a ``preprocessor_config.json``."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FeatstoreError(
            f"{path} is not readable JSON ({e})", "repair or delete preprocessor_config.json, or pass --image-size/--resize/--mean/--std"
        ) from e
    if not isinstance(cfg, dict):
        raise FeatstoreError(f"{path} does not hold a JSON object", "repair or delete preprocessor_config.json")
    notes: list[str] = []
    kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "image processor")
    size = cfg.get("size", 224)
    crop = cfg.get("crop_size")
    if isinstance(size, dict) and "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    elif isinstance(size, dict) and "height" in size and "width" in size:
        resize = int(size["height"])
        notes.append(
            f"{kind} resizes to {size['height']}x{size['width']} (stretching non-square images); featstore resizes the shorter "
            f"side to {resize} and center-crops (the same on square images)"
        )
    elif isinstance(size, int | float):
        resize = int(size)
    else:
        raise FeatstoreError(f"{path}: size {size!r} is not understood", "pass --resize and --image-size to set the preprocessing")
    if not cfg.get("do_resize", True):
        notes.append(f"{kind} does not resize; featstore resizes the shorter side to {resize}")
    image_size = resize
    if cfg.get("do_center_crop", crop is not None) and crop is not None:
        image_size = int(crop["height"]) if isinstance(crop, dict) else int(crop)
        if isinstance(crop, dict) and int(crop.get("width", image_size)) != image_size:
            notes.append(f"{kind} crops {crop['height']}x{crop['width']}; featstore crops squares of {image_size}")
    resample = int(cfg.get("resample", 3))
    if resample in _RESAMPLE:
        interpolation = _RESAMPLE[resample]
    else:
        interpolation, pil = _CLOSEST.get(resample, ("bicubic", f"resample {resample}"))
        notes.append(f"{kind} resamples with {pil}; featstore uses {interpolation}")
    mean, std = tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD))
    if not cfg.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # featstore's pixels are x/255; the model sees (x * rescale - mean) / std = (x/255 - mean') / std'
    rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    scale = 255.0 * rescale
    if abs(scale - 1.0) > 1e-6:
        mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)
        notes.append(f"{kind} rescales by {rescale:g}: mean and std expressed for [0, 1] pixels")
    pre = Preprocess(image_size, max(resize, image_size), interpolation, mean, std)
    return pre, f"preprocessor_config.json ({kind})", notes
