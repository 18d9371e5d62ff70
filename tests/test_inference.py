"""BatchEncoder: fixed shapes drop their padding exactly; results come back in order; the CUDA path
(pinned ring, side-stream copies, bf16) agrees with the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featstore.inference import BatchEncoder, pad_to
from featstore.models.encoders import build_encoder, resolve_encoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _encoder():
    spec = resolve_encoder("resnet18", random_init=True, preprocess_overrides=dict(image_size=32, resize=32))
    return build_encoder(spec).to(memory_format=torch.channels_last)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)


def test_pad_to_repeats_last_and_keeps_channels_last():
    x = _images(3, 0)
    y = pad_to(x, 5)
    assert y.shape == (5, 3, 32, 32) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y[3], x[2])
    torch.testing.assert_close(y[4], x[2])
    assert pad_to(x, 3) is x


def test_fixed_shapes_drop_padding_and_keep_order():
    enc = _encoder()
    views = {"pool": 512}
    plain = BatchEncoder(enc, views, torch.device("cpu"), batch_size=8)
    fixed = BatchEncoder(enc, views, torch.device("cpu"), batch_size=8, fixed_shapes=True)
    sizes = [8, 3, 8, 1]
    results = {}
    for name, runner in (("plain", plain), ("fixed", fixed)):
        out = []
        for k, n in enumerate(sizes):
            runner.submit(k, _images(n, k))
            out.extend(runner.ready())
        out.extend(runner.ready(drain=True))
        assert [item for item, _ in out] == list(range(len(sizes)))
        assert [f["pool"].shape for _, f in out] == [(n, 512) for n in sizes]
        results[name] = out
    for (_, a), (_, b) in zip(results["plain"], results["fixed"]):
        np.testing.assert_allclose(a["pool"], b["pool"], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@cuda
def test_cuda_ring_matches_cpu():
    enc_cpu = _encoder()
    enc_gpu = _encoder().cuda()
    views = {"pool": 512}
    cpu = BatchEncoder(enc_cpu, views, torch.device("cpu"), batch_size=16)
    gpu = BatchEncoder(enc_gpu, views, torch.device("cuda"), batch_size=16, ring=3)
    sizes = [16, 16, 5, 16, 16, 16, 9]
    got, want = [], []
    for k, n in enumerate(sizes):
        x = _images(n, k)
        cpu.submit(k, x)
        want.extend(cpu.ready())
        gpu.submit(k, x.cuda())
        got.extend(gpu.ready())
    got.extend(gpu.ready(drain=True))
    assert [k for k, _ in got] == list(range(len(sizes)))
    for (_, a), (_, b) in zip(got, want):
        cos = (a["pool"] * b["pool"]).sum(1) / (np.linalg.norm(a["pool"], axis=1) * np.linalg.norm(b["pool"], axis=1))
        assert cos.min() > 0.99  # bf16 autocast on the GPU


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("loader", ["nvjpeg", "torch", "dali"])
def test_extract_on_cuda_matches_cpu(loader, small_folder, tmp_path):
    from featstore.extraction import ExtractConfig, extract
    from featstore.loaders import dali_available
    from featstore.store import FeatureStore

    if loader == "dali" and not dali_available():
        pytest.skip("DALI not installed")
    # batches of 4: several in flight at once, as in a real run
    common = dict(
        model="resnet18", dataset=str(small_folder), random_init=True, workers=2, batch_size=4, image_size=64, resize=72, dtype="float32"
    )
    extract(ExtractConfig(out=str(tmp_path / "gpu.zarr"), device="cuda", loader=loader, **common), progress=False)
    extract(ExtractConfig(out=str(tmp_path / "cpu.zarr"), device="cpu", loader="torch", **common), progress=False)
    a = FeatureStore.open(tmp_path / "gpu.zarr").features("train", "pool")[:]
    b = FeatureStore.open(tmp_path / "cpu.zarr").features("train", "pool")[:]
    mu = np.concatenate([a, b]).mean(0)
    a, b = a - mu, b - mu
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert len(a) >= 12 and np.median(cos) > 0.98
    assert cos.min() > 0.95, cos  # every image: one corrupted decode or batch would be far off


@pytest.mark.slow
def test_compile_gives_the_same_features(small_folder, tmp_path):
    """--compile (torch.compile, fixed shapes) changes speed, not numbers."""
    import textwrap

    from featstore.extraction import ExtractConfig, extract
    from featstore.store import FeatureStore

    builder = tmp_path / "tiny.py"
    builder.write_text(
        textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    """)
    )
    common = dict(
        model=f"{builder}:build",
        dataset=str(small_folder),
        loader="torch",
        workers=0,
        batch_size=5,
        image_size=32,
        resize=32,
        dtype="float32",
    )
    extract(ExtractConfig(out=str(tmp_path / "eager.zarr"), **common), progress=False)
    extract(ExtractConfig(out=str(tmp_path / "compiled.zarr"), compile=True, **common), progress=False)
    for split in ("train", "val"):
        np.testing.assert_allclose(
            FeatureStore.open(tmp_path / "compiled.zarr").features(split, "features"),
            FeatureStore.open(tmp_path / "eager.zarr").features(split, "features"),
            rtol=1e-4,
            atol=1e-5,
        )
