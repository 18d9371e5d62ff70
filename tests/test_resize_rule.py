"""Every loader resizes and crops as the reference eval transform does: torchvision's classic
``Resize(resize)`` (shorter side to ``resize``, longer side ``int(resize * long / short)``, truncated)
then ``CenterCrop(crop)`` (offset ``round((side - crop) / 2)``, a half to the even neighbour).

Checked on the photos shipped in tests/data/photos at their own sizes (640 x 427 and 512 x 600, whose
long sides come out fractional: 383.7 px at 256), not on 224 x 224 crops (which never show it).

Bounds, in 0–255 gray levels (normalization undone), per photo: the mean under 1.0; the 99.9th
percentile at most 2; the maximum at most 1 for bilinear and 12 for bicubic. Measured after the fix
(benchmarks/RESULTS.md, "resize-rounding"): DALI and the nvJPEG code on CPU are 0.14–0.18 levels from
the reference on average, 99.9th percentile 1–2, max 1 (bilinear) and 3–8 (bicubic). The difference
left is PIL's resampler: it rounds and clips its horizontal pass to 8 bits before the vertical one,
the others keep it in float; bicubic's negative lobes overshoot at saturated edges and only PIL clips
the overshoot, so isolated edge pixels differ by several levels (bilinear, without lobes, never more
than 1). A long side off by one pixel or a crop off by one (before the fix: DALI rounded 383.7 up to
384 and a half offset up) is 3–8 levels on average, a 99.9th percentile of 60–120 and a max of ~100.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.loaders.dali import _crop_anchor, _crop_pos, _resized_size
from featstore.preprocess import Preprocess, center_crop_offset, resized_size
from tests.conftest import dali_or_skip
from tests.photos import SHIPPED

CPU = torch.device("cpu")
# (crop, resize, interpolation): the default (383.7 → 383); a half crop offset (383 - 226 = 157 → 78);
# 299/342 (512.6 and 400.8 px long sides, half offsets 106.5 → 106 and 50.5 → 50); resize == crop;
# crop_pct 0.95 (352.2 px); bilinear
SETTINGS = [
    (224, 256, "bicubic"),
    (226, 256, "bicubic"),
    (299, 342, "bicubic"),
    (224, 224, "bicubic"),
    (224, 235, "bicubic"),
    (224, 256, "bilinear"),
]


def _loader(name: str, pre: Preprocess):
    if name == "torch":
        from featstore.loaders.dataloader import TorchLoader

        return TorchLoader(pre, CPU, 0)
    if name == "dali":
        dali_or_skip()
        from featstore.loaders.dali import DaliLoader

        return DaliLoader(pre, CPU, 2)
    from featstore.loaders.nvjpeg import NvjpegLoader

    return NvjpegLoader(pre, CPU, 2)


def _levels(loader_name: str, files: list[str], pre: Preprocess) -> np.ndarray:
    """The loader's images of ``files``, (N, H, W, 3) in 0–255 (its normalization undone)."""
    (batch,) = list(_loader(loader_name, pre).batches(files, [np.arange(len(files))]))
    assert not batch.errors, batch.errors
    assert batch.images.shape == (len(files), 3, pre.image_size, pre.image_size)
    x = batch.images.float() * torch.tensor(pre.std).view(1, 3, 1, 1) + torch.tensor(pre.mean).view(1, 3, 1, 1)
    return (x * 255).permute(0, 2, 3, 1).numpy().astype(np.float64)


def _eval_transform(path: str | Path, pre: Preprocess) -> np.ndarray:
    """torchvision's classic eval transform (what timm's and the authors' evaluation apply), 0–255."""
    from torchvision import transforms

    mode = getattr(transforms.InterpolationMode, pre.interpolation.upper())
    t = transforms.Compose([transforms.Resize(pre.resize, interpolation=mode, antialias=True), transforms.CenterCrop(pre.image_size)])
    return np.asarray(t(Image.open(path).convert("RGB")), dtype=np.float64)


def test_shipped_photos_have_fractional_long_sides():
    """The photos this file relies on still have the geometry that shows a wrong rounding."""
    sizes = {p.name: Image.open(p).size for p in SHIPPED}
    assert sizes["china.jpg"] == sizes["flower.jpg"] == (640, 427) and sizes["grace_hopper.jpg"] == (512, 600)
    assert 256 * 640 / 427 % 1 > 0.5  # 383.7: rounding and truncating disagree


@pytest.mark.parametrize("loader_name", ["torch", "dali", "nvjpeg"])
def test_loaders_match_torchvision_eval_transform_on_downscaled_photos(loader_name):
    files = [str(p) for p in SHIPPED]
    for crop, resize, interpolation in SETTINGS:
        pre = Preprocess(crop, resize, interpolation)
        images = _levels(loader_name, files, pre)
        for path, image in zip(files, images):
            diff = np.abs(image - _eval_transform(path, pre))
            where = f"{loader_name} {Path(path).name} crop {crop} resize {resize} {interpolation}"
            if loader_name == "torch":  # the reference itself (PIL); only float normalization differs
                assert diff.max() < 0.01, where
                continue
            assert diff.mean() < 1.0, (where, diff.mean())
            assert np.quantile(diff, 0.999) <= 2.0 + 1e-3, (where, np.quantile(diff, 0.999))
            assert diff.max() <= (12.0 if interpolation == "bicubic" else 1.0) + 1e-3, (where, diff.max())


@pytest.mark.parametrize("loader_name", ["torch", "dali", "nvjpeg"])
def test_center_crop_offsets_are_torchvisions(loader_name, tmp_path):
    """Images already at their resized size (nothing is resampled) whose red channel is the column and
    green the row: the crop's first pixel says where each loader placed the crop. 257 - 224 = 33 → 16
    (16.5 to the even 16; rounding half up gave 17), 261 → 18, 259 → 18 (17.5 → 18)."""
    pre = Preprocess(224, 256, "bilinear")
    files, expected = [], []
    for h, w in [(256, 257), (256, 258), (256, 259), (256, 261), (257, 256), (261, 256), (259, 256), (256, 256)]:
        rows, cols = np.mgrid[0:h, 0:w]
        pixels = np.stack([cols % 256, rows % 256, np.zeros_like(rows)], axis=-1).astype(np.uint8)
        path = tmp_path / f"{h}x{w}.png"
        Image.fromarray(pixels).save(path)
        files.append(str(path))
        expected.append((center_crop_offset(h, 224), center_crop_offset(w, 224)))
        assert resized_size(h, w, 256) == (h, w)  # the resize leaves it as it is
    images = _levels(loader_name, files, pre)
    for path, image, (top, left) in zip(files, images, expected):
        reference = _eval_transform(path, pre)
        assert (reference[0, 0, 0], reference[0, 0, 1]) == (left, top)  # torchvision's own crop
        np.testing.assert_allclose(image[0, 0, :2], [left, top], atol=0.01, err_msg=f"{loader_name} {Path(path).name}")
        np.testing.assert_allclose(image, reference, atol=0.01, err_msg=f"{loader_name} {Path(path).name}")


def test_output_size_rule_is_torchvisions_and_dalis_arithmetic_equals_it():
    """``resized_size`` against torchvision's own computation, and the integer arithmetic DALI's graph
    runs (``_resized_size``, ``_crop_anchor``) against ``resized_size`` / ``center_crop_offset``."""
    from torchvision.transforms.functional import _compute_resized_output_size

    for resize in (224, 232, 235, 256, 342, 384, 518):
        for short in range(1, 700, 7):
            for long in (*range(short, short + 40), 2 * short + 1, 3 * short - 1, 4000):
                for h, w in ((short, long), (long, short)):
                    size = resized_size(h, w, resize)
                    assert list(size) == _compute_resized_output_size((h, w), [resize]), (h, w, resize)
                    assert _resized_size(h, w, resize, max) == size, (h, w, resize)
    assert resized_size(427, 640, 256) == (256, 383)  # not DALI's resize_shorter's 384
    for crop in (1, 2, 3, 4, 224, 299):
        for length in range(crop, crop + 300):
            assert _crop_anchor(length, crop) == center_crop_offset(length, crop) == int(round((length - crop) / 2.0))


def test_dali_crop_position_lands_on_the_anchor():
    """DALI turns crop_pos into an anchor as round(float32(pos) * margin), half away from zero (the
    crop-offset test above shows it on real DALI for small margins); for every margin up to 16384 the
    float32 position ``_crop_pos`` gives rounds back to the integer anchor."""
    margins = np.arange(0, 16385)
    for crop in (224, 225):
        lengths = margins + crop
        anchors = np.array([_crop_anchor(int(n), crop) for n in lengths])
        pos = np.float32(anchors) / np.maximum(margins, 1).astype(np.float32)  # DALI's true division: float32
        product = (pos * margins.astype(np.float32)).astype(np.float32)
        np.testing.assert_array_equal(np.floor(product + np.float32(0.5)).astype(np.int64), anchors)
        assert np.array_equal(np.rint(_crop_pos(lengths, crop, np.maximum) * np.maximum(margins, 1)), anchors)


def test_dali_stores_name_the_size_rule_in_their_cache_key():
    """DALI stores made with the old rounding are not reused: a DALI key names the rule (and a store's
    cache_fields are its provenance); the torch and nvJPEG keys, whose output did not change, stay."""
    from featstore.job import cache_fields, cache_key
    from featstore.manifest import Manifest, SplitManifest
    from featstore.models.encoders import resolve_encoder
    from featstore.preprocess import SIZE_RULE
    from featstore.request import environment_stamp

    manifest = Manifest("m", Path("/m"), ("a",), {"all": SplitManifest("all", ("a/1.jpg",), np.zeros(1, np.int32))})
    spec = resolve_encoder("resnet18", random_init=True)
    dali = cache_fields(spec, "dali", None, "float16", manifest, CPU)
    assert dali["size_rule"] == SIZE_RULE
    old = {k: v for k, v in dali.items() if k != "size_rule"}  # what a DALI store recorded before
    assert cache_key(old) != cache_key(dali)
    for name in ("torch", "nvjpeg"):
        assert "size_rule" not in cache_fields(spec, name, None, "float16", manifest, CPU)
    # the torch-free "up to date" memo is keyed on the environment: one from before the rule is not trusted
    assert environment_stamp()["size_rule"] == SIZE_RULE


@pytest.mark.slow
def test_an_old_dali_store_is_not_reused(small_folder, tmp_path):
    """A store DALI made with the old rounding (its cache fields without ``size_rule``) is neither
    resumed nor reported up to date: with --out it is refused, naming the rule; from the cache, a new
    store is extracted beside it."""
    dali_or_skip()
    from featstore.errors import UsageError
    from featstore.extraction import ExtractConfig, cache_key, extract
    from featstore.store import FeatureStore

    def make_old(path: Path) -> str:
        store = FeatureStore.open(path, mode="r+")
        fields = {k: v for k, v in store.attrs["cache_fields"].items() if k != "size_rule"}
        store.update_attrs({"cache_fields": fields, "cache_key": cache_key(fields)})
        return cache_key(fields)

    common = dict(model="resnet18", dataset=str(small_folder), random_init=True, loader="dali", device="cpu", image_size=32, resize=36)
    out = tmp_path / "old.zarr"
    extract(ExtractConfig(out=str(out), **common), progress=False)
    make_old(out)
    with pytest.raises(UsageError, match="size_rule"):
        extract(ExtractConfig(out=str(out), **common), progress=False)

    cached = Path(extract(ExtractConfig(**common), progress=False).store)
    new_key = FeatureStore.open(cached).attrs["cache_key"]
    old_key = make_old(cached)
    cached.rename(cached.with_name(cached.name.replace(new_key[:12], old_key[:12])))  # where an old run left it
    again = extract(ExtractConfig(**common), progress=False)
    assert again.status != "up to date" and Path(again.store) == cached
    assert FeatureStore.open(cached).attrs["cache_key"] == new_key
