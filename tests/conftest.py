from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.image_kinds import write_good_images
from tests.photos import write_photo_folder

REPO = Path(__file__).resolve().parent.parent
# hundreds of real photos for the benchmarks and the tests that need that many (never copied into the
# repository); FEATSTORE_TEST_IMAGENETTE points elsewhere (a missing path shows what skips without it)
IMAGENETTE = Path(os.environ.get("FEATSTORE_TEST_IMAGENETTE") or REPO.parent / "shared" / "data" / "imagenette")

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
def real_photos(tmp_path_factory) -> Path:
    """Real photographs as an ImageFolder (6 classes x 4), made from the ones shipped in tests/data/photos:
    no test that needs a few real JPEGs skips in a fresh clone."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


def dali_or_skip():
    from featstore.loaders import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not importable here")


def centered_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine after removing the mean feature (random-init features all point one way)."""
    mu = np.concatenate([a, b]).mean(axis=0, keepdims=True)
    a, b = a - mu, b - mu
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
