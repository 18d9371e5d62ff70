"""The one preprocessing config that both loaders (DALI and torch) implement identically."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UsageError
from .orientation import ORIENTATION

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# The output size and crop placement every loader follows: torchvision's Resize(int) and CenterCrop
# (resized_size, center_crop_offset). DALI's resize_shorter rounded the long side instead and its
# centered crop rounded offsets half up, so DALI stores made before it followed this rule hold other
# pixels (up to ~6 gray levels per image); the cache key of a DALI store names the rule (job.cache_fields).
SIZE_RULE = "torchvision-int-long-side"


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """(height, width) after torchvision's ``Resize(resize)``: the shorter side becomes ``resize``, the
    longer ``int(resize * long / short)``, truncated (640 x 427 at 256 → 383 x 256, not 384)."""
    if width <= height:
        return int(resize * height / width), resize
    return resize, int(resize * width / height)


def center_crop_offset(length: int, crop: int) -> int:
    """Where torchvision's ``CenterCrop`` starts along a side: ``round((length - crop) / 2)``, Python's
    round, so a half offset goes to the even neighbour (1.5 → 2, 80.5 → 80)."""
    return round((length - crop) / 2.0)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, center-crop ``image_size``, scale to [0,1], normalize.

    ``resize == image_size`` means: resize the shorter side and crop the center square, with no
    extra margin, which is what small-image models (CIFAR ResNets, digits) want.
    """

    image_size: int = 224
    resize: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.image_size < 1 or self.resize < 1:
            raise UsageError(
                f"image size {self.image_size} and resize {self.resize} must be positive",
                "pass --image-size and --resize as positive integers",
            )
        if self.resize < self.image_size:
            raise UsageError(
                f"--resize {self.resize} is smaller than --image-size {self.image_size}",
                "the center crop must fit inside the resized image; use --resize >= --image-size",
            )
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"unknown interpolation {self.interpolation!r}",
                f"use one of {', '.join(INTERPOLATIONS)}",
            )
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise UsageError(f"--{name} needs 3 values (R,G,B), got {len(value)}", f"e.g. --{name} 0.5,0.5,0.5")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise UsageError("--std values must be positive", "e.g. --std 0.229,0.224,0.225")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["orientation"] = ORIENTATION  # every loader turns images upright by their EXIF orientation first
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            image_size=int(d["image_size"]),
            resize=int(d["resize"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )

    def with_overrides(self, **overrides) -> Preprocess:
        """A copy with every non-None override applied (the CLI flags)."""
        values = self.to_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("image_size") is not None and overrides.get("resize") is None:
            # keep the preset's resize/crop ratio when only the crop size is changed
            values["resize"] = max(values["image_size"], round(self.resize * values["image_size"] / self.image_size))
        return Preprocess.from_dict(values)
