from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.image_kinds import write_good_images

REPO = Path(__file__).resolve().parent.parent
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"
# the subset benchmarks/gpu/prepare.sh carries to the GPU machine, where ../shared is absent (train/ only)
GPU_CARRIED_IMAGENETTE = REPO / "benchmarks" / "gpu" / "data" / "imagenette"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The featstore home (digits, weights, cached stores) is a per-session folder, never the user's."""
    cache = tmp_path_factory.mktemp("featstore-cache")
    names = ("FEATSTORE_HOME", "FEATSTORE_CACHE")  # FEATSTORE_HOME wins when a developer has it set
    old = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(cache) for k in names})
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """An ImageFolder tree with train/val splits, 2 classes, images of odd modes and sizes."""
    root = tmp_path_factory.mktemp("small")
    for k, (split, n) in enumerate((("train", 8), ("val", 4))):
        for j, label in enumerate(("cat", "dog")):
            write_good_images(root / split / label, n, seed=10 * k + j)  # fixed: str hashes vary per process
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def imagenette_subset(tmp_path_factory) -> Path:
    """A few real photographs (3 of each of 6 classes) from ../shared/data/imagenette's val split, or on
    the GPU machine from the carried train subset, copied as an ImageFolder."""
    source = IMAGENETTE / "val" if IMAGENETTE.is_dir() else GPU_CARRIED_IMAGENETTE / "train"
    if not source.is_dir():
        pytest.skip("../shared/data/imagenette is not present")
    root = tmp_path_factory.mktemp("imagenette")
    for cls in sorted(p.name for p in source.iterdir())[:6]:
        files = sorted((source / cls).iterdir())[:3]
        (root / cls).mkdir()
        for f in files:
            shutil.copy(f, root / cls / f.name)
    return root


def dali_or_skip():
    from featstore.loaders import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not importable here")


def centered_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine after removing the mean feature (random-init features all point one way)."""
    mu = np.concatenate([a, b]).mean(axis=0, keepdims=True)
    a, b = a - mu, b - mu
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
