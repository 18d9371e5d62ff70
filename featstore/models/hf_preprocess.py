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
    if model_type.startswith("dinov2"):
        # DINOv2's config says 518 (its pretraining's last stage); its evaluations run at 224
        # (make_classification_eval_transform), as the dinov2 presets and the hub's processors do
        image_size = 224
    # DINO, DINOv2, MAE and I-JEPA linear evaluations: resize 256, crop 224 (scaled to the crop), ImageNet mean/std
    resize = round(image_size * 256 / 224)
    pre = Preprocess(image_size, resize, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    return pre, f"resize {resize} / crop {image_size} bicubic, ImageNet mean/std: the linear-evaluation defaults"


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

    def stretched(height: object, width: object) -> str:
        return (f"{kind} resizes to {height}x{width} (stretching non-square images); featstore resizes the shorter "
                f"side to {resize} and center-crops (the same on square images)")  # fmt: skip

    try:
        if isinstance(size, dict) and "shortest_edge" in size:
            resize = int(size["shortest_edge"])
        elif isinstance(size, dict) and "height" in size and "width" in size:
            resize = int(size["height"])
            notes.append(stretched(size["height"], size["width"]))
        elif isinstance(size, int | float) and not isinstance(size, bool):
            resize = int(size)
            if not any(name in kind for name in ("CLIP", "Bit")):
                # an integer size is a square to ViT's processors (transformers' default_to_square), a shorter side to CLIP's and Bit's
                notes.append(stretched(resize, resize))
        else:
            raise ValueError
        crop_size = None if crop is None else int(crop["height"]) if isinstance(crop, dict) else int(crop)
    except (ValueError, TypeError, KeyError):
        raise FeatstoreError(
            f"{path}: size {size!r} / crop_size {crop!r} is not understood", "pass --resize and --image-size to set the preprocessing"
        ) from None
    if not cfg.get("do_resize", True):
        notes.append(f"{kind} does not resize; featstore resizes the shorter side to {resize}")
    image_size = resize
    if cfg.get("do_center_crop", crop is not None) and crop_size is not None:
        image_size = crop_size
        if isinstance(crop, dict) and str(crop.get("width", image_size)) != str(image_size):
            notes.append(f"{kind} crops {crop['height']}x{crop['width']}; featstore crops squares of {image_size}")
    resample = int(cfg.get("resample", 3))
    if resample in _RESAMPLE:
        interpolation = _RESAMPLE[resample]
    else:
        interpolation, pil = _CLOSEST.get(resample, ("bicubic", f"resample {resample}"))
        notes.append(f"{kind} resamples with {pil}; featstore uses {interpolation}")
    mean, std = _channels(cfg, "image_mean", IMAGENET_MEAN, path), _channels(cfg, "image_std", IMAGENET_STD, path)
    if not cfg.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # featstore's pixels are x/255; the model sees (x * rescale - mean) / std = (x/255 - mean') / std'
    rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    scale = 255.0 * rescale
    if abs(scale - 1.0) > 1e-6:
        mean, std = (mean[0] / scale, mean[1] / scale, mean[2] / scale), (std[0] / scale, std[1] / scale, std[2] / scale)
        notes.append(f"{kind} rescales by {rescale:g}: mean and std expressed for [0, 1] pixels")
    pre = Preprocess(image_size, max(resize, image_size), interpolation, mean, std)
    return pre, f"preprocessor_config.json ({kind})", notes


def _channels(cfg: dict, key: str, default: tuple[float, float, float], path: Path) -> tuple[float, float, float]:
    """``image_mean`` / ``image_std`` as 3 floats: one number is every channel's (transformers reads it so)."""
    value = cfg.get(key, default)
    try:
        values = (float(value),) * 3 if isinstance(value, int | float) and not isinstance(value, bool) else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise FeatstoreError(f"{path}: {key} {value!r} is not 3 numbers (R, G, B)", f"repair preprocessor_config.json, or pass --{key[6:]}")
    return values[0], values[1], values[2]
