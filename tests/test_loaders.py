"""The DALI CPU-only pipeline against the torch (PIL + torchvision) reference loader.

Tolerance: both loaders decode to 8-bit RGB, resize the shorter side with antialiasing and
center-crop; their resamplers differ in kernel details and rounding, so outputs differ by about one
gray level. Measured here at 224 px: mean |difference| 0.1–0.4 levels on photographs, up to 1.7 on
16-bit and CMYK sources, 99th percentile 1–4 levels. We require a mean under 2.5 and a 99th
percentile under 6 levels (out of 255) per image: loose enough for resampler rounding, far below
what a wrong crop, channel order, range or normalization would give (tens of levels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.errors import UsageError
from featstore.loaders import Batch, choose_loader, dali_available
from featstore.loaders.dataloader import TorchLoader
from featstore.preprocess import Preprocess
from tests.conftest import centered_cosine, dali_or_skip
from tests.image_kinds import write_bad_files, write_cmyk_jpeg, write_good_images, write_png16

CPU = torch.device("cpu")
PRE = Preprocess(224, 256, "bicubic")


def _load(loader, files, plan=None) -> list[Batch]:
    plan = plan or [np.arange(len(files))]
    return list(loader.batches(files, plan))


def _levels(a: torch.Tensor, b: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """|a - b| in 0–255 gray levels (undoing the normalization's division by std)."""
    return (a - b).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    files = [str(p) for p in write_good_images(d, 12)]
    files.append(str(write_png16(d / "sixteen_bit.png")))
    files.append(str(write_cmyk_jpeg(d / "cmyk.jpg")))
    return files


def _compare(files):
    from featstore.loaders.dali import DaliLoader

    (t,) = _load(TorchLoader(PRE, CPU, 0), files)
    (d,) = _load(DaliLoader(PRE, CPU, 2), files)
    assert not t.errors and not d.errors
    np.testing.assert_array_equal(t.rows, d.rows)
    assert t.images.shape == d.images.shape == (len(files), 3, 224, 224)
    assert d.images.is_contiguous(memory_format=torch.channels_last)
    levels = _levels(t.images, d.images, PRE)
    per_image_mean = levels.mean(dim=(1, 2, 3))
    per_image_p99 = torch.stack([torch.quantile(x.flatten()[::5], 0.99) for x in levels])
    assert per_image_mean.max() < 2.5, per_image_mean
    assert per_image_p99.max() < 6.0, per_image_p99
    return t.images, d.images


def _features_agree(a: torch.Tensor, b: torch.Tensor):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    model.fc = torch.nn.Identity()
    with torch.inference_mode():
        fa, fb = model(a).numpy(), model(b).numpy()
    same = centered_cosine(fa, fb)
    assert np.median(same) >= 0.99, same
    # the check can fail: different images are far apart after centering
    other = centered_cosine(fa, np.roll(fb, 1, axis=0))
    assert np.median(other) < 0.9


def test_dali_matches_torch_on_real_photos(real_photos):
    dali_or_skip()
    files = sorted(str(p) for p in real_photos.rglob("*.JPEG"))
    a, b = _compare(files)
    _features_agree(a, b)


def test_dali_matches_torch_on_odd_modes_and_sizes(odd_images):
    dali_or_skip()
    a, b = _compare(odd_images)
    _features_agree(a, b)


def test_torch_loader_is_exact_against_pil(odd_images):
    """The reference loader equals a hand-written PIL resize + crop (torchvision semantics)."""
    from PIL import Image

    from featstore.loaders.decode import open_rgb

    (batch,) = _load(TorchLoader(PRE, CPU, 0), odd_images[:3])
    for i, path in enumerate(odd_images[:3]):
        img = open_rgb(path)
        w, h = img.size
        size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        img = img.resize(size, Image.BICUBIC)
        left, top = int(round((img.width - 224) / 2.0)), int(round((img.height - 224) / 2.0))
        arr = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
        expected = (arr - np.array(PRE.mean, np.float32)) / np.array(PRE.std, np.float32)
        np.testing.assert_allclose(batch.images[i].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    """PIL's own I;16 → RGB clips at 255; we scale, so a mid-gray 16-bit image stays mid-gray."""
    from featstore.loaders.decode import open_rgb

    path = write_png16(tmp_path / "p16.png")
    rgb = np.asarray(open_rgb(str(path)))
    assert 60 < rgb.mean() < 200 and rgb.max() < 255


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_plan_is_followed_exactly_and_bad_files_become_placeholders(backend, odd_images, tmp_path):
    if backend == "dali":
        dali_or_skip()
        from featstore.loaders.dali import DaliLoader

        loader = DaliLoader(PRE, CPU, 2)
    else:
        loader = TorchLoader(PRE, CPU, 0)
    bad = write_bad_files(tmp_path / "bad")
    files = odd_images[:6] + [str(tmp_path / "bad" / name) for name in bad]
    plan = [np.array([0, 1, 2]), np.array([3, 6, 7]), np.array([8, 9]), np.array([4, 5])]
    batches = _load(loader, files, plan)
    assert [b.rows.tolist() for b in batches] == [p.tolist() for p in plan]
    errors = {r: reason for b in batches for r, reason in b.errors.items()}
    assert sorted(errors) == [6, 7, 8, 9]  # exactly the bad files, whatever batch they are in
    assert all(reason for reason in errors.values())
    (reference,) = _load(TorchLoader(PRE, CPU, 0), odd_images[:6])
    good = {int(r): b.images[i] for b in batches for i, r in enumerate(b.rows) if int(r) not in errors}
    for r in range(6):
        assert _levels(good[r][None], reference.images[r][None], PRE).mean() < 2.5


def test_nvjpeg_loader_matches_reference_on_cpu(odd_images, real_photos, tmp_path):
    """The torchvision.io loader (nvJPEG on CUDA) runs its tensor preprocessing on CPU here."""
    from featstore.loaders.nvjpeg import NvjpegLoader

    bad = write_bad_files(tmp_path / "bad")
    photos = sorted(str(p) for p in real_photos.rglob("*.JPEG"))[:8]
    files = photos + odd_images + [str(tmp_path / "bad" / n) for n in bad]
    plan = [np.arange(0, 8), np.arange(8, len(files))]
    batches = _load(NvjpegLoader(PRE, CPU, 2), files, plan)
    (reference,) = _load(TorchLoader(PRE, CPU, 0), files[: len(files) - len(bad)])
    errors = {r: m for b in batches for r, m in b.errors.items()}
    assert sorted(errors) == list(range(len(files) - len(bad), len(files)))
    images = torch.cat([b.images for b in batches])[: len(files) - len(bad)]
    levels = _levels(images, reference.images, PRE)
    assert levels.mean(dim=(1, 2, 3)).max() < 2.5
    _features_agree(images, reference.images)


def test_nvjpeg_crops_grouped_by_size_equal_image_by_image():
    """CUDA resizes a batch one call per image size; the result must not depend on the grouping."""
    from featstore.loaders.nvjpeg import NvjpegLoader

    g = torch.Generator().manual_seed(0)
    sizes = [(300, 200), (224, 224), (300, 200), (224, 224), (375, 500), (300, 200)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    loader = NvjpegLoader(PRE, CPU, 1)
    for batch in (images, images[:2] + [None] + images[2:], [images[0], images[2], images[5]]):
        grouped, single = loader.crops(batch, by_size=True), loader.crops(batch, by_size=False)
        assert grouped.shape == (len(batch), 3, 224, 224) and grouped.dtype == torch.uint8
        assert torch.equal(grouped, single)
        for k, image in enumerate(batch):
            want = loader.resize_crop(image[None])[0] if image is not None else torch.zeros(3, 224, 224, dtype=torch.uint8)
            assert torch.equal(grouped[k], want)


def _forge_jpeg_size(path, width: int, height: int) -> None:
    """A real small JPEG whose frame header claims width × height."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


def test_container_header_size_matches_pil(odd_images, real_photos, tmp_path):
    import io

    from PIL import Image

    from featstore.loaders.containers import check_container

    files = sorted(real_photos.rglob("*.JPEG"))[:10] + [p for p in map(Path, odd_images) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    for kind, kw in [("L", {}), ("RGB", {"progressive": True}), ("RGB", {"exif": b"Exif\x00\x00" + bytes(3000)})]:
        buf = io.BytesIO()
        Image.new(kind, (123, 45)).save(buf, format="JPEG", **kw)
        (tmp_path / f"{kind}{len(kw)}.jpg").write_bytes(buf.getvalue())
        files.append(tmp_path / f"{kind}{len(kw)}.jpg")
    assert len(files) >= 14
    for f in files:
        with Image.open(f) as img:
            assert check_container(f.read_bytes()).size == img.size, f
    assert check_container(b"\x89PNG\r\n\x1a\n").size is None and check_container(b"\xff\xd8\xff\xe0\x00").size is None


def test_jpeg_bomb_header_is_refused_before_decoding(tmp_path):
    """A header claiming 60000² pixels would make a GPU decoder allocate ~10 GB: refused as PIL refuses it."""
    from featstore.loaders.nvjpeg import NvjpegLoader

    good = tmp_path / "good.jpg"
    _forge_jpeg_size(good, 16, 16)
    bomb = tmp_path / "bomb.jpg"
    _forge_jpeg_size(bomb, 60000, 60000)
    files = [str(good), str(bomb)]
    loaders = [NvjpegLoader(PRE, CPU, 1), TorchLoader(PRE, CPU, 0)]
    if dali_available():
        from featstore.loaders.dali import DaliLoader

        loaders.append(DaliLoader(PRE, CPU, 1))
    for loader in loaders:
        (batch,) = _load(loader, files)
        assert list(batch.errors) == [1] and "DecompressionBomb" in batch.errors[1], (loader.name, batch.errors)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["nvjpeg", "dali"])
def test_gpu_loaders_match_reference_with_work_in_flight(backend, odd_images, real_photos, tmp_path):
    """Decode on the GPU while earlier batches are still being read by queued kernels (as in extract).

    nvJPEG's hardware engine does not wait for the stream it is given (pytorch/vision#9606): a decode
    handed memory that queued kernels still read overwrites it. Each batch's checksum is queued behind
    a GPU stall, the batch is dropped, and the next batch is decoded; every checksum must still match.
    """
    from featstore.loaders import make_loader

    if backend == "dali":
        dali_or_skip()
    bad = write_bad_files(tmp_path / "bad")
    photos = [str(p) for p in sorted(real_photos.rglob("*.JPEG"))[:24]]
    files = photos + odd_images + [str(tmp_path / "bad" / n) for n in bad]
    plan = [np.arange(s, min(s + 4, len(files))) for s in range(0, len(files), 4)]
    # 112 px crops: a batch of 4 (600 KB as float32) lives in the caching allocator's small-block
    # pool, where the decoder's outputs (one photo: 150 KB) are carved from, so a freed batch's
    # memory is what a racing decode would be handed
    pre = Preprocess(112, 128, "bicubic")
    gpu = torch.device("cuda")
    want_bad = list(range(len(files) - len(bad), len(files)))
    (reference,) = _load(TorchLoader(pre, CPU, 0), files)
    copies, checksums, errors = [], [], {}
    for batch in make_loader(backend, pre, gpu, 2).batches(files, plan):
        assert batch.images.device.type == "cuda" and batch.images.is_contiguous(memory_format=torch.channels_last)
        copies.append(batch.images.float().cpu())
        torch.cuda._sleep(50_000_000)  # keep the stream busy, so the checksum below is still queued...
        checksums.append(batch.images.double().sum())
        errors.update(batch.errors)
        del batch  # ...when its input is freed and the next batch is decoded
    torch.cuda.synchronize()
    for copy, checksum in zip(copies, checksums):
        assert abs(checksum.item() - copy.double().sum().item()) <= 1e-3 * copy.abs().sum().item() + 1.0
    assert sorted(errors) == want_bad
    images = torch.cat(copies)
    ok = [r for r in range(len(files)) if r not in errors]
    levels = _levels(images[ok], reference.images[ok], pre)
    assert levels.mean(dim=(1, 2, 3)).max() < 2.5


def test_auto_loader_follows_the_device():
    """auto: nvjpeg for a CUDA device (decided by the device asked for, not by what the machine has),
    the torch DataLoader on CPU, which measured faster end to end there than DALI's CPU pipeline
    (issue 23 item 8; benchmarks/RESULTS.md); explicit names pass through, unknown ones and dali
    without DALI are one-line usage errors."""
    assert choose_loader("auto", torch.device("cuda", 0)) == "nvjpeg"
    assert choose_loader("auto", torch.device("cpu")) == "torch"
    assert choose_loader("torch", torch.device("cuda")) == "torch"
    with pytest.raises(UsageError, match="unknown loader 'pil'"):
        choose_loader("pil", torch.device("cpu"))
    if not dali_available():
        with pytest.raises(UsageError, match="DALI cannot be imported"):
            choose_loader("dali", torch.device("cpu"))


def test_dali_gpu_pipelines_are_well_formed_without_a_gpu(real_photos, monkeypatch, tmp_path):
    """The CUDA pipelines (the mixed decoder, then every operator on the GPU) are defined here,
    on a machine without CUDA, up to the build: DALI checks each operator's arguments and the
    device of each input at definition, so a CPU-only operator fed GPU data or a GPU tensor passed
    as a named argument fails this test instead of the first device run. Checked to fail on both."""
    dali_or_skip()
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    from featstore.augment import Augment, ViewPlan
    from featstore.loaders.dali import DaliLoader, _Feed
    from featstore.loaders.dali_shards import DaliShardLoader

    defined: list[Pipeline] = []
    monkeypatch.setattr(Pipeline, "build", lambda self: defined.append(self))
    files = [str(p) for p in sorted(real_photos.rglob("*.JPEG"))[:4]]
    assert len(files) == 4
    feed = _Feed(files, [0, 1, 2, 3], [[0, 1, 2, 3]], [{}], {})
    encoded = [np.fromfile(f, np.uint8) for f in files]
    for cls in (DaliLoader, DaliShardLoader):
        loader = cls(Preprocess(), torch.device("cuda", 0), workers=2)
        assert loader.on_gpu
        if cls is DaliShardLoader:
            loader._pipeline(feed._replace(files=[str(tmp_path / "a.tar")], index_paths=[str(tmp_path / "a.idx")]), 4)
        else:
            loader._pipeline(feed, 4)
        loader._bytes_pipeline(encoded)
    loader = DaliLoader(Preprocess(), torch.device("cuda", 0), workers=2)
    loader.augment = ViewPlan(Augment(views=3, seed=0), tuple(f"row{i}" for i in range(4)))
    windows = [loader.augment.params(i, 224, 224) for i in range(4)]
    loader._pipeline(feed, 4, windows.__getitem__)
    loader._bytes_pipeline(encoded, windows)
    assert len(defined) == 6 and {p.device_id for p in defined} == {0}

    # the check is real: a CPU operator on the mixed decoder's output is refused at definition
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=0)
    def wrong():
        data, _ = fn.readers.file(files=files[:2], labels=[0, 1])
        return fn.decoders.image(fn.decoders.image(data, device="mixed"), device="cpu")

    with pytest.raises(RuntimeError, match="incompatible device"):
        wrong()
