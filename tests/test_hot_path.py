"""Issue 22, items 3 and 4: the nvJPEG loader decodes on a producer thread; the CUDA-graph forward
gives the eager forward's features (CUDA only)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from featstore.loaders.nvjpeg import NvjpegLoader
from featstore.preprocess import Preprocess

CPU = torch.device("cpu")
PRE = Preprocess(64, 64, "bilinear")


def _photos(real_photos) -> list[str]:
    return sorted(str(p) for p in real_photos.rglob("*.JPEG"))


def test_nvjpeg_decodes_on_a_producer_thread_and_it_stops_when_closed(real_photos, monkeypatch):
    files = _photos(real_photos)
    plan = [np.arange(i, min(i + 4, len(files))) for i in range(0, len(files), 4)]
    loader = NvjpegLoader(PRE, CPU, 1)
    threads: list[str] = []
    real = loader._decode
    monkeypatch.setattr(loader, "_decode", lambda blobs: threads.append(threading.current_thread().name) or real(blobs))
    reference = torch.cat([b.images for b in NvjpegLoader(PRE, CPU, 1).batches(files, plan)])
    batches = list(loader.batches(files, plan))
    assert [b.rows.tolist() for b in batches] == [p.tolist() for p in plan]
    assert torch.equal(torch.cat([b.images for b in batches]), reference)
    assert threads and set(threads) == {"featstore-nvjpeg"}  # never the main thread

    gen = loader.batches(files, plan)
    next(gen)
    gen.close()  # extraction closes early on --strict or an error
    assert not [t for t in threading.enumerate() if t.name == "featstore-nvjpeg"]


def test_an_error_on_the_producer_thread_reaches_the_consumer(real_photos, monkeypatch):
    files = _photos(real_photos)
    loader = NvjpegLoader(PRE, CPU, 1)
    calls = []

    def crops(decoded, by_size=None):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory in the second batch")
        return NvjpegLoader.crops(loader, decoded, by_size)

    monkeypatch.setattr(loader, "crops", crops)
    gen = loader.batches(files, [np.arange(0, 4), np.arange(4, 8), np.arange(8, 12)])
    assert len(next(gen).rows) == 4
    with pytest.raises(MemoryError, match="second batch"):
        next(gen)
    assert not [t for t in threading.enumerate() if t.name == "featstore-nvjpeg"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _resnet():
    import torchvision

    from featstore.models.encoders import FeatureEncoder

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    return FeatureEncoder(net.eval(), "cnn").eval().cuda().to(memory_format=torch.channels_last)


def _run(runner, batches):
    out = []
    for k, x in enumerate(batches):
        runner.submit(k, x)
        out.extend(runner.ready())
    out.extend(runner.ready(drain=True))
    return [f["pool"] for _, f in out]


@pytest.mark.gpu
@cuda
def test_cuda_graph_forward_equals_eager_within_bf16_rounding():
    from featstore.inference import BatchEncoder

    enc = _resnet()
    g = torch.Generator().manual_seed(0)
    sizes = [16, 16, 5, 16, 16, 9]  # short batches are padded to the captured shape
    batches = [torch.randn(n, 3, 64, 64, generator=g).cuda().contiguous(memory_format=torch.channels_last) for n in sizes]
    notes: list[str] = []
    graphed = BatchEncoder(enc, {"pool": 512}, torch.device("cuda"), 16, cuda_graphs=True, log=notes.append)
    eager = BatchEncoder(enc, {"pool": 512}, torch.device("cuda"), 16, cuda_graphs=False)
    a, b = _run(graphed, batches), _run(eager, batches)
    assert graphed.graph is not None and not notes, notes  # captured, and kept after its check
    assert eager.graph is None
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=2**-7, atol=2**-7 * np.abs(y).max())


@pytest.mark.gpu
@cuda
def test_a_model_that_cannot_be_captured_runs_eagerly_with_a_note():
    from featstore.inference import BatchEncoder

    class Syncs(torch.nn.Module):
        def forward(self, x):
            scale = float(x.abs().max().item())  # a host sync: not capturable
            return {"pool": x.mean(dim=(2, 3)) / max(scale, 1.0)}

    notes: list[str] = []
    runner = BatchEncoder(Syncs().cuda(), {"pool": 3}, torch.device("cuda"), 4, log=notes.append)
    x = torch.rand(4, 3, 8, 8, device="cuda")
    (out,) = _run(runner, [x])
    assert not runner.graphs and any("CUDA graph capture failed" in n for n in notes), notes
    np.testing.assert_allclose(out, (x.mean(dim=(2, 3)) / max(float(x.abs().max()), 1.0)).cpu().numpy(), rtol=1e-2)
