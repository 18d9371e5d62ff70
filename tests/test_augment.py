"""Augmented views (issue #25): ``featstore extract --augment rrc-flip --augment-views K`` and
``probe fit --augment``.

The views are checked against torchvision's own ``resized_crop`` + ``hflip`` with the recorded
parameters, on the real photos shipped in tests/data/photos, for each loader that crops them; the
parameters against torchvision's ``RandomResizedCrop.get_params`` algorithm (scale, ratio, the
fallback); their determinism across batch sizes and a resumed run; the cache key; the probe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.augment import Augment, ViewPlan, rrc_params
from featstore.errors import UsageError
from featstore.loaders.decode import decode_rgb
from featstore.preprocess import Preprocess
from tests.conftest import dali_or_skip
from tests.photos import SHIPPED, write_photo_folder

CPU = torch.device("cpu")
PIXELS = """
import torch
def build():
    return torch.nn.Flatten()  # the encoder sees the pixels: the store holds them (normalized)
"""


def _loader(name: str, pre: Preprocess):
    if name == "torch":
        from featstore.loaders.dataloader import TorchLoader

        return TorchLoader(pre, CPU, 0)
    dali_or_skip()
    from featstore.loaders.dali import DaliLoader

    return DaliLoader(pre, CPU, 2)


def _levels(x: torch.Tensor, pre: Preprocess) -> np.ndarray:
    """Normalized (..., 3, S, S) → 0–255 (..., S, S, 3)."""
    x = x.float() * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)
    return (x * 255).movedim(-3, -1).numpy().astype(np.float64)


def _reference(path: str, params, pre: Preprocess) -> np.ndarray:
    """torchvision's functional resized_crop + hflip of the upright decoded photo, 0–255."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    image = decode_rgb(Path(path).read_bytes())
    top, left, height, width, flip = (int(p) for p in params)
    mode = getattr(InterpolationMode, pre.interpolation.upper())
    out = F.resized_crop(image, top, left, height, width, [pre.image_size, pre.image_size], mode, antialias=True)
    if flip:
        out = F.hflip(out)
    return np.asarray(out, dtype=np.float64)


def test_params_follow_torchvisions_random_resized_crop():
    """The drawn windows obey RandomResizedCrop's rules: inside the image, area fraction in scale and
    aspect in ratio (up to rounding), or its fallback; the same (path, view, seed) always the same
    window, another view or seed another; flips about half."""
    aug = Augment(views=200, seed=3)
    params = aug.params("a/b.JPEG", 427, 640)
    assert params.shape == (200, 5) and params.dtype == np.int32
    assert (params == aug.params("a/b.JPEG", 427, 640)).all()
    assert not (params == Augment(views=200, seed=4).params("a/b.JPEG", 427, 640)).all()
    assert not (params == aug.params("a/c.JPEG", 427, 640)).all()
    top, left, h, w, flip = params.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 427).all() and (left + w <= 640).all()
    area = h * w / (427 * 640)
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.75 * 0.95 and aspect.max() <= 4 / 3 * 1.05
    assert 0.35 < flip.mean() < 0.65
    assert len({tuple(p) for p in params.tolist()}) == 200  # distinct views
    # views are per view index, not a sequence: view k is the same whichever K
    assert (Augment(views=5, seed=3).params("a/b.JPEG", 427, 640) == params[:5]).all()


def test_fallback_is_torchvisions_center_crop():
    """An image too thin for any try (1 x 100) falls back to the ratio-clamped center crop, as torchvision's."""
    from torchvision.transforms import RandomResizedCrop

    rng = np.random.default_rng(0)
    ours = rrc_params(rng, 1, 100, (0.08, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(0)
    theirs = RandomResizedCrop.get_params(torch.zeros(1, 1, 100), [0.08, 1.0], [3 / 4, 4 / 3])
    assert ours == tuple(theirs) == (0, 49, 1, 1)


def test_draws_match_torchvisions_get_params_given_the_same_numbers():
    """rrc_params is torchvision's get_params step for step: fed torch's own draws (uniforms and
    integers replayed), it returns torchvision's window for many seeds and sizes."""
    from torchvision.transforms import RandomResizedCrop

    class Replay:  # numpy-Generator-shaped, replaying torch's draws in get_params' order
        def __init__(self, seed):
            self.g = torch.Generator().manual_seed(seed)

        def uniform(self, a, b):
            return float(torch.empty(1).uniform_(a, b, generator=self.g).item())

        def integers(self, lo, hi):
            return int(torch.randint(lo, hi, size=(1,), generator=self.g).item())

    for seed in range(50):
        for height, width in ((427, 640), (600, 512), (224, 224), (30, 400)):
            ours = rrc_params(Replay(seed), height, width, (0.08, 1.0), (3 / 4, 4 / 3))  # type: ignore[arg-type]
            # torchvision draws uniforms through torch.empty(1).uniform_ and log-ratio exp on the default generator
            torch.manual_seed(seed)
            theirs = _torchvision_params(RandomResizedCrop, height, width, seed)
            assert ours == theirs, (seed, height, width)


def _torchvision_params(rrc, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.random.set_rng_state(g.get_state())
    try:
        return tuple(rrc.get_params(torch.zeros(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3]))
    finally:
        torch.random.set_rng_state(state)


@pytest.mark.parametrize("loader_name", ["torch", "dali"])
def test_loader_views_are_torchvisions_resized_crop_and_flip(loader_name):
    """Each view a loader gives is torchvision's resized_crop (+ hflip) of the upright photo with the
    recorded parameters, on the shipped photos at their own sizes: the torch loader exactly (it is
    that call); DALI (fn.slice, two renormalized one-axis resizes, mirror) within 1 gray level at every
    pixel, the outer ring included, for bilinear and bicubic, and nearly always exact (mean < 0.05).
    Without the renormalization the ring was up to ~20 levels off and bicubic's overshoot up to 5."""
    files = [str(p) for p in SHIPPED]
    for interpolation in ("bicubic", "bilinear"):
        pre = Preprocess(96, 110, interpolation)
        plan = ViewPlan(Augment(views=6, seed=1), tuple(Path(f).name for f in files))
        (batch,) = list(_loader(loader_name, pre).batches(files, [np.arange(len(files))], None, augment=plan))
        assert not batch.errors and batch.views is not None and batch.view_params is not None
        assert batch.views.shape == (3, 6, 3, 96, 96) and batch.view_params.shape == (3, 6, 5)
        views = _levels(batch.views, pre)
        for i, path in enumerate(files):
            size = Image.open(path).size
            assert (batch.view_params[i] == plan.augment.params(Path(path).name, size[1], size[0])).all()
            for k in range(6):
                diff = np.abs(views[i, k] - _reference(path, batch.view_params[i, k], pre))
                where = (loader_name, interpolation, Path(path).name, k, batch.view_params[i, k].tolist())
                if loader_name == "torch":
                    assert diff.max() < 0.01, where
                    continue
                assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.05, (where, diff.max(), diff.mean())
        # the center crop is still the center crop
        center = _loader("torch", pre).batches(files, [np.arange(len(files))])
        np.testing.assert_allclose(_levels(batch.images, pre), _levels(next(iter(center)).images, pre), atol=12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_views_on_cuda_are_torchvisions_resized_crop_and_flip():
    """The same views from DALI's GPU pipeline (the mixed decoder, the renormalized resizes on the
    device): on the GPU, next to torchvision's within the GPU decoder's own difference from
    libjpeg-turbo (the center crops' bound, tests/test_loaders.py: < 2.5 gray levels on average)."""
    dali_or_skip()
    from featstore.loaders.dali import DaliLoader

    files = [str(p) for p in SHIPPED]
    pre = Preprocess(96, 110, "bilinear")
    plan = ViewPlan(Augment(views=4, seed=3), tuple(Path(f).name for f in files))
    (batch,) = list(DaliLoader(pre, torch.device("cuda"), 2).batches(files, [np.arange(len(files))], None, augment=plan))
    assert not batch.errors and batch.views is not None and batch.views.device.type == "cuda"
    assert batch.views.shape == (3, 4, 3, 96, 96)
    views = _levels(batch.views.float().cpu(), pre)
    for i, path in enumerate(files):
        for k in range(4):
            diff = np.abs(views[i, k] - _reference(path, batch.view_params[i, k], pre))
            assert diff.mean() < 2.5, (Path(path).name, k, diff.mean())


@pytest.fixture(scope="module")
def photo_splits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aug-photos")
    write_photo_folder(root / "train", classes=3, per_class=5)
    write_photo_folder(root / "val", classes=3, per_class=2)
    return root


def _extract(root: Path, out: Path, **overrides):
    from featstore.extraction import ExtractConfig, extract

    builder = out.parent / "pixels.py"
    builder.write_text(PIXELS)
    config = dict(model=f"{builder}:build", dataset=str(root), out=str(out), loader="torch", workers=0, batch_size=8,
                  image_size=24, resize=24, dtype="float32", augment="rrc-flip", augment_views=3, chunk_rows=4)  # fmt: skip
    config.update(overrides)  # out_url: a store at a URL (the builder still beside ``out``)
    if "out_url" in config:
        config["out"] = config.pop("out_url")
    return extract(ExtractConfig(**config), log=lambda s: None, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("loader_name", ["torch", "dali"])
def test_stored_views_are_the_pixels_the_encoder_saw(photo_splits, tmp_path, loader_name):
    """End to end with a pixel-returning encoder: the stored views of every train row are torchvision's
    resized_crop + hflip of its photo with the stored parameters; val has none; verify passes."""
    if loader_name == "dali":
        dali_or_skip()
    from featstore.store import FeatureStore
    from featstore.store.verify import verify_store

    _extract(photo_splits, tmp_path / "s.zarr", loader=loader_name, interpolation="bilinear")
    fs = FeatureStore.open(tmp_path / "s.zarr", verify=True)
    pre = Preprocess(24, 24, "bilinear")
    views = fs.augmented("train", "features").read()
    params = fs.augmented("train").read()
    assert views.shape == (15, 3, 3 * 24 * 24) and params.shape == (15, 3, 5)
    pixels = _levels(torch.from_numpy(views).view(15, 3, 3, 24, 24), pre)
    for row, path in enumerate(fs.paths("train")):
        for k in range(3):
            diff = np.abs(pixels[row, k] - _reference(str(photo_splits / path), params[row, k], pre))
            if loader_name == "torch":
                assert diff.max() < 0.01, (row, k)
            else:  # as in test_loader_views_are_torchvisions_resized_crop_and_flip
                assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.05, (row, k, diff.max(), diff.mean())
    assert fs.augmented_arrays("val") == []
    with pytest.raises(UsageError, match="no augmented views"):
        fs.augmented("val", "features")
    assert verify_store(fs).ok
    info = fs.info()["augment"]
    assert info["views"] == 3 and info["seed"] == 0 and info["bytes"] == 15 * 3 * 3 * 24 * 24 * 4 + 15 * 3 * 5 * 4


def test_float16_overflow_in_the_views_is_reported(tmp_path):
    """A view whose features overflow float16 (stored Inf) is said as a center crop's is, with the
    --dtype float32 hint; before, only the center crops were checked: "0 invalid", and the Inf views
    turned up at probe fit. The encoder's batch is the center crops, then each row's views."""
    from featstore.extraction import ExtractConfig, extract
    from featstore.store import FeatureStore

    builder = tmp_path / "loud_views.py"
    builder.write_text(
        "import torch\n"
        "class LoudViews(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        out = x.mean(dim=(2, 3)) * 0\n"
        "        out[x.shape[0] // 4:] = 1e6  # 3 views per row: the last three quarters, finite in float32, Inf in float16\n"
        "        return out\n"
        "def build():\n"
        "    return LoudViews()\n"
    )
    write_photo_folder(tmp_path / "photos" / "train", classes=3, per_class=5)  # train only: every batch carries views
    config = dict(model=f"{builder}:build", dataset=str(tmp_path / "photos"), out=str(tmp_path / "s.zarr"), loader="torch", workers=0,
                  batch_size=8, image_size=24, resize=24, augment="rrc-flip", augment_views=3, chunk_rows=4)  # fmt: skip
    result = extract(ExtractConfig(**config), log=lambda s: None, progress=False)
    fs = FeatureStore.open(tmp_path / "s.zarr")
    assert np.isfinite(fs.features("train", "features")).all() and np.isinf(fs.augmented("train", "features").read()).all()
    assert result.nonfinite == 15 and "15 rows with NaN/Inf features" in result.summary() and "--dtype float32" in result.summary()


@pytest.mark.slow  # a moto S3 server
def test_augmented_views_of_a_store_at_a_url(photo_splits, tmp_path):
    """--augment with --out s3://…: the store is planned with its augmented arrays (the URL path did
    not pass them on, so the views had nowhere to go) and holds the views a local store holds."""
    from featstore.store import FeatureStore
    from tests.s3_server import moto_s3

    _extract(photo_splits, tmp_path / "local.zarr")
    local = FeatureStore.open(tmp_path / "local.zarr")
    with moto_s3() as bucket:
        url = f"{bucket}/aug/s.zarr"
        _extract(photo_splits, tmp_path / "unused.zarr", out_url=url)
        remote = FeatureStore.open(url, verify=True)
        assert remote.complete and remote.info()["augment"]["views"] == 3
        assert (remote.augmented("train").read() == local.augmented("train").read()).all()
        np.testing.assert_array_equal(remote.augmented("train", "features").read(), local.augmented("train", "features").read())


@pytest.mark.slow
def test_views_do_not_depend_on_batch_size_or_a_resume(photo_splits, tmp_path):
    """Parameters come from (seed, path, view) alone: another batch size gives the same parameters
    and pixels; a run killed after some units and resumed gives the same arrays as one run."""
    from featstore.store import FeatureStore

    _extract(photo_splits, tmp_path / "a.zarr", batch_size=8)
    _extract(photo_splits, tmp_path / "b.zarr", batch_size=5)
    a, b = FeatureStore.open(tmp_path / "a.zarr"), FeatureStore.open(tmp_path / "b.zarr")
    assert (a.augmented("train").read() == b.augmented("train").read()).all()
    np.testing.assert_allclose(a.augmented("train", "features").read(), b.augmented("train", "features").read(), atol=1e-6)

    # a partial run: the first two units written, the rest pending, then the same command resumes it
    original = FeatureStore.write_unit
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *args, **kwargs)

    FeatureStore.write_unit = dying  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            _extract(photo_splits, tmp_path / "c.zarr")
    finally:
        FeatureStore.write_unit = original  # type: ignore[method-assign]
    partial = FeatureStore.open(tmp_path / "c.zarr")
    assert not partial.complete and partial.pending_units()
    assert _extract(photo_splits, tmp_path / "c.zarr").status == "resumed"
    c = FeatureStore.open(tmp_path / "c.zarr", verify=True)
    for name in (None, "features"):
        assert (c.augmented("train", name).read() == a.augmented("train", name).read()).all()
    assert (c.features("val", "features").read() == a.features("val", "features").read()).all()


def test_cache_key_names_the_augmentation(small_folder):
    """--augment, K and the seed each give another cache key; without --augment the key is as before."""
    from featstore.request import ExtractConfig, request_of

    base = dict(model="resnet18", dataset=str(small_folder), random_init=True)
    requests = [request_of(ExtractConfig(**base, **extra)) for extra in (
        {}, {"augment": "rrc-flip"}, {"augment": "rrc-flip", "augment_views": 5}, {"augment": "rrc-flip", "augment_seed": 1})]  # fmt: skip
    assert len({json.dumps(r, sort_keys=True) for r in requests}) == 4
    assert "augment" not in requests[0]
    records = [Augment().to_dict(), Augment(views=5).to_dict(), Augment(seed=1).to_dict()]
    assert len({json.dumps(r, sort_keys=True) for r in records}) == 3


@pytest.mark.slow
def test_cache_keys_of_stores_differ(photo_splits, tmp_path):
    """The stores' cache keys: without views, with K = 3, K = 2, another seed: four keys."""
    from featstore.store import FeatureStore

    keys = set()
    for name, extra in (("none", {"augment": None, "augment_views": None}), ("k3", {}), ("k2", {"augment_views": 2}),
                        ("seed", {"augment_seed": 5})):  # fmt: skip
        _extract(photo_splits, tmp_path / f"{name}.zarr", **extra)
        keys.add(FeatureStore.open(tmp_path / f"{name}.zarr").meta.cache_key)
        fields = FeatureStore.open(tmp_path / f"{name}.zarr").meta.cache_fields
        assert ("augment" in fields) == (name != "none")
    assert len(keys) == 4


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"augment": None, "augment_views": 3}, "--augment-views is an option of --augment"),
        ({"augment": None, "augment_views": None, "augment_seed": 2}, "--augment-seed is an option of --augment"),
        ({"augment_views": 0}, "--augment-views must be a positive integer"),
        ({"augment": "mixup"}, "unknown --augment"),
        ({"batch_size": 3}, "cannot hold one image and its 3 augmented views"),
        ({"loader": "nvjpeg"}, "--loader nvjpeg cannot crop augmented views"),
    ],
)
def test_refusals(photo_splits, tmp_path, overrides, match):
    with pytest.raises(UsageError, match=match):
        _extract(photo_splits, tmp_path / "x.zarr", **overrides)
    assert not (tmp_path / "x.zarr").exists()


def test_refused_without_a_train_split(real_photos, tmp_path):
    with pytest.raises(UsageError, match="views of the 'train' split") as e:
        _extract(real_photos, tmp_path / "x.zarr")
    assert "--split train=" in e.value.hint
    assert not (tmp_path / "x.zarr").exists()


def test_probe_view_choice_is_seeded_and_uniform():
    from probe.methods.heads import view_choice

    a, b = view_choice(1000, 4, 10, 0), view_choice(1000, 4, 10, 0)
    assert (a == b).all() and a.shape == (4, 1000) and not (a == view_choice(1000, 4, 10, 1)).all()
    counts = np.bincount(a.ravel(), minlength=10)
    assert counts.min() > 300 and math.isclose(counts.mean(), 400)


@pytest.mark.slow
def test_views_are_verified_repaired_exported_and_shown(photo_splits, tmp_path):
    """The augmented arrays are the store's like any other: a changed chunk of them is found by
    verify and re-extracted by --repair (to the same bytes); the HDF5 export carries them (and
    verifies); the .npz export has them; `featstore info` shows K and their size."""
    from click.testing import CliRunner

    from featstore.cli import cli
    from featstore.store import FeatureStore
    from featstore.store.export import export
    from featstore.store.verify import verify_store

    _extract(photo_splits, tmp_path / "s.zarr")
    before = FeatureStore.open(tmp_path / "s.zarr").augmented("train", "features").read()
    chunk = tmp_path / "s.zarr" / "train" / "augment" / "features" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_store(FeatureStore.open(tmp_path / "s.zarr"))
    assert not report.ok and report.problems[0].array == "augment/features" and report.damaged_units == {"train": {1}}
    assert _extract(photo_splits, tmp_path / "s.zarr", repair=True).status == "repaired"
    fs = FeatureStore.open(tmp_path / "s.zarr", verify=True)
    assert verify_store(fs).ok
    np.testing.assert_array_equal(fs.augmented("train", "features").read(), before)

    export(str(tmp_path / "s.zarr"), str(tmp_path / "s.h5"))
    h5 = FeatureStore.open(tmp_path / "s.h5", verify=True)
    assert verify_store(h5).ok
    np.testing.assert_array_equal(h5.augmented("train", "features").read(), before)
    np.testing.assert_array_equal(h5.augmented("train").read(), fs.augmented("train").read())
    export(str(tmp_path / "s.zarr"), str(tmp_path / "s.npz"))
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["train_augment"], before)
        assert z["train_augment_params"].shape == (15, 3, 5) and "val_augment" not in z

    result = CliRunner().invoke(cli, ["info", str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("augment"))
    assert "rrc-flip × 3 views of train (seed 0)" in line and "KB" in line


# ---------------------------------------------------------------- probe fit on stored views


def _synthetic_store(
    path: Path, views: int | None = 4, seed: int = 0, augment_seed: int = 0, spoil: Iterable[tuple[int, int]] = ()
) -> Path:
    """A store of 3 classes (train 120, val 60 rows, D 8): center crops near their class mean, and
    ``views`` noisier views of each train row (None: no views), written as the extraction writes them;
    ``spoil``: (row, view) pairs whose view is NaN (a float16 overflow's)."""
    from featstore.store import FeatureStore
    from featstore.store.augmented import PARAMS_ARRAY, views_array

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(3, 8)) * 1.5
    sizes = {"train": 120, "val": 60}
    labels = {s: np.arange(n) % 3 for s, n in sizes.items()}
    record = Augment(views=views, seed=augment_seed).to_dict() if views else None
    fs = FeatureStore.create(path, splits={s: ([f"{s}/{i}.jpg" for i in range(n)], labels[s]) for s, n in sizes.items()},
                             views={"cls": 8}, dtype="float32", chunk_rows=64, attrs={"dataset": {"name": "synthetic"}},
                             augment=record)  # fmt: skip
    centers = {s: means[labels[s]] + rng.normal(size=(n, 8)) for s, n in sizes.items()}  # the same with or without views
    noise = np.random.default_rng(seed + 1)
    for split in sizes:
        center = centers[split]
        for unit in fs.units(split):
            rows = slice(unit.start, unit.stop)
            extra = None
            if record and split == "train":
                noisy = center[rows, None, :] + noise.normal(size=(unit.rows, views, 8)) * 2.0  # type: ignore[misc]
                for r, k in spoil:
                    if unit.start <= r < unit.stop:
                        noisy[r - unit.start, k] = np.nan
                extra = {views_array("cls"): noisy, PARAMS_ARRAY: np.zeros((unit.rows, views, 5), np.int32)}
            fs.write_unit(unit, {"cls": center[rows]}, np.ones(unit.rows, bool), {}, extra)
    fs.finalize()
    return path


def _fit(stores, out=None, **protocol):
    import probe

    p = probe.Protocol(**{"lr_grid": "1e-2:1:3", "epochs": 4, **protocol})
    return probe.fit_run(stores, p, device="cpu", warn=lambda m: None, out=out)


def test_linear_heads_on_views_equal_heads_on_the_gathered_views():
    """Training on views is training on, per epoch, the chosen view of each row: the same heads
    as training on those rows gathered by hand, one epoch at a time (float64, same minibatches);
    the views of a few rows of a larger split, held in their stored float16."""
    import probe
    from probe.methods import heads as H
    from probe.methods.view_rows import ViewRows

    rng = np.random.default_rng(0)
    split, k, d = 80, 3, 6
    stored = rng.normal(size=(split, k, d)).astype(np.float16)
    rows = np.sort(rng.choice(split, 50, replace=False))
    n = len(rows)
    y = torch.from_numpy(rng.integers(0, 4, n))
    protocol = probe.Protocol(lr_grid="0.01,0.1", epochs=3, batch_size=16, schedule="constant")
    orders = torch.from_numpy(H.epoch_orders(n, 3, 0))
    choice = H.view_choice(split, 3, k, 0)
    views = ViewRows.of(torch.from_numpy(stored), rows)
    assert (views.num_views, views.dim, len(views)) == (k, d, n)
    a = H.LinearHeads(d, 4, [0.01, 0.1], [0.0, 0.0], dtype=torch.float64)
    H.train(lambda e: views.gather(torch.from_numpy(choice[e, rows]), torch.device("cpu")).double(), y, a, protocol, orders)
    b = H.LinearHeads(d, 4, [0.01, 0.1], [0.0, 0.0], dtype=torch.float64)
    one = protocol.replace(epochs=1)
    for epoch in range(3):
        gathered = torch.from_numpy(stored[rows, choice[epoch, rows]].astype(np.float64))
        H.train(gathered, y, b, one, orders[epoch : epoch + 1])
    torch.testing.assert_close(a.w, b.w, rtol=0, atol=0)
    torch.testing.assert_close(a.b, b.b, rtol=0, atol=0)
    # the standardize statistics of every view of the rows, block by block = of them all at once
    everything = torch.from_numpy(stored[rows].reshape(-1, d))
    for got, want in zip(H.standardize_stats(views.blocks(torch.device("cpu"))), H.standardize_stats(everything)):
        torch.testing.assert_close(got, want)
    mean, var = everything.double().mean(0), everything.double().var(0, unbiased=False)
    torch.testing.assert_close(H.standardize_stats(everything)[0].double(), mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(H.standardize_stats(everything)[1].double(), (var + H.BN_EPS).rsqrt(), atol=1e-5, rtol=1e-5)
    # a refit's rows: both roles' rows in split order, one split's views
    other = ViewRows.of(views.views, np.setdiff1d(np.arange(split), rows)[:10])
    joined = views.join(other)
    assert (joined.rows.numpy() == np.sort(np.concatenate([rows, other.rows.numpy()]))).all() and joined.views is views.views


def test_views_are_placed_on_the_device_in_host_memory_or_left_in_the_store(tmp_path):
    """Placement by size: on the device within the budget (--max-memory), else in host memory within
    the host's, else left in the store (on a CPU device the budget is the host's); wherever they are,
    a view with NaN/Inf values reads as its row's center crop and is counted once."""
    from featstore.store import FeatureStore
    from probe.methods.view_rows import StoredViews, ViewRows, place

    spoiled = [(3, 1), (70, 0), (70, 3)]
    fs = FeatureStore.open(_synthetic_store(tmp_path / "v.zarr", spoil=spoiled))
    stored, center = fs.augmented("train", "cls"), fs.features("train", "cls").read()
    nbytes = 120 * 4 * 8 * 4
    whole = stored.read()
    assert np.isnan(whole[3, 1]).all() and np.isfinite(np.delete(whole.reshape(-1, 8), [13, 280, 283], axis=0)).all()
    expected = whole.copy()
    for r, k in spoiled:
        expected[r, k] = center[r]
    meta, cpu = torch.device("meta"), torch.device("cpu")
    on_device, bad = place(stored, center, meta, nbytes)
    assert on_device.device.type == "meta" and bad == 3
    in_host, bad = place(stored, center, meta, nbytes - 1, host=nbytes)
    assert isinstance(in_host, torch.Tensor) and in_host.device.type == "cpu" and bad == 3
    np.testing.assert_array_equal(in_host.numpy(), expected)
    left, bad = place(stored, center, meta, nbytes - 1, host=nbytes - 1)
    assert isinstance(left, StoredViews) and bad == 3
    assert isinstance(place(stored, center, cpu, nbytes)[0], torch.Tensor)  # a CPU device: the budget is the host's
    assert isinstance(place(stored, center, cpu, nbytes - 1, host=10 * nbytes)[0], StoredViews)

    # the same gathers and statistics blocks from memory and from the store
    rows = np.array([0, 3, 5, 70, 71, 119])
    choice = torch.from_numpy(np.array([2, 1, 0, 3, 1, 0]))
    a, b = ViewRows.of(in_host, rows), ViewRows.of(left, rows)
    assert (a.where, b.where) == ("cpu", "store")
    np.testing.assert_array_equal(a.gather(choice, cpu).numpy(), expected[rows, choice.numpy()])
    np.testing.assert_array_equal(b.gather(choice, cpu).numpy(), expected[rows, choice.numpy()])
    for x, y in zip(a.blocks(cpu), b.blocks(cpu), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert b.join(ViewRows.of(left, np.array([4]))).rows.tolist() == [0, 3, 4, 5, 70, 71, 119]

    # an undecodable row (NaN center crop: left out of the probe) has NaN views too: none of them is
    # counted as replaced (the warning said "2 augmented views ... center crops stand in" of a row never used)
    undecodable = center.copy()
    undecodable[70] = np.nan
    for where in ({"budget": nbytes}, {"budget": nbytes - 1, "host": nbytes - 1}):
        assert place(stored, undecodable, meta, **where)[1] == 1


@pytest.mark.slow
def test_views_read_from_the_store_train_the_heads_views_in_memory_train(tmp_path):
    """--max-memory below the views' bytes on a CPU: the views stay in the store, read each epoch;
    every number equal to the run with the views in memory, refit included, spoiled views alike."""
    import probe

    store = str(_synthetic_store(tmp_path / "v.zarr", spoil=[(3, 1), (70, 0)]))
    runs, logs, warnings = {}, {}, {}
    for name, budget in (("memory", None), ("store", 1)):
        logs[name], warnings[name] = [], []
        p = probe.Protocol(lr_grid="1e-2:1:3", epochs=3, methods="linear", normalize="standardize")
        runs[name] = probe.fit_run([store], p, device="cpu", warn=warnings[name].append, log=logs[name].append, max_memory=budget).rows
    assert any("4 augmented views each, held in memory" in m for m in logs["memory"])
    assert any("4 augmented views each, held in the store, read each epoch" in m for m in logs["store"])
    for name in runs:
        assert [w for w in warnings[name] if "NaN/Inf" in w] == [
            f"store {store!r} view 'cls': 2 augmented views have NaN/Inf values; their rows' center crops stand in"
        ]
    keys = ("lr", "refit", "train_loss", "train_top1_pct", "select_top1_pct", "report_top1_pct")
    assert [tuple(r[k] for k in keys) for r in runs["memory"]] == [tuple(r[k] for k in keys) for r in runs["store"]]
    assert any(r["refit"] for r in runs["store"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_in_host_memory_train_the_heads_they_train_on_the_device(tmp_path):
    """--max-memory below the views' bytes keeps them in host memory, each epoch's chosen views
    uploaded: the same numbers as the views held on the GPU (the same gathers, the same kernels)."""
    views = _synthetic_store(tmp_path / "views.zarr")
    p = dict(lr_grid="1e-2:1:3", epochs=4, methods="linear", normalize="standardize")
    logs: dict[str, list[str]] = {"device": [], "host": []}
    runs = {}
    for where, budget in (("device", None), ("host", 1)):
        import probe

        runs[where] = probe.fit_run([str(views)], probe.Protocol(**p), device="cuda", warn=lambda m: None, log=logs[where].append,
                                    max_memory=budget).rows  # fmt: skip
    assert any("views each, held on the device" in m for m in logs["device"])
    assert any("views each, held in host memory" in m for m in logs["host"])
    keys = ("lr", "train_loss", "select_top1_pct", "report_top1_pct", "refit")
    assert [tuple(r[k] for k in keys) for r in runs["device"]] == [tuple(r[k] for k in keys) for r in runs["host"]]


@pytest.mark.slow
def test_probe_on_views_differs_from_the_center_crop_and_is_reproducible(tmp_path):
    """--augment on (the default where a store has views) trains the linear heads on them: other
    numbers and another protocol hash than --augment off, the same numbers twice; off equals a store
    without views; k-NN and logreg rows stay on the center crop; the record names the views and K."""
    import probe

    views = _synthetic_store(tmp_path / "views.zarr")
    plain = _synthetic_store(tmp_path / "plain.zarr", views=None)
    on = _fit([str(views)], methods="linear,knn", out=str(tmp_path / "on"))
    again = _fit([str(views)], methods="linear,knn")
    off = _fit([str(views)], methods="linear,knn", augment="off", out=str(tmp_path / "off"))
    none = _fit([str(plain)], methods="linear,knn")

    def lin(run):
        return [(r["lr"], r["train_loss"], r["select_top1_pct"], r["report_top1_pct"]) for r in run.rows if r["method"] == "linear"]

    assert lin(on) == lin(again)
    assert lin(on) != lin(off)
    assert [r["train_loss"] for r in on.rows if r["method"] == "linear"] != [r["train_loss"] for r in off.rows if r["method"] == "linear"]
    assert lin(off) == lin(none)
    assert {r["protocol_hash"] for r in off.rows} == {r["protocol_hash"] for r in none.rows} != {r["protocol_hash"] for r in on.rows}
    assert {r["augment"] for r in on.rows if r["method"] == "linear"} == {"rrc-flip:4"}
    assert {r["augment"] for r in on.rows if r["method"] == "knn"} == {None}
    knn = lambda rows: [(r["k"], r["report_top1_pct"]) for r in rows.rows if r["method"] == "knn"]  # noqa: E731
    assert knn(on) == knn(off)
    record = json.loads((tmp_path / "on" / "protocol.json").read_text())["protocol"]
    assert record["augment"]["method"] == "rrc-flip" and record["augment"]["views"] == 4
    assert "knn and logreg: the center crop" in record["augment"]["applies"]
    # the record reads back as the same protocol (probe fit --rerun)
    assert probe.Protocol.from_dict(record).hash == on.rows[0]["protocol_hash"]
    # and so does off's, which names no views: as off, not as the default "on" (a rerun trained on the views)
    off_record = json.loads((tmp_path / "off" / "protocol.json").read_text())["protocol"]
    assert "augment" not in off_record
    rerun = probe.Protocol.from_dict(off_record)
    assert rerun.augment == "off" and rerun.hash == off.rows[0]["protocol_hash"]
    assert lin(probe.fit_run([str(views)], rerun, device="cpu", warn=lambda m: None)) == lin(off)


@pytest.mark.parametrize("normalize", ["standardize", "l2"])
def test_refit_on_views_equals_the_head_trained_on_every_train_rows_views(tmp_path, normalize):
    """The refit of the selected lr on train + holdout trains on both roles' views (one split's,
    rows in split order, standardize statistics of all their views): bit for bit the one-lr run
    that trains on every train row's views (``--lr LR --select-on report``)."""
    import probe

    views = _synthetic_store(tmp_path / "views.zarr")
    common = dict(epochs=3, batch_size=32, normalize=normalize, seed=1, methods="linear")
    rows = probe.fit(str(views), probe.Protocol(lr_grid="1e-2,0.1,1", **common), device="cpu", warn=lambda m: None)
    (refit,) = [r for r in rows if r["refit"]]
    assert refit["augment"] == "rrc-flip:4" and refit["n_train"] == 120
    (direct,) = probe.fit(
        str(views), probe.Protocol(lr_grid=[refit["lr"]], select_on="report", **common), device="cpu", warn=lambda m: None
    )
    assert (direct["n_train"], direct["augment"]) == (120, "rrc-flip:4")
    assert direct["train_loss"] == refit["train_loss"] and direct["train_top1_pct"] == refit["train_top1_pct"]
    assert direct["report_top1_pct"] == refit["report_top1_pct"]
    np.testing.assert_array_equal(direct["report_predictions"]["top5"], refit["report_predictions"]["top5"])


@pytest.mark.slow
def test_mixing_stores_with_and_without_views_is_refused(tmp_path):
    views = _synthetic_store(tmp_path / "views.zarr")
    plain = _synthetic_store(tmp_path / "plain.zarr", views=None)
    other_k = _synthetic_store(tmp_path / "k2.zarr", views=2)
    for stores in ([views, plain], [views, other_k]):
        with pytest.raises(UsageError, match="different augmented views") as e:
            _fit([str(s) for s in stores])
        assert "--augment off" in e.value.hint
    rows = _fit([str(views), str(plain)], augment="off").rows  # on center crops: one protocol
    assert {r["augment"] for r in rows} == {None}
    with pytest.raises(UsageError, match="unknown --augment"):
        _fit([str(views)], augment="maybe")


@pytest.mark.slow
def test_probe_cli_augment_option(tmp_path):
    from click.testing import CliRunner

    from probe.cli import main

    views = _synthetic_store(tmp_path / "views.zarr")
    result = CliRunner().invoke(
        main, ["fit", "--store", str(views), "--epochs", "2", "--lr-grid", "0.1", "--out", str(tmp_path / "r"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "linear heads trained on augmented views rrc-flip:4" in result.output
    result = CliRunner().invoke(main, ["fit", "--store", str(views), "--augment", "sometimes"])
    assert result.exit_code != 0 and "sometimes" in result.output


def test_cli_refusal_is_one_line(tmp_path):
    """A bad --augment combination on the command line: `error: …` on one line with the fix, exit 2, no store."""
    from click.testing import CliRunner

    from featstore.cli import cli

    result = CliRunner().invoke(cli, ["extract", "--model", "resnet18", "--random-init", "--dataset", "digits",
                                      "--out", str(tmp_path / "x.zarr"), "--augment-views", "4"])  # fmt: skip
    assert result.exit_code == 2  # a usage mistake
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --augment-views is an option of --augment, which is not given"), result.output
    assert "add --augment rrc-flip" in errors[0]
    assert "Traceback" not in result.output and not (tmp_path / "x.zarr").exists()


def test_auto_loader_picks_one_that_crops_views():
    """--loader auto picks nvJPEG on CUDA, which cannot crop views: with --augment it picks DALI
    (where it imports) or torch instead; a named loader is kept (and refused later if it cannot)."""
    from featstore.job import augmenting_loader
    from featstore.loaders import dali_available

    assert augmenting_loader("auto", "nvjpeg", Augment()) == ("dali" if dali_available() else "torch")
    assert augmenting_loader("auto", "torch", Augment()) == "torch"
    assert augmenting_loader("nvjpeg", "nvjpeg", Augment()) == "nvjpeg"
    assert augmenting_loader("auto", "nvjpeg", None) == "nvjpeg"


@pytest.mark.parametrize("loader_name", ["torch", "dali"])
def test_views_of_a_sideways_photo_are_cut_from_the_upright_image(loader_name, tmp_path):
    """A JPEG stored sideways with an EXIF orientation (6: turn 90° clockwise) gets windows drawn on
    its upright size (height and width swapped from the header's), and its views are those of the
    upright image, as torchvision's on PIL's upright decode (DALI reads the size from the header
    and the tag from the first 64 KiB before decoding)."""
    photo = Image.open(SHIPPED[0]).convert("RGB")  # 640 x 427
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    photo.save(path, format="JPEG", quality=92, exif=exif.tobytes())
    assert decode_rgb(path.read_bytes()).size == (427, 640)  # upright: portrait
    pre = Preprocess(64, 72, "bilinear")
    plan = ViewPlan(Augment(views=4, seed=2), ("sideways.jpg",))
    (batch,) = list(_loader(loader_name, pre).batches([str(path)], [np.arange(1)], None, augment=plan))
    assert not batch.errors and batch.view_params is not None and batch.views is not None
    assert (batch.view_params[0] == plan.augment.params("sideways.jpg", 640, 427)).all()
    views = _levels(batch.views, pre)
    for k in range(4):
        diff = np.abs(views[0, k] - _reference(str(path), batch.view_params[0, k], pre))
        assert diff.mean() < 0.25 and diff[1:-1, 1:-1].max() <= (0.01 if loader_name == "torch" else 1.0 + 1e-3), k


def test_cache_entries_name_the_views():
    """`featstore ls --json` and lookup's list of several matches tell a store with views from one without."""
    from featstore.cache import entry_from_attrs

    base = {"schema_version": 1, "splits": {"train": 10}, "chunk_rows": 8, "complete": True}
    assert entry_from_attrs("a.zarr", base, 0, None, False, 0.0).augment == ""
    entry = entry_from_attrs("b.zarr", {**base, "augment": Augment(views=10, seed=3).to_dict()}, 0, None, False, 0.0)
    assert entry.augment == "rrc-flip x10 (seed 3)" and entry.to_dict()["augment"] == entry.augment
    # and the table: an AUGMENT column (the two rows were identical but for size and path)
    from featstore.cli import format_ls

    header, plain, views = format_ls([entry_from_attrs("a.zarr", base, 0, None, False, 0.0), entry]).splitlines()
    at = header.index("AUGMENT")
    assert plain[at:].split()[0] == "-" and views[at:].startswith("rrc-flip x10 (seed 3)")


@pytest.mark.slow
def test_killed_mid_unit_and_resumed_gives_the_same_views(photo_splits, tmp_path):
    """SIGKILL halfway through writing unit #1 of the train split (a torn unit, no marker), then the
    same command: the store is the one an uninterrupted run writes, views and parameters included."""
    import os
    import subprocess
    import sys

    from featstore.store import FeatureStore

    repo = Path(__file__).resolve().parent.parent
    builder = tmp_path / "pixels.py"
    builder.write_text(PIXELS)
    args = ["extract", "--model", f"{builder}:build", "--dataset", str(photo_splits), "--loader", "torch", "--workers", "0",
            "--batch-size", "8", "--image-size", "24", "--resize", "24", "--dtype", "float32", "--chunk-rows", "4",
            "--augment", "rrc-flip", "--augment-views", "3", "--no-progress"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(repo))

    def run(out: Path, *runner: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, *(runner or ("-m", "featstore.cli")), *args, "--out", str(out)]
        return subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300)

    assert run(tmp_path / "whole.zarr").returncode == 0
    killed = run(tmp_path / "resumed.zarr", "-m", "tests.fault_runner", "kill-in-unit", "1", "--")
    assert killed.returncode == -9, killed.stderr[-1000:]
    assert not FeatureStore.open(tmp_path / "resumed.zarr").complete
    again = run(tmp_path / "resumed.zarr")
    assert again.returncode == 0 and "resumed" in again.stdout, again.stderr[-1000:]
    whole, resumed = FeatureStore.open(tmp_path / "whole.zarr"), FeatureStore.open(tmp_path / "resumed.zarr", verify=True)
    for name in (None, "features"):
        np.testing.assert_array_equal(resumed.augmented("train", name).read(), whole.augmented("train", name).read())
    for split in ("train", "val"):
        np.testing.assert_array_equal(resumed.features(split, "features").read(), whole.features(split, "features").read())


_VIEWS_RSS_CHILD = """
import sys
from pathlib import Path
import numpy as np
import probe
from featstore.augment import Augment
from featstore.store import FeatureStore
from featstore.store.augmented import PARAMS_ARRAY, views_array

def make(path, n, k=10, d=256):
    rng = np.random.default_rng(0)
    sizes = {"train": n, "val": 500}
    labels = {s: np.arange(m) % 10 for s, m in sizes.items()}
    fs = FeatureStore.create(path, splits={s: ([f"{s}/{i}.jpg" for i in range(m)], labels[s]) for s, m in sizes.items()},
                             views={"cls": d}, dtype="float16", attrs={"dataset": {"name": "synthetic"}},
                             augment=Augment(views=k, seed=0).to_dict())
    for split in sizes:
        for unit in fs.units(split):
            c = rng.normal(size=(unit.rows, d)).astype(np.float16)
            extra = None
            if split == "train":
                noisy = (c[:, None] + rng.normal(size=(unit.rows, k, d))).astype(np.float16)
                extra = {views_array("cls"): noisy, PARAMS_ARRAY: np.zeros((unit.rows, k, 5), np.int32)}
            fs.write_unit(unit, {"cls": c}, np.ones(unit.rows, bool), {}, extra)
    fs.finalize()

if sys.argv[1] == "make":
    make(Path(sys.argv[2]), int(sys.argv[3]))
else:
    p = probe.Protocol(lr_grid="0.1", epochs=2, methods="linear", augment=sys.argv[3], normalize="standardize")
    rows = probe.fit_run([sys.argv[2]], p, device="cpu", warn=lambda m: None).rows
    assert any(r.get("refit") for r in rows)  # the refit's train + holdout views too
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024)
"""


@pytest.mark.slow
def test_views_cost_their_stored_bytes_once(tmp_path):
    """The linear heads hold one view per row, not K: a probe on 20,000 train rows × 10 views × 256
    float16 (98 MiB of views) peaks at most 2 × those bytes above the same probe on the center
    crops (standardize statistics and the refit included; the rest is an epoch's gathered inputs and
    the allocator). Measured: +96 to +157 MiB; before the views were gathered per epoch, +528 MiB
    (a copy of the kept rows, and all K views in float32)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    store = tmp_path / "s.zarr"
    n, k, d = 20_000, 10, 256
    subprocess.run([sys.executable, "-c", _VIEWS_RSS_CHILD, "make", str(store), str(n)], check=True, env=env)
    peak = {}
    for augment in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", _VIEWS_RSS_CHILD, "fit", str(store), augment],
                             check=True, env=env, capture_output=True, text=True)  # fmt: skip
        peak[augment] = float(out.stdout.split()[-1])
    views_mib = n * k * d * 2 / 2**20
    print(f"peak RSS {peak} MiB; views {views_mib:.0f} MiB")
    assert peak["on"] - peak["off"] <= 2 * views_mib
