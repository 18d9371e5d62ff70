"""Dense runs in probe report (image | truth | predictions, LR curves, the paired comparison), dense
reads checked against the stores' digests (patch tokens and targets), and targets in .h5 exports."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from featstore.cli import cli as featstore_cli
from featstore.console import run_cli
from featstore.errors import FeatstoreError, UsageError
from featstore.extraction import ExtractConfig, extract
from featstore.store import FeatureStore, read_targets, target_valid
from probe.cli import main as probe_cli
from probe.dense.fit import fit_dense
from probe.dense.report import GREY, _crop, colour_depth, load_run, palette, panel
from probe.protocol import Protocol
from tests.dense_scenes import write_encoder, write_scenes

UNNORMALISED = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), loader="torch", workers=0)
FAST = Protocol(lr_grid="1e-3:1e-1:3", epochs=4, batch_size=8)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-report")
    data = write_scenes(root / "data", {"train": 16, "val": 8, "test": 8})
    out = {}
    for name, random_init in (("fog", False), ("random", True)):
        out[name] = root / f"{name}.zarr"
        extract(ExtractConfig(model=write_encoder(root, random_init=random_init), dataset=str(data), out=str(out[name]), image_size=64,
                              resize=64, **UNNORMALISED), progress=False)  # fmt: skip
    return root, out


def _tex(numbers: str) -> str:
    """Numbers as the LaTeX tables print them: a negative sign is a minus ($-$), not a hyphen."""
    return numbers.replace("-", "$-$")


# ---------------------------------------------------------------- probe report on dense runs


@pytest.mark.slow
def test_report_of_a_depth_run_shows_images_truth_predictions_and_the_comparison(stores, tmp_path, capsys):
    root, paths = stores
    run = tmp_path / "run"
    fit_dense([f"fog={paths['fog']}", f"random={paths['random']}"], FAST, "depth", head="linear", out=run, save_predictions=True)
    out = tmp_path / "report"
    assert run_cli(probe_cli, "probe", ["report", str(run), "--out", str(out), "--reference", "fog", "--markdown"]) == 0
    page = (out / "report.html").read_text()
    assert page.count("<img") == 2  # the image panel and the LR curves
    assert "r1-panel" in page and "r1-lr" in page and "Wilcoxon p" in page and "δ1" in page
    md = (out / "leaderboard.md").read_text()
    assert "| random | fog | RMSE (m) |" in md
    table = (out / "table.md").read_text()
    assert table.startswith("| store | RMSE (m)") and "| fog |" in table and "reference" in table
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert [r["store"] for r in rows] == ["fog", "random"]
    # the numbers are the run's own: the selected rows of results.csv, and probe compare's Δ
    selected = {r["store"]: r for r in csv.DictReader(open(run / "results.csv")) if r["selected"] == "true"}
    assert [float(r["rmse"]) for r in rows] == pytest.approx([float(selected[s]["rmse"]) for s in ("fog", "random")])
    delta = float(selected["random"]["rmse"]) - float(selected["fog"]["rmse"])
    assert f"{delta:+.4f}" in md

    # the panel: the first 4 reported rows, the store's truth, the saved predictions, the crops of the files
    p = panel(load_run(run))
    saved = np.load(run / "predictions" / "fog.npz")
    assert p.rows.tolist() == sorted(saved["rows"].tolist())[:4] and p.split == "test"
    fs = FeatureStore.open(paths["fog"])
    np.testing.assert_array_equal(p.truth, read_targets(fs, "test", "depth", p.rows))
    where = {int(r): i for i, r in enumerate(saved["rows"].tolist())}
    np.testing.assert_array_equal(p.predictions["fog"], saved["prediction"][[where[r] for r in p.rows.tolist()]])
    files = [root / "data" / str(q) if not str(q).startswith("/") else q for q in fs.paths("test")[p.rows]]
    for image, file in zip(p.images, files):  # 64×64 scenes at --resize 64 --image-size 64: the file itself
        np.testing.assert_array_equal(image, np.asarray(Image.open(file).convert("RGB")))
    t = p.truth[0]
    assert p.depth_range(0) == (float(t[t > 0].min()), float(t[t > 0].max()))

    # --latex: the same table as table.md, booktabs; the Δ cells are probe compare's numbers, in bold where Holm p < 0.05
    assert run_cli(probe_cli, "probe", ["report", str(run), "--out", str(tmp_path / "r2"), "--latex", "--reference", "fog"]) == 0
    tex = (tmp_path / "r2" / "table.tex").read_text()
    assert tex.startswith("\\begin{table}") and "\\toprule" in tex and "\\bottomrule" in tex
    body = [line for line in tex.splitlines() if line.startswith(("fog", "random", "\\textbf{fog", "\\textbf{random"))]
    assert [line.split(" & ")[0].replace("\\textbf{", "").rstrip("}") for line in body] == ["fog", "random"]
    from probe.dense.compare import compare_dense

    _, differences = compare_dense(run, "fog")
    d = next(d for d in differences if d.metric == "rmse" and d.store == "random")
    assert _tex(f"{d.delta:+.4f} [{d.low:+.4f}, {d.high:+.4f}]") in tex  # a negative number with a minus, not a hyphen
    rmse = {s: float(selected[s]["rmse"]) for s in ("fog", "random")}
    best = min(rmse, key=rmse.get)
    assert f"\\textbf{{{rmse[best]:.4f}}}" in tex or f"\\textbf{{{rmse[best]:.3f}}}" in tex  # the lower RMSE in bold
    capsys.readouterr()
    assert run_cli(probe_cli, "probe", ["compare", str(run), "--reference", "fog", "--latex"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("\\begin{table}") and "Holm" in printed and _tex(f"{d.delta:+.4f}") in printed
    assert printed.count(" \\\\") == len(differences) + 1  # a line per store × metric, and the header


@pytest.mark.slow
def test_report_of_a_seg_run_without_saved_predictions_says_how_to_get_them(stores, tmp_path):
    _, paths = stores
    run = tmp_path / "seg"
    fit_dense([str(paths["fog"])], Protocol(lr_grid="1e-2:1:2", epochs=2, batch_size=8), "seg", out=run)
    out = tmp_path / "report"
    assert run_cli(probe_cli, "probe", ["report", str(run), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "rerun its probe fit with --save-predictions" in page
    assert page.count("<img") == 1  # the LR curves; no panel
    assert "mIoU" in (out / "leaderboard.md").read_text()
    from probe.dense.report import report

    (tmp_path / "classify").mkdir()
    (tmp_path / "classify" / "protocol.json").write_text(json.dumps({"protocol": {}}))  # a classification run's record
    with pytest.raises(UsageError, match="is not a dense run"):
        report([run, tmp_path / "classify"], tmp_path / "mixed")
    with pytest.raises(UsageError, match="no store 'nope' in these runs"):
        report([run], tmp_path / "ref", reference="nope")
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "ref").exists()  # refused before writing


@pytest.mark.slow
def test_a_damaged_seg_run_folder_is_named_and_an_unlabelled_image_is_left_out_of_the_pairs(stores, tmp_path, capsys):
    """probe compare / report on a seg run folder whose files were damaged: confusion.npz cut short is
    one `error:` line naming it (it was an unexpected BadZipFile); a saved prediction file cut short
    leaves that store out of the image panel with a note, the rest of the report drawn; an image
    without one labelled pixel (its per-image scores empty cells) is left out of the Wilcoxon pairs
    (it was a KeyError) while the confusion-based numbers keep it."""
    _, paths = stores
    run = tmp_path / "seg"
    fit_dense([f"fog={paths['fog']}", f"random={paths['random']}"], Protocol(lr_grid="1e-2:1:2", epochs=2, batch_size=8), "seg",
              out=run, save_predictions=True)  # fmt: skip
    assert run_cli(probe_cli, "probe", ["compare", str(run)]) == 0
    capsys.readouterr()

    blank = tmp_path / "blank"
    shutil.copytree(run, blank)
    with open(blank / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["store"] == "random" and r["row"] == rows[0]["row"]:
            r["miou"] = r["pixel_acc"] = ""  # what probe fit writes for an image with no labelled pixel (NaN)
    with open(blank / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert run_cli(probe_cli, "probe", ["compare", str(blank)]) == 0 and "random" in capsys.readouterr().out
    from probe.dense.compare import compare_dense

    before, after = ({d.metric: d for d in compare_dense(folder)[1]} for folder in (run, blank))
    from scipy.stats import wilcoxon

    for m in ("miou", "pixel_acc"):  # the Wilcoxon test on the other pairs; the confusion-based numbers as they were
        score = {(r["store"], r["row"]): float(r[m]) if r[m] else np.nan for r in rows}
        diff = np.array([score[("random", i)] - score[("fog", i)] for (store, i) in score if store == "fog"])
        assert np.isnan(diff).sum() == 1
        assert after[m].p == pytest.approx(wilcoxon(diff[np.isfinite(diff)]).pvalue, rel=1e-12)
        assert (after[m].value, after[m].delta, after[m].low) == (before[m].value, before[m].delta, before[m].low)

    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    data = (run / "confusion.npz").read_bytes()
    (cut / "confusion.npz").write_bytes(data[: len(data) // 2])
    for command in (["compare", str(cut)], ["report", str(cut), "--out", str(tmp_path / "r1")]):
        assert run_cli(probe_cli, "probe", command) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and f"{str(cut / 'confusion.npz')!r} is damaged" in err and "unexpected" not in err, err

    saved = tmp_path / "saved"
    shutil.copytree(run, saved)
    data = (run / "predictions" / "fog.npz").read_bytes()
    (saved / "predictions" / "fog.npz").write_bytes(data[: len(data) // 2])
    assert run_cli(probe_cli, "probe", ["report", str(saved), "--out", str(tmp_path / "r2")]) == 0
    page = (tmp_path / "r2" / "report.html").read_text()
    assert "the saved predictions of fog are damaged (cut short or overwritten)" in page and "r1-panel" in page


@pytest.mark.slow
def test_per_class_iou_is_the_confusion_matrices_and_its_intervals_a_direct_bootstrap(stores, tmp_path, capsys):
    from probe.dense.compare import SEED, per_class_iou
    from probe.dense.report import report

    _, paths = stores
    run = tmp_path / "seg"
    fit_dense([f"fog={paths['fog']}", f"random={paths['random']}"], Protocol(lr_grid="1e-2:1:2", epochs=2, batch_size=8), "seg", out=run)
    written = report([run], tmp_path / "report", reference="fog")
    table = list(csv.DictReader(open(written["per_class_iou.csv"])))
    confusion = np.load(run / "confusion.npz")
    selected = {r["store"]: r for r in csv.DictReader(open(run / "results.csv")) if r["selected"] == "true"}
    iou = {}
    for store in ("fog", "random"):
        m = confusion[store].sum(0).astype(np.float64)  # (K, K) over the reported images, truth in rows
        tp, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
        iou[store] = {c: tp[c] / union[c] for c in range(len(tp)) if union[c] > 0}
        got = {int(r["class"]): float(r["iou"]) for r in table if r["store"] == store}
        assert got == pytest.approx(iou[store], abs=1e-6)  # the CSV keeps 6 digits
        assert np.mean(list(got.values())) == pytest.approx(float(selected[store]["miou"]), abs=1e-6)  # the mIoU is their mean
    # Δ and its interval: a direct bootstrap (each resample's images summed by indexing) on the same draws
    n, k = confusion["fog"].shape[0], confusion["fog"].shape[1]
    draws = np.random.default_rng(SEED).integers(0, n, (200, n))

    def class_iou(m):
        tp, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    boot = np.array(
        [class_iou(confusion["random"][d].sum(0).astype(float)) - class_iou(confusion["fog"][d].sum(0).astype(float)) for d in draws]
    )
    for c in per_class_iou(run, "fog", n_resamples=200):
        delta, low, high = c.delta["random"]
        assert delta == pytest.approx(iou["random"][c.index] - iou["fog"][c.index])
        assert (low, high) == pytest.approx(tuple(np.nanpercentile(boot[:, c.index], [2.5, 97.5])))
        assert c.delta.keys() == {"random"} and c.name == f"class {c.index}"  # the scenes record no class names
    assert len(table) == 2 * len(iou["fog"].keys() | iou["random"].keys()) and k >= 2
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<h3>Per class IoU</h3>" in page and "Δ random − fog [95% CI]" in page
    # probe compare prints the same classes (JSON: strict, no NaN) after the mIoU comparison
    capsys.readouterr()
    assert run_cli(probe_cli, "probe", ["compare", str(run), "--json"]) == 0

    def no_nan(text):
        raise ValueError(f"{text} in JSON")

    printed = json.loads(capsys.readouterr().out, parse_constant=no_nan)
    assert printed["per_class"] == [c.to_dict() for c in per_class_iou(run, "fog")]
    assert run_cli(probe_cli, "probe", ["compare", str(run)]) == 0
    assert "per class IoU (Δ: store − fog, 95% paired bootstrap interval):" in capsys.readouterr().out


def test_a_legend_of_forty_classes_stays_below_the_panels():
    """NYU's 40 classes make a 7-row legend: it gets its own room under the images, for 2 or 4 rows of them."""
    from probe.dense.report import Panel, panel_figure

    rng = np.random.default_rng(0)
    for n in (2, 4):
        truth = rng.integers(0, 40, (n, 16, 16)).astype(np.uint8)
        truth[:, :2] = 255
        p = Panel("seg", "test", np.arange(n), ["a"], {"a": rng.integers(0, 40, (n, 16, 16)).astype(np.uint8)}, truth,
                  [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)] * n, {}, [f"class {k}" for k in range(40)])  # fmt: skip
        fig = panel_figure(p)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = fig.legends[0].get_window_extent(renderer)
        assert len(fig.legends[0].get_texts()) == 41  # every class and "ignore (255)"
        lowest = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)
        assert legend.y1 <= lowest and legend.y0 >= 0  # below every panel (and its label), inside the figure


def test_lr_curves_of_depth_errors_are_on_a_log_axis(tmp_path):
    """A head blown up by a high lr (RMSE 1e16 m, finite) on a linear axis flattens every other curve to
    zero: depth errors are drawn on a log axis (the report's figure and probe fit's own PNG); seg's
    bounded mIoU stays linear."""
    from probe.dense.report import lr_figure

    def rows(metric: str, worst: float) -> list[dict]:
        return [{"store": s, "wd": 0.0, "lr": lr, "selected": lr == 0.01, metric: v, f"select_{metric}": v,
                 "select_split": "val", "report_split": "test"}
                for s in ("a", "b") for lr, v in ((1e-3, 0.6), (1e-2, 0.5), (1e-1, worst))]  # fmt: skip

    for task, metric, worst, scale in (("depth", "rmse", 1e16, "log"), ("seg", "miou", 0.01, "linear")):
        fig = lr_figure(rows(metric, worst), task)
        assert [ax.get_yscale() for ax in fig.axes[:2]] == [scale, scale]
        if scale == "log":  # the sensible heads keep most of the axis' decades apart from the blown-up one
            low, high = fig.axes[1].get_ylim()
            assert low < 0.5 and high > 1e16


def test_crop_is_torchvisions_resize_and_center_crop():
    from torchvision.transforms import InterpolationMode, v2

    from featstore.preprocess import Preprocess

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (45, 77, 3), dtype=np.uint8))
    for resize, size, interpolation, mode in (
        (40, 32, "bicubic", InterpolationMode.BICUBIC),
        (33, 33, "bilinear", InterpolationMode.BILINEAR),
    ):
        pre = Preprocess(image_size=size, resize=resize, interpolation=interpolation)
        path = f"/tmp/_crop_{resize}.png"
        image.save(path)
        expected = v2.CenterCrop(size)(v2.Resize(resize, interpolation=mode)(image))  # PIL in, PIL out
        got = _crop(path, pre)
        assert got.shape == (size, size, 3)
        np.testing.assert_array_equal(got, np.asarray(expected))


def test_palette_is_pascal_vocs_with_ignore_grey():
    p = palette()
    # VOC's colour map: background black, aeroplane (128,0,0), bicycle (0,128,0), person (192,128,128)
    assert tuple(p[0]) == (0, 0, 0) and tuple(p[1]) == (128, 0, 0) and tuple(p[2]) == (0, 128, 0) and tuple(p[15]) == (192, 128, 128)
    assert tuple(p[255]) == GREY
    depth = np.array([[0.0, 1.0], [2.0, 9.0]], np.float32)
    rgb = colour_depth(depth, 1.0, 2.0)
    assert tuple(rgb[0, 0]) == GREY  # no depth
    assert tuple(rgb[1, 1]) == tuple(rgb[1, 0])  # clipped at the row's range
    assert tuple(rgb[0, 1]) != tuple(rgb[1, 0])


# ---------------------------------------------------------------- verification of dense reads


def _damage(store, array, split):
    """Change one row's values in place through zarr: every chunk still decodes, only digests can tell."""
    import zarr

    a = zarr.open_group(str(store), mode="r+")[split][array]
    values = np.asarray(a[0:1])
    a[0:1] = (values.astype(np.float32) + 1).astype(values.dtype) if values.dtype.kind == "f" else values
    return a


@pytest.mark.slow
def test_damaged_patch_tokens_and_targets_are_named_and_refused(stores, tmp_path, capsys):
    _, paths = stores
    args = ["--task", "depth", "--depth-head", "linear", "--lr-grid", "1e-3:1e-2:2", "--epochs", "1", "--quiet"]
    for array in ("features/patch", "targets/depth"):
        store = shutil.copytree(paths["fog"], tmp_path / array.replace("/", "_"))
        _damage(store, array, "train")
        assert run_cli(featstore_cli, "featstore", ["verify", str(store)]) == 1
        out = capsys.readouterr().out
        assert f"damaged: train/{array} rows 0-" in out, out
        code = run_cli(probe_cli, "probe", ["fit", "--store", str(store), *args, "--out", str(tmp_path / f"r-{array[:4]}")])
        err = capsys.readouterr().err
        assert code != 0 and f"train/{array} rows 0-" in err and "do not match their digest" in err, err
        assert len(err.strip().splitlines()) == 1
        # --no-verify reads the changed values: the digests are what caught them
        assert (
            run_cli(probe_cli, "probe", ["fit", "--store", str(store), *args, "--no-verify", "--out", str(tmp_path / f"n-{array[:4]}")])
            == 0
        )
        capsys.readouterr()
    # a whole-store read of the patches checks every unit; a selection reads whole units around its rows
    fs = FeatureStore.open(tmp_path / "features_patch", verify=True)
    with pytest.raises(FeatstoreError, match="train/features/patch rows 0-"):
        fs.patches("train", "patch").select([1]).read()
    FeatureStore.open(tmp_path / "features_patch", verify=True).patches("val", "patch").read()  # other splits stay readable
    with pytest.raises(FeatstoreError, match="train/targets/depth"):
        read_targets(FeatureStore.open(tmp_path / "targets_depth", verify=True), "train", "depth")


# ---------------------------------------------------------------- targets in .h5 exports


@pytest.mark.slow
def test_an_h5_export_carries_the_targets_and_runs_the_same_dense_probe(stores, tmp_path, capsys):
    _, paths = stores
    h5 = tmp_path / "fog.h5"
    assert run_cli(featstore_cli, "featstore", ["export", str(paths["fog"]), "--to", str(h5)]) == 0
    zs, hs = FeatureStore.open(paths["fog"]), FeatureStore.open(h5, verify=True)
    for split in zs.splits:
        for kind in ("depth", "mask"):
            a, b = read_targets(zs, split, kind), read_targets(hs, split, kind)
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(target_valid(zs, split), target_valid(hs, split))
    capsys.readouterr()
    assert run_cli(featstore_cli, "featstore", ["verify", str(h5)]) == 0, capsys.readouterr().out
    protocol = Protocol(lr_grid="1e-3:1e-1:2", epochs=2, batch_size=8)
    a = fit_dense([str(paths["fog"])], protocol, "depth", head="linear", out=tmp_path / "from-zarr")
    b = fit_dense([str(h5)], protocol, "depth", head="linear", out=tmp_path / "from-h5")
    for ra, rb in zip(a.rows, b.rows):
        assert rb["rmse"] == pytest.approx(ra["rmse"], rel=1e-5) and rb["selected"] == ra["selected"]
    assert json.loads((tmp_path / "from-h5" / "protocol.json").read_text())["task"] == "depth"
