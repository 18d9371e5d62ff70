"""examples/ssl_study at CI scale: SimCLR, autoencoder and jigsaw pretrained on 600 real
photographs (Imagenette train, 60 per class) at 32 px, extracted through ``featstore extract
--weights``, and probed against the same backbone at random init on 600 held-out photographs
(Imagenette val, 60 per class).

Seeded throughout (subset, pretraining, probe), so the numbers are the same on every run of one
machine. What it shows and what it cannot at this scale: docs/ssl_study.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from tests.conftest import IMAGENETTE, REPO

EXAMPLE = REPO / "examples" / "ssl_study"
sys.path.append(str(EXAMPLE))  # the example's modules (encoder, simclr, jigsaw, …)

from encoder import build  # noqa: E402
from jigsaw import cut_tiles, hamming_permutations, mean_hamming_distance  # noqa: E402
from simclr import nt_xent  # noqa: E402

METHODS = ("simclr", "autoencoder", "jigsaw")
HEADS = {"simclr": ("projection_head.",), "autoencoder": ("decoder.",), "jigsaw": ("fc.", "classifier.")}
SIZE = 32
TRAIN_PER_CLASS, HELD_OUT_PER_CLASS = 60, 60
# SimCLR gets the budget: it is the method that separates from random init within CI's minutes;
# the autoencoder and jigsaw need far more steps than CI has (measured: docs/ssl_study.md)
EPOCHS = {"simclr": 10, "autoencoder": 3, "jigsaw": 3}
EXTRA = {"jigsaw": ["--permutations", "24"]}  # with 100 permutations the loss stays at chance for the few steps CI affords
KNN_K = 20


# --- the losses and the permutation set, against direct computations (fast) -------------------

def test_nt_xent_matches_the_papers_equation():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    tau = 0.3
    z = torch.cat([z0, z1])
    n2 = len(z)

    def sim(i, j):
        return float(z[i] @ z[j] / (z[i].norm() * z[j].norm()))

    def ell(i, j):  # eq. 1 of Chen et al. 2020
        denom = sum(np.exp(sim(i, k) / tau) for k in range(n2) if k != i)
        return -np.log(np.exp(sim(i, j) / tau) / denom)

    expected = sum(ell(k, k + 5) + ell(k + 5, k) for k in range(5)) / n2
    assert float(nt_xent(z0, z1, tau)) == pytest.approx(expected, rel=1e-10)
    assert float(nt_xent(z0, z0, tau)) < float(nt_xent(z0, z1, tau))  # identical views: a lower loss


def test_hamming_permutations_follow_algorithm_1():
    perms = hamming_permutations(12, seed=3)
    assert perms.shape == (12, 9)
    assert all(sorted(p) == list(range(9)) for p in perms)
    assert len({tuple(p) for p in perms}) == 12
    # each permutation after the first maximizes the summed Hamming distance to those before it
    import itertools

    every = np.array(list(itertools.permutations(range(9))), dtype=np.int8)
    summed = np.zeros(len(every), dtype=np.int64)
    for m in range(1, 12):
        summed += (every != perms[m - 1]).sum(1)
        assert (perms[m] != perms[:m]).sum() == summed.max()
    # far apart on average: two random permutations of 9 differ in 8 positions on average
    assert mean_hamming_distance(perms) > 8.3
    assert hamming_permutations(12, seed=3).tolist() == perms.tolist()


def test_cut_tiles_come_from_their_grid_cells():
    size, tile = 30, 8  # 10-px cells
    image = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size).repeat(4, 3, 1, 1)
    tiles = cut_tiles(image, tile, torch.Generator().manual_seed(0))
    assert tiles.shape == (4, 9, 3, tile, tile)
    for k in range(9):
        gy, gx = divmod(k, 3)
        top_left = tiles[:, k, 0, 0, 0].long()
        y, x = top_left // size, top_left % size
        assert ((y >= gy * 10) & (y <= gy * 10 + 10 - tile)).all() and ((x >= gx * 10) & (x <= gx * 10 + 10 - tile)).all()
        # a contiguous crop: rows step by `size`, columns by 1
        expected = top_left[:, None, None] + size * torch.arange(tile)[:, None] + torch.arange(tile)
        assert torch.equal(tiles[:, k, 0].long(), expected)


# --- the study at CI scale (real photographs; skipped without them) ------------------------------

def _subset(root):
    """An ImageFolder of symlinks: the first images of every class of Imagenette train and val."""
    for split, n in (("train", TRAIN_PER_CLASS), ("val", HELD_OUT_PER_CLASS)):
        for cls in sorted(p.name for p in (IMAGENETTE / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((IMAGENETTE / split / cls).iterdir())[:n]:
                (root / split / cls / f.name).symlink_to(f)
    return root


def _extract(data, out, *weights_args):
    from featstore.cli import cli

    result = CliRunner().invoke(cli, [
        "extract", "--model", f"{EXAMPLE / 'encoder.py'}:build", *weights_args, "--dataset", str(data), "--out", str(out),
        "--image-size", str(SIZE), "--resize", str(SIZE * 9 // 8), "--interpolation", "bilinear",
        "--loader", "torch", "--workers", "0", "--dtype", "float32", "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    if not IMAGENETTE.is_dir():
        pytest.skip("../shared/data/imagenette is not present")
    tmp = tmp_path_factory.mktemp("ssl_study")
    data = _subset(tmp / "data")
    out = {"stdout": {}, "checkpoint": {}, "extract": {}, "stores": {}}
    for method in METHODS:
        ckpt = tmp / f"{method}.pth"
        run = subprocess.run(
            [sys.executable, str(EXAMPLE / "pretrain.py"), "--method", method, "--data", str(data / "train"),
             "--epochs", str(EPOCHS[method]), "--size", str(SIZE), "--batch-size", "64", "--device", "cpu",
             *EXTRA.get(method, []), "--out", str(ckpt)],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr
        out["stdout"][method] = run.stdout
        out["checkpoint"][method] = torch.load(ckpt, weights_only=True)
        out["extract"][method] = _extract(data, tmp / f"{method}.zarr", "--weights", str(ckpt))
        out["stores"][method] = tmp / f"{method}.zarr"
    _extract(data, tmp / "random.zarr", "--random-init")
    out["stores"]["random"] = tmp / "random.zarr"
    out["linear"], out["knn"] = _probe(out["stores"])
    return out


def _probe(stores):
    """Linear probe (one fixed LR) and k-NN (k = 20), both probe.fit's, trained on train and reported
    on val; per k-NN: each held-out image correct or not, from probe fit's own per-image predictions."""
    import probe

    protocol = probe.Protocol(lr_grid=(0.01,), epochs=30, methods=("linear", "knn"), knn_k=(KNN_K,))
    rows = probe.fit([str(p) for p in stores.values()], protocol, device="cpu")
    selected = {(r["store"], r["method"]): r for r in rows if r["selected"]}
    linear, knn, paths = {}, {}, {}
    for name, path in stores.items():
        linear[name] = selected[(str(path), "linear")]
        pred = selected[(str(path), "knn")]["report_predictions"]
        order = np.argsort(pred["paths"])  # paired by image: the same order for every encoder
        paths[name] = pred["paths"][order]
        knn[name] = (pred["pred"] == pred["target"])[order]
        # the k-NN accuracy of the row is the mean of its per-image predictions
        assert 100 * knn[name].mean() == pytest.approx(selected[(str(path), "knn")]["report_top1_pct"], abs=1e-4)  # the row is rounded to 4 decimals
    assert all(np.array_equal(p, paths["random"]) for p in paths.values())
    return linear, knn


def _wilson(row) -> tuple[float, float]:
    """95% Wilson interval of a reported accuracy (percent), from scipy."""
    n = row["n_report"]
    k = round(row["report_top1_pct"] * n / 100)
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    p, z = k / n, stats.norm.ppf(0.975)  # Wilson's score interval by hand
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (ci.low, ci.high) == pytest.approx((centre - half, centre + half), abs=1e-12)
    return round(100 * float(ci.low), 2), round(100 * float(ci.high), 2)


def _paired_interval(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """95% interval of the paired difference of per-image correctness (percent), from scipy."""
    ci = stats.ttest_rel(a.astype(float), b.astype(float)).confidence_interval(0.95)
    d = a.astype(float) - b.astype(float)  # the same by hand: mean ± t * sd / sqrt(n)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert (ci.low, ci.high) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
    return round(100 * float(ci.low), 2), round(100 * float(ci.high), 2)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_pretraining_loss_falls(study, method):
    losses = study["checkpoint"][method]["losses"]
    assert len(losses) == EPOCHS[method]
    assert losses[-1] < losses[0]
    printed = re.search(r"loss ([0-9.]+) \(epoch 1\) -> ([0-9.]+) \(epoch (\d+)\)", study["stdout"][method])
    assert printed and float(printed[1]) == pytest.approx(losses[0], abs=1e-4) and float(printed[2]) == pytest.approx(losses[-1], abs=1e-4)
    if method == "jigsaw":  # below chance: it tells permutations apart
        assert losses[-1] < np.log(24)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_weights_load_with_the_heads_dropped(study, method):
    state = study["checkpoint"][method]["state_dict"]
    heads = [k for k in state if k.startswith(HEADS[method])]
    backbone = [k for k in state if not k.startswith(HEADS[method])]
    assert heads and len(backbone) == len(build().state_dict())
    report = re.search(r"weights \S+: loaded (\d+) tensors, missing (\d+), unexpected (\d+), dropped head/projection (\d+)(.*)",
                       study["extract"][method])
    assert report, study["extract"][method]
    assert tuple(map(int, report.groups()[:4])) == (len(backbone), 0, 0, len(heads))
    # each head named: projection_head.* (8) / decoder.* (22) / fc.* (2), classifier.* (2)
    named = ", ".join(f"{h}.* ({n})" for h, n in Counter(k.split(".")[0] for k in heads).items())
    assert report[5].startswith(f"; dropped {named}"), report[0]


@pytest.mark.slow
def test_simclr_beats_random_init_on_held_out_images(study):
    """Linear probe: the two 95% intervals do not even overlap, which bounds the interval of the
    difference whatever the correlation of the two on the same images; k-NN: the paired interval
    of the difference excludes zero with room to spare."""
    linear, knn = study["linear"], study["knn"]
    for name in (*METHODS, "random"):  # shown with -s; docs/ssl_study.md quotes them
        print(f"{name}: linear {linear[name]['report_top1_pct']:.1f}% {_wilson(linear[name])}, k-NN {100 * knn[name].mean():.1f}%"
              + (f", k-NN difference to random {_paired_interval(knn[name], knn['random'])}" if name != "random" else ""))
    assert linear["simclr"]["report_split"] == "val"
    assert linear["simclr"]["n_report"] == linear["random"]["n_report"] == 10 * HELD_OUT_PER_CLASS
    trained, random = _wilson(linear["simclr"]), _wilson(linear["random"])
    assert trained[0] > random[1], (linear["simclr"]["report_top1_pct"], linear["random"]["report_top1_pct"], trained, random)
    low, high = _paired_interval(knn["simclr"], knn["random"])
    assert low > 2.0, (knn["simclr"].mean(), knn["random"].mean(), low, high)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["autoencoder", "jigsaw"])
@pytest.mark.xfail(strict=True, reason="at CI scale (600 images, 3 epochs, 32 px) the autoencoder and jigsaw do not "
                   "separate from random init; measured with 30 epochs too (docs/ssl_study.md)")
def test_autoencoder_and_jigsaw_beat_random_init_at_ci_scale(study, method):
    linear, knn = study["linear"], study["knn"]
    assert _wilson(linear[method])[0] > _wilson(linear["random"])[1]
    assert _paired_interval(knn[method], knn["random"])[0] > 0
