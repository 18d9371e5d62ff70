"""Dense probes (#24 items 3-4): metrics against direct computation, the whole grid trained at once
and matched by a closed-form ridge regression, saved predictions that recompute the reported numbers,
mask alignment through resize and crop, streaming, paired comparisons, refusals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from featstore.errors import UsageError
from featstore.extraction import ExtractConfig, extract
from featstore.store import FeatureStore, read_targets
from probe.dense import metrics
from probe.dense.fit import fit_dense
from probe.protocol import Protocol
from tests.dense_scenes import write_encoder, write_scenes

UNNORMALISED = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), loader="torch", workers=0)


# ---------------------------------------------------------------- metrics against direct computation


def test_depth_metrics_match_a_direct_loop():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 8, (4, 6, 5)).astype(np.float32)
    gt[0, :2] = 0  # no depth there
    pred = gt * rng.uniform(0.7, 1.4, gt.shape).astype(np.float32) + 0.1
    got = metrics.depth_per_image(pred, gt)
    aligned = metrics.depth_per_image(pred, gt, aligned=True)
    for i in range(4):
        v = gt[i] > 0
        p, g = pred[i][v].astype(np.float64), gt[i][v].astype(np.float64)
        assert got["rmse"][i] == pytest.approx(np.sqrt(np.mean((p - g) ** 2)))
        assert got["absrel"][i] == pytest.approx(np.mean(np.abs(p - g) / g))
        assert got["log10"][i] == pytest.approx(np.mean(np.abs(np.log10(p) - np.log10(g))))
        for k in (1, 2, 3):
            assert got[f"delta{k}"][i] == pytest.approx(np.mean(np.maximum(p / g, g / p) < 1.25**k))
        (s, t), *_ = np.linalg.lstsq(np.c_[p, np.ones_like(p)], g, rcond=None)  # the least-squares scale and shift
        assert aligned["rmse"][i] == pytest.approx(np.sqrt(np.mean((np.maximum(s * p + t, 1e-3) - g) ** 2)), rel=1e-6)


def test_miou_equals_scikit_learn_confusion_and_jaccard():
    from sklearn.metrics import confusion_matrix, jaccard_score

    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, (3, 10, 10)).astype(np.uint8)
    gt[0, :3] = 255
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 4, gt.shape)).astype(np.uint8)
    pred[gt == 255] = 0
    keep = gt != 255
    cm = metrics.confusion(pred, gt, 4)
    np.testing.assert_array_equal(cm, confusion_matrix(gt[keep], pred[keep], labels=range(4)))
    scores = metrics.seg_scores(cm)
    assert scores["miou"] == pytest.approx(jaccard_score(gt[keep], pred[keep], average="macro"))
    assert scores["pixel_acc"] == pytest.approx(np.mean(gt[keep] == pred[keep]))


# ---------------------------------------------------------------- depth end to end on rendered scenes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    data = write_scenes(root / "data", {"train": 48, "val": 16, "test": 16})
    out = root / "fog.zarr"
    extract(
        ExtractConfig(model=write_encoder(root), dataset=str(data), out=str(out), image_size=64, resize=64, **UNNORMALISED), progress=False
    )
    return root, out


PROTOCOL = Protocol(lr_grid="1e-4:1e-1:4", epochs=8, batch_size=8)


@pytest.mark.slow  # trains 2 × 4 heads
def test_depth_probe_saved_predictions_recompute_the_reported_numbers(scenes, tmp_path):
    from featstore.console import run_cli
    from probe.cli import main

    root, store = scenes
    out = tmp_path / "run"
    args = ["fit", "--store", str(store), "--task", "depth", "--depth-head", "linear", "--lr-grid", "1e-4:1e-1:4", "--epochs", "8",
            "--batch-size", "8", "--save-predictions", "--out", str(out), "--quiet"]  # fmt: skip
    assert run_cli(main, "probe", args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and sum(r["selected"] == "true" for r in rows) == 1
    chosen = next(r for r in rows if r["selected"] == "true")
    assert chosen["select_split"] == "val" and chosen["report_split"] == "test"
    # the chosen head is the best on val, whatever test says
    assert float(chosen["select_rmse"]) == min(float(r["select_rmse"]) for r in rows if r["select_rmse"])
    saved = np.load(
        out
        / "predictions"
        / f"{next(iter(json.loads((out / 'protocol.json').read_text())['run']['stores']))['label'].replace(':', '_').replace('/', '_')}.npz"
    )
    fs = FeatureStore.open(store)
    gt = read_targets(fs, "test", "depth", saved["rows"])
    recomputed = metrics.depth_summary(saved["prediction"], gt)
    for name, value in recomputed.items():
        assert float(chosen[name]) == pytest.approx(value, rel=1e-4), name
    assert recomputed["delta1"] >= 0.9  # the encoder that exposes depth
    per_image = list(csv.DictReader(open(out / "predictions.csv")))
    assert [int(r["row"]) for r in per_image] == saved["rows"].tolist()
    direct = metrics.depth_per_image(saved["prediction"], gt)
    np.testing.assert_allclose([float(r["rmse"]) for r in per_image], direct["rmse"], rtol=1e-4)
    assert (out / "depth_vs_lr.png").is_file()


@pytest.mark.slow
def test_batched_heads_match_closed_form_ridge(scenes):
    """Trained by SGD on SigLoss, the linear depth head's held-out log-depth RMSE is within 10% of the
    closed-form ridge regression of the same model (tokens → 1×1 linear → bilinear upsampling)."""
    from probe.dense.fit import _dense_spec, _loss_targets, _train
    from probe.dense.heads import DenseHeads
    from probe.dense.tokens import Tokens, train_stats

    _, store = scenes
    fs = FeatureStore.open(store)
    rows = np.arange(fs.num_rows("train"))
    stats = train_stats(fs, "train", "patch", None, rows, 1000, torch.device("cpu"))
    tokens = Tokens(fs, "train", "patch", None, rows, stats, torch.device("cpu"), 1 << 30)
    spec = _dense_spec("depth", "linear", fs, "patch", rows, "train")
    protocol = Protocol(lr_grid=[3e-3], epochs=30, batch_size=8)
    heads = DenseHeads(spec, 192, 0, [3e-3], [0.0])
    depth = read_targets(fs, "train", "depth")
    _train(heads, tokens, _loss_targets(depth, spec.loss_size, "depth"), protocol, 0, lambda s: None)
    # the closed form of the same model: log depth = bilinear upsampling (a fixed linear map U) of a
    # linear function of the tokens, fit by ridge on log depth at the loss resolution
    size = spec.loss_size
    U = torch.nn.functional.interpolate(torch.eye(64).view(64, 1, 8, 8), size=size, mode="bilinear", align_corners=False)
    U = U.reshape(64, -1).T.numpy().astype(np.float64)  # (pixels, tokens)

    def pixel_level(split):
        split_rows = np.arange(fs.num_rows(split))
        x, _ = Tokens(fs, split, "patch", None, split_rows, stats, torch.device("cpu"), 1 << 30).load(split_rows)
        d = _loss_targets(read_targets(fs, split, "depth"), size, "depth").numpy().reshape(len(split_rows), -1)
        feats = np.einsum("pt,ntc->npc", U, np.c_[x.reshape(-1, 192).numpy(), np.ones(x.shape[0] * 64)].reshape(len(split_rows), 64, 193))
        return x, feats.reshape(-1, 193), np.log(np.where(d > 0, d, 1)).reshape(-1), (d > 0).reshape(-1)

    _, X, y, ok = pixel_level("train")
    w = np.linalg.solve(X[ok].T @ X[ok] + 1e-3 * np.eye(193), X[ok].T @ y[ok])
    xt, Xt, yt, okt = pixel_level("test")  # both judged on held-out images
    ridge = np.sqrt(np.mean((Xt[okt] @ w - yt[okt]) ** 2))
    with torch.no_grad():
        pred = np.log(heads.predict(xt, None, size)[:, 0].numpy().reshape(-1))
    head = np.sqrt(np.mean((pred[okt] - yt[okt]) ** 2))
    print("log-depth RMSE at the loss resolution: head", head, "ridge", ridge)
    assert head <= 1.1 * ridge, (head, ridge)


@pytest.mark.slow
def test_streaming_tokens_bound_memory_and_visit_every_row(scenes, tmp_path):
    from probe.dense.tokens import Tokens, train_stats

    _, store = scenes
    fs = FeatureStore.open(store)
    rows = np.arange(fs.num_rows("train"))
    stats = train_stats(fs, "train", "patch", None, rows, 7, torch.device("cpu"))
    row_bytes = 8 * 8 * 192 * 4
    tokens = Tokens(fs, "train", "patch", None, rows, stats, torch.device("cpu"), 10 * row_bytes)
    assert not tokens.in_memory and tokens.block_rows == 10
    seen = np.concatenate([pos for pos, _ in tokens.epoch(torch.Generator().manual_seed(0), 4)])
    assert sorted(seen.tolist()) == rows.tolist()
    full = Tokens(fs, "train", "patch", None, rows, stats, torch.device("cpu"), 1 << 30)
    pos, (patches, _) = next(tokens.epoch(torch.Generator().manual_seed(1), 4))
    torch.testing.assert_close(patches, full.load(pos)[0])  # the same standardized tokens either way
    result = fit_dense([str(store)], PROTOCOL, "depth", head="linear", out=tmp_path / "s", max_memory=10 * row_bytes)
    assert any(r["selected"] for r in result.rows)


# ---------------------------------------------------------------- segmentation: mask alignment


XY_ENCODER = '''
import torch
from torch import nn

class XY(nn.Module):
    """Per 8×8 patch: its mean colour and its x position (a ramp 0..1 across the image)."""

    def forward(self, x):
        b, _, h, w = x.shape
        ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
        return {"patch": nn.functional.avg_pool2d(torch.cat([x, ramp], 1), 8)}

def build():
    return XY()
'''


@pytest.mark.slow
def test_mask_alignment_through_resize_and_crop(tmp_path):
    """A mask one class left of the middle and another right of it, images of several aspect ratios,
    resized and cropped: a probe on an encoder that sees x reaches mIoU >= 0.95."""
    from tests.test_dense_targets import write_dense_folder

    root = write_dense_folder(tmp_path / "data", sizes=((48, 80), (80, 48), (64, 64), (56, 96)) * 4, splits=("train", "val", "test"))
    builder = tmp_path / "xy.py"
    builder.write_text(XY_ENCODER)
    store = tmp_path / "xy.zarr"
    extract(ExtractConfig(model=f"{builder}:build", dataset=str(root), out=str(store), image_size=64, resize=72, **UNNORMALISED),
            progress=False)  # fmt: skip
    result = fit_dense([str(store)], Protocol(lr_grid="1e-2:1:3", epochs=15, batch_size=8), "seg", out=tmp_path / "run",
                       save_predictions=True)  # fmt: skip
    chosen = next(r for r in result.rows if r["selected"])
    assert chosen["miou"] >= 0.95
    saved = np.load(next((tmp_path / "run" / "predictions").iterdir()))
    gt = read_targets(FeatureStore.open(store), "test", "mask", saved["rows"])
    direct = metrics.seg_scores(metrics.confusion(saved["prediction"], gt, 3))
    assert chosen["miou"] == pytest.approx(direct["miou"], rel=1e-6) and chosen["pixel_acc"] == pytest.approx(direct["pixel_acc"])
    conf = np.load(tmp_path / "run" / "confusion.npz")
    np.testing.assert_array_equal(conf[next(iter(conf.files))].sum(0), metrics.confusion(saved["prediction"], gt, 3))


# ---------------------------------------------------------------- refusals


def test_stores_with_other_targets_are_refused(scenes, tmp_path):
    root, store = scenes
    other = write_scenes(tmp_path / "other", {"train": 6, "val": 2, "test": 2}, seed=5)
    out = tmp_path / "o.zarr"
    extract(
        ExtractConfig(model=write_encoder(root), dataset=str(other), out=str(out), image_size=64, resize=64, **UNNORMALISED), progress=False
    )
    with pytest.raises(UsageError, match="other images"):
        fit_dense([str(store), str(out)], PROTOCOL, "depth", out=tmp_path / "r")
    with pytest.raises(UsageError, match="no mask targets|no patch view"):
        fit_dense([str(store)], PROTOCOL, "seg", view="nope", out=tmp_path / "r2")
    # --allow-different-data admits other images, never another label set: the first store's head
    # (3 classes) cannot score a class 6 (before: an IndexError mid-run, after the first store had trained)
    from PIL import Image

    for mask_file in (other / "train" / "masks").glob("*.png"):
        mask = np.array(Image.open(mask_file))
        mask[:4, :4] = 6
        Image.fromarray(mask, mode="L").save(mask_file)
    out7 = tmp_path / "o7.zarr"
    extract(
        ExtractConfig(model=write_encoder(root), dataset=str(other), out=str(out7), image_size=64, resize=64, **UNNORMALISED),
        progress=False,
    )
    assert FeatureStore.open(out7).attrs["targets"]["num_classes"] == 7
    with pytest.raises(UsageError, match="has 7 segmentation classes, .* has 3"):
        fit_dense([str(store), str(out7)], PROTOCOL, "seg", out=tmp_path / "r3", allow_different_data=True)
    assert not (tmp_path / "r3").exists()


def test_sig_loss_is_dinov2s_per_head():
    """dinov2/eval/depth/models/losses/sigloss.py: g = log(pred+eps) − log(gt+eps) over gt > 0 of the
    batch, sqrt(var(g) + 0.15·mean(g)²), torch.var unbiased; here for each head at once."""
    from probe.dense.heads import sig_loss

    rng = np.random.default_rng(2)
    target = torch.tensor(rng.uniform(0, 5, (3, 6, 7)), dtype=torch.float32)
    target[target < 1] = 0
    pred = torch.tensor(rng.uniform(0.5, 6, (3, 4, 6, 7)), dtype=torch.float32)
    got = sig_loss(pred, target)
    for h in range(4):
        valid = target > 0
        g = torch.log(pred[:, h][valid] + 1e-3) - torch.log(target[valid] + 1e-3)
        assert float(got[h]) == pytest.approx(float(torch.sqrt(torch.var(g) + 0.15 * torch.pow(torch.mean(g), 2))), rel=1e-5)


@pytest.mark.slow
def test_compare_calls_the_better_encoder(scenes, tmp_path):
    """The fog encoder reaches δ1 >= 0.9, an untrained one of the same architecture does not, and
    compare calls the difference: Δ per image, paired bootstrap interval excluding 0, Wilcoxon p < 0.01."""
    from featstore.console import run_cli
    from probe.cli import main
    from probe.dense.compare import compare_dense

    root, good = scenes
    data = root / "data"
    rand = tmp_path / "rand.zarr"
    extract(ExtractConfig(model=write_encoder(root, random_init=True), dataset=str(data), out=str(rand), image_size=64, resize=64,
                          **UNNORMALISED), progress=False)  # fmt: skip
    out = tmp_path / "run"
    fit_dense([f"fog={good}", f"random={rand}"], PROTOCOL, "depth", head="linear", out=out)
    task, diffs = compare_dense(out, reference="fog")
    by = {d.metric: d for d in diffs}
    per = list(csv.DictReader(open(out / "predictions.csv")))
    rmse = {(r["store"], int(r["row"])): float(r["rmse"]) for r in per}
    rows = sorted({k[1] for k in rmse})
    assert by["rmse"].delta == pytest.approx(np.mean([rmse["random", r] - rmse["fog", r] for r in rows]), rel=1e-6)
    assert by["delta1"].reference_value >= 0.9 > by["delta1"].value  # δ1 at true scale: the fog encoder, not the untrained one
    assert by["rmse"].delta > 0 and by["rmse"].low > 0 and by["rmse"].p < 0.01
    assert by["delta1"].high < 0 and by["delta1"].p < 0.01
    assert run_cli(main, "probe", ["compare", str(out), "--reference", "fog"]) == 0


def test_compare_with_too_few_images_with_depth_is_a_one_line_error(tmp_path):
    """Images without a valid depth pixel have no per-image numbers: two stores that share fewer than
    two images with them cannot be compared, said on one line (was: "unexpected ValueError" from scipy)."""
    import io
    from contextlib import redirect_stderr

    from featstore.console import run_cli
    from probe.cli import main

    (tmp_path / "protocol.json").write_text(json.dumps({"task": "depth", "run": {"stores": [{"label": "a"}, {"label": "b"}]}}))
    head = "store,split,row,path,rmse,absrel,delta1,rmse_ssa,delta1_ssa"
    rows = [f"{s},test,{r},x{r}.png," + ("1.0,0.1,0.9,0.5,0.95" if r == 0 else ",,,,") for s in "ab" for r in range(3)]
    (tmp_path / "predictions.csv").write_text("\n".join([head, *rows]) + "\n")
    err = io.StringIO()
    with redirect_stderr(err):
        code = run_cli(main, "probe", ["compare", str(tmp_path)])
    lines = err.getvalue().strip().splitlines()
    assert code != 0 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith("error: stores 'b' and 'a' share 1 reported images with a rmse (of 3)"), lines


def test_upsample_is_bilinear_interpolation():
    from probe.dense.heads import upsample

    x = torch.randn(2, 3, 5, 7, 6, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x.view(2, 15, 7, 6), size=(28, 24), mode="bilinear", align_corners=False).view(2, 3, 5, 28, 24)
    torch.testing.assert_close(upsample(x, (28, 24)), ref)


@pytest.mark.slow  # trains 2 × 4 bins heads
def test_bins_head_in_bf16_matches_float32_on_scenes(scenes, tmp_path):
    """DINOv2's bins head, its token GEMMs in bf16 (--precision bf16) and in float32: the same chosen
    lr and the reported metrics within a few per cent; the protocol record says which dtype ran."""
    _, store = scenes
    runs = {p: fit_dense([str(store)], PROTOCOL, "depth", head="bins", out=tmp_path / p, precision=p) for p in ("fp32", "bf16")}
    chosen = {p: next(r for r in run.rows if r["selected"]) for p, run in runs.items()}
    assert chosen["bf16"]["lr"] == chosen["fp32"]["lr"]
    assert chosen["bf16"]["rmse"] == pytest.approx(chosen["fp32"]["rmse"], rel=0.03)
    assert chosen["bf16"]["delta1"] == pytest.approx(chosen["fp32"]["delta1"], abs=0.02)
    assert chosen["fp32"]["delta1"] > 0.5  # it learned (8 epochs on 48 images: the bins head is slower to train than the log-linear one)
    for p in runs:
        assert json.loads((tmp_path / p / "protocol.json").read_text())["run"]["matmul_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[p]
