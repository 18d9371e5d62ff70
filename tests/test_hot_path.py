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


def _photos(imagenette_subset) -> list[str]:
    return sorted(str(p) for p in imagenette_subset.rglob("*.JPEG"))


def test_nvjpeg_decodes_on_a_producer_thread_and_it_stops_when_closed(imagenette_subset, monkeypatch):
    files = _photos(imagenette_subset)
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


def test_an_error_on_the_producer_thread_reaches_the_consumer(imagenette_subset, monkeypatch):
    files = _photos(imagenette_subset)
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
