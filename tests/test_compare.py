"""Intervals, paired tests and comparisons of encoders (probe.intervals, probe.comparison), against
direct computations: scipy's binomtest, a plain numpy bootstrap with the same seed."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from scipy.stats import binomtest

from featstore.errors import UsageError
from probe import intervals as I
from probe.comparison import compare, fmt_interval, markdown
from probe.results import predictions as P


def numpy_bootstrap(values, n_resamples, seed, confidence=0.95):
    """The reference: one index matrix from default_rng(seed), percentiles of the resampled means."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), (n_resamples, len(v)))
    means = v[idx].mean(axis=1) * 100
    a = (1 - confidence) / 2
    return np.percentile(means, [100 * a, 100 * (1 - a)])


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(42)
    ref = rng.random(1237) < 0.78  # odd length, not a multiple of any batch size
    other = ref.copy()
    flip = rng.choice(len(ref), 160, replace=False)
    other[flip] = rng.random(160) < 0.6
    return ref, other


# ---------------------------------------------------------------- intervals


def test_bootstrap_equals_plain_numpy_bootstrap(vectors, monkeypatch):
    ref, _ = vectors
    for batch_elements in (1 << 22, 3 * len(ref) + 1):  # one batch, and many uneven batches
        monkeypatch.setattr(I, "_BATCH_ELEMENTS", batch_elements)
        got = I.bootstrap_interval(ref, n_resamples=1500, seed=7)
        np.testing.assert_allclose(got, numpy_bootstrap(ref, 1500, 7), rtol=0, atol=1e-9)
    # another seed gives another (close) interval: the seed is used
    assert not np.allclose(I.bootstrap_interval(ref, n_resamples=1500, seed=8), got)
    lo, hi = got
    assert lo < ref.mean() * 100 < hi and 2 < hi - lo < 8


def test_bootstrap_rows_share_resamples(vectors):
    ref, other = vectors
    both = I.bootstrap_interval(np.stack([ref, other]), n_resamples=1000, seed=3)
    np.testing.assert_allclose(both[0], numpy_bootstrap(ref, 1000, 3), atol=1e-9)
    np.testing.assert_allclose(both[1], numpy_bootstrap(other, 1000, 3), atol=1e-9)


def test_wilson_equals_closed_form():
    for k, n in ((83, 100), (0, 20), (20, 20), (3212, 3925)):
        z = 1.959963984540054
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        np.testing.assert_allclose(I.wilson_interval(k, n), [100 * (centre - half), 100 * (centre + half)], atol=1e-9)
    assert all(np.isnan(I.wilson_interval(0, 0)))


def test_mcnemar_and_paired_difference_equal_direct_computation(vectors):
    ref, other = vectors
    n01 = int(np.sum(other & ~ref))
    n10 = int(np.sum(~other & ref))
    assert n01 > 0 and n10 > 0
    test = I.mcnemar(other, ref)
    assert (test.n01, test.n10) == (n01, n10)
    assert test.p == binomtest(n01, n01 + n10, 0.5).pvalue
    d = I.paired_difference(other, ref, n_resamples=1200, seed=11)
    assert d.delta == pytest.approx((other.mean() - ref.mean()) * 100, abs=1e-12)
    diff = other.astype(float) - ref.astype(float)
    np.testing.assert_allclose(d.ci95, numpy_bootstrap(diff, 1200, 11), atol=1e-9)
    # the paired interval is narrower than the unpaired one would be (the encoders agree on most images)
    unpaired = np.hypot(*(np.diff(numpy_bootstrap(v, 1200, 11)) for v in (ref, other)))
    assert d.ci95[1] - d.ci95[0] < 0.7 * unpaired


def test_identical_predictions_give_zero_difference_and_p_one(vectors):
    ref, _ = vectors
    d = I.paired_difference(ref, ref.copy())
    assert d.delta == 0.0 and d.ci95 == (0.0, 0.0)
    assert (d.test.n01, d.test.n10, d.test.p) == (0, 0, 1.0)


def test_exact_discordant_counts():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 10, 500)
    ref_pred = target.copy()
    ref_pred[:100] = (target[:100] + 1) % 10  # the reference misses images 0..99
    pred = ref_pred.copy()
    pred[[3, 17, 42]] = target[[3, 17, 42]]  # the store gets 3 of those right
    pred[[200, 201, 300, 400, 499]] = (target[[200, 201, 300, 400, 499]] + 2) % 10  # and misses 5 others
    pred[[5, 6]] = (target[[5, 6]] + 3) % 10  # both wrong, differently: not discordant
    test = I.mcnemar(pred == target, ref_pred == target)
    assert (test.n01, test.n10) == (3, 5)
    assert test.p == pytest.approx(binomtest(3, 8).pvalue)


@pytest.mark.slow
def test_interval_coverage_of_a_known_accuracy():
    """A 'classifier' of accuracy p on n images, 600 draws: the 95% intervals contain p 93–97% of the time."""
    p, n, draws = 0.83, 800, 600
    correct = np.random.default_rng(2024).random((draws, n)) < p
    boot = I.bootstrap_interval(correct, n_resamples=1000, seed=1)  # every draw at once (shared resamples)
    covered = (boot[:, 0] <= 100 * p) & (100 * p <= boot[:, 1])
    assert 0.93 <= covered.mean() <= 0.97, covered.mean()
    # the same with each draw bootstrapped on its own, for a few draws: identical to the batched rows
    for i in (0, 1, 599):
        np.testing.assert_allclose(I.bootstrap_interval(correct[i], n_resamples=1000, seed=1), boot[i], atol=1e-9)
    wilson = np.array([I.wilson_interval(int(k), n) for k in correct.sum(axis=1)])
    covered = (wilson[:, 0] <= 100 * p) & (100 * p <= wilson[:, 1])
    assert 0.93 <= covered.mean() <= 0.97, covered.mean()


def test_per_class_difference_sorted_and_exact():
    target = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    ref = np.array([1, 1, 0, 0, 1, 1, 1, 1, 1, 1], bool)
    ours = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], bool)
    diffs = I.per_class_difference(target, ours, ref)
    assert [(d.target, d.n, d.top1, d.top1_reference, d.delta) for d in diffs] == [
        (0, 4, 100.0, 50.0, 50.0), (2, 4, 100.0, 100.0, 0.0), (1, 2, 50.0, 100.0, -50.0)
    ]  # fmt: skip


# ---------------------------------------------------------------- comparisons of prediction sets


def preds(label, pred, target, paths=None, view="pool", seed=0, method="linear"):
    paths = paths if paths is not None else [f"val/{i:05d}.jpg" for i in range(len(target))]
    return P.Predictions(label, f"{label}.zarr", view, method, "", seed, paths, target, pred)


@pytest.fixture(scope="module")
def three_encoders():
    rng = np.random.default_rng(5)
    target = rng.integers(0, 10, 900)
    a = np.where(rng.random(900) < 0.7, target, (target + 1) % 10)
    b = a.copy()
    gains = np.flatnonzero(a != target)[:40]
    b[gains] = target[gains]  # b: 40 more right, nothing lost
    c = a.copy()
    return target, a, b, c


def test_no_image_in_common_is_no_test():
    """A store sharing no image with the reference has no Δ and no McNemar test: not a p of 1, and
    not one more test in Holm's family (which would double the other store's adjusted p)."""
    n, target = 200, np.zeros(200, int)
    pred = {"a": np.r_[np.ones(40, int), np.zeros(160, int)], "b": np.zeros(n, int), "c": np.zeros(n, int)}
    names = {"a": "x", "b": "y", "c": "x"}  # b's images are other images
    result = compare([P.Predictions(k, "s", "pool", "linear", "", 0, [f"{names[k]}{i}" for i in range(n)], target, pred[k]) for k in "abc"])
    b, c = (next(r for r in result.rows if r.label == k) for k in "bc")
    assert b.n_paired == 0 and b.delta is None and b.mcnemar_p is None and b.mcnemar_p_holm is None
    assert c.n_paired == 200 and c.delta == pytest.approx(20.0) and c.mcnemar_p_holm == c.mcnemar_p  # a family of one
    assert c.mcnemar_p == pytest.approx(2 * 0.5**40)  # n01 = 40, n10 = 0: exact two-sided binomial
    assert "no image in common with a" in markdown(result)


def test_compare_against_reference(three_encoders):
    target, a, b, c = three_encoders
    # b's images in another order, and one image missing: pairs go by path
    order = np.random.default_rng(1).permutation(900)[:-1]
    paths = np.array([f"val/{i:05d}.jpg" for i in range(900)])
    comp = compare(
        [preds("a", a, target), preds("b", b[order], target[order], paths[order], view="cls"), preds("c", c, target)],
        class_names=[f"class{i}" for i in range(10)],
    )
    ra, rb, rc = comp.rows
    assert comp.reference == "a" and ra.is_reference and ra.delta is None
    assert rb.reference_view == "pool" and rb.n == 899 and rb.n_paired == 899
    assert rb.n01 == 40 - (order[-1] in np.flatnonzero(a != target)[:40]) and rb.n10 == 0
    keep = np.sort(order)
    assert rb.delta == pytest.approx(((b[keep] == target[keep]).mean() - (a[keep] == target[keep]).mean()) * 100)
    assert rb.mcnemar_p == pytest.approx(binomtest(rb.n01, rb.n01, 0.5).pvalue) and rb.mcnemar_p < 1e-10
    assert rb.delta_ci95[0] > 0  # all gains: the interval excludes 0
    assert (rc.delta, rc.delta_ci95, rc.n01, rc.n10, rc.mcnemar_p) == (0.0, (0.0, 0.0), 0, 0, 1.0)
    np.testing.assert_allclose(ra.ci95, numpy_bootstrap(a == target, comp.n_resamples, comp.bootstrap_seed), atol=1e-9)
    # per class: b gains exactly on the classes of the images it fixed
    classes_b = comp.per_class[1].classes
    assert sum(d.delta * d.n for d in classes_b) == pytest.approx(rb.n01 * 100)
    assert [d.delta for d in classes_b] == sorted((d.delta for d in classes_b), reverse=True)

    doc = json.loads(json.dumps(comp.to_json()))
    assert doc["reference"] == "a"
    row = doc["rows"][1]
    for key in ("label", "view", "method", "shots", "top1", "ci95", "delta", "delta_ci95", "n01", "n10", "mcnemar_p"):
        assert key in row
    assert doc["per_class"]["b"][0]["classes"][0]["name"].startswith("class")

    text = markdown(comp)
    assert "| b | cls | linear | all | 899 |" in text and "vs pool" in text and "reference" in text


def test_compare_reference_choice_and_errors(three_encoders):
    target, a, b, _ = three_encoders
    comp = compare([preds("a", a, target), preds("b", b, target)], reference="b")
    assert comp.rows[0].delta < 0 and comp.rows[0].n10 == 40 and comp.rows[1].is_reference
    with pytest.raises(UsageError, match="no store labelled 'z'"):
        compare([preds("a", a, target)], reference="z")
    with pytest.raises(UsageError, match="two prediction sets"):
        compare([preds("a", a, target), preds("a", b, target)])


def test_seeds_give_per_seed_differences(three_encoders):
    target, a, b, _ = three_encoders
    sets = []
    for seed in (0, 1, 2):
        flip = np.random.default_rng(seed).choice(900, 30, replace=False)
        bs = b.copy()
        bs[flip] = (target[flip] + 3) % 10
        sets += [preds("a", a, target, seed=seed), preds("b", bs, target, seed=seed)]
    comp = compare(sets)
    (summary_b,) = [s for s in comp.seeds if s.label == "b"]
    per_seed = [r.delta for r in comp.rows if r.label == "b"]
    assert summary_b.seeds == [0, 1, 2] and summary_b.delta_per_seed == per_seed
    assert summary_b.delta_mean == pytest.approx(np.mean(per_seed)) and summary_b.delta_std == pytest.approx(np.std(per_seed, ddof=1))
    # the seed-mean difference's interval: per-image differences summed over seeds, bootstrapped over images
    d = sum((s.pred == s.target).astype(int) - (r.pred == r.target).astype(int) for r, s in zip(sets[0::2], sets[1::2]))
    np.testing.assert_allclose(summary_b.delta_mean_ci95, numpy_bootstrap(d / 3, comp.n_resamples, comp.bootstrap_seed), atol=1e-9)
    assert summary_b.delta_mean_ci95[0] < summary_b.delta_mean < summary_b.delta_mean_ci95[1]
    assert "Δ mean ± std" in markdown(comp)


def test_predictions_csv_round_trip(tmp_path, three_encoders):
    target, a, b, _ = three_encoders
    top5 = np.stack([a, (a + 1) % 10, (a + 2) % 10, (a + 3) % 10, (a + 4) % 10], axis=1)
    sets = [
        P.Predictions("a", "a.zarr", "pool", "linear", "", 0, [f"val/{i}.jpg" for i in range(900)], target, a, top5),
        preds("b", b, target, seed=3),
    ]
    P.write(sets, tmp_path / P.PREDICTIONS)
    header = (tmp_path / P.PREDICTIONS).read_text().splitlines()[:2]
    assert header[0] == "label,store,view,method,shots,seed,path,target,pred,correct,top5"
    assert header[1] == f"a,a.zarr,pool,linear,,0,val/0.jpg,{target[0]},{a[0]},{int(a[0] == target[0])},{' '.join(map(str, top5[0]))}"
    back = P.read(tmp_path / P.PREDICTIONS)
    assert [p.key for p in back] == [p.key for p in sets]
    for p, q in zip(back, sets):
        assert (p.paths == q.paths).all() and (p.pred == q.pred).all() and (p.target == q.target).all()
    assert (back[0].top5 == top5).all() and back[1].top5 is None


def test_fmt_interval():
    assert fmt_interval(83.44, (82.61, 84.08)) == "83.4 [82.6, 84.1]"
    assert fmt_interval(0.4, (-0.31, 1.1), signed=True) == "+0.4 [-0.3, +1.1]"
    assert fmt_interval(None, None) == "—"


# ---------------------------------------------------------------- results folders: probe compare, probe report

LRS = (1e-3, 1e-2, 1e-1)


def results_folder(folder, encoders: dict, *, protocol=None, manifest="m" * 64, report_split="test", classes=10):
    """A probe fit results folder: results.csv (3 LRs per encoder), protocol.json, predictions.csv.

    ``encoders``: label → (target, pred); the middle LR is the selected head, scored by ``pred``.
    """
    import probe.output.files
    import probe.output.tables
    from probe.protocol import Protocol

    protocol = protocol or Protocol(lr_grid=LRS, epochs=3)
    folder.mkdir(parents=True)
    rows, sets = [], []
    for label, (target, pred) in encoders.items():
        top1 = float((pred == target).mean() * 100)
        for lr in LRS:
            row = {c: None for c in probe.COLUMNS}
            row.update(
                label=label,
                store=f"/stores/{label}",
                encoder="resnet18",
                dataset="imagenette",
                view="pool",
                lr=lr,
                wd=0.0,
                seed=0,
                report_split=report_split,
                reported_as=report_split,
                select_split="val",
                n_report=len(target),
                selected=lr == LRS[1],
                best_report=lr == LRS[1],
                select_top1_pct=top1 - abs(float(np.log10(lr)) + 2) * 5,
                report_top1_pct=top1 - abs(float(np.log10(lr)) + 2) * 7,
                protocol_hash=protocol.hash,
            )
            rows.append(row)
        paths = [f"val/{i:05d}.jpg" for i in range(len(target))]
        sets.append(P.Predictions(label, f"/stores/{label}", "pool", "linear", "", 0, paths, target, pred))
    (folder / "results.csv").write_text(probe.output.files.csv_text(rows))
    dataset = {"name": "imagenette", "manifest_sha256": manifest, "class_names": [f"n{c:08d}" for c in range(classes)]}
    (folder / "protocol.json").write_text(probe.output.files.protocol_json(protocol, {"dataset": dataset}))
    P.write(sets, folder / P.PREDICTIONS)
    return folder


def run_probe(args):
    from click.testing import CliRunner

    from probe.cli import main

    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_probe_compare_command(tmp_path, three_encoders):
    target, a, b, _ = three_encoders
    folder = results_folder(tmp_path / "run", {"r18": (target, a), "r50": (target, b)})
    code, out = run_probe(["compare", str(folder)])
    assert code == 0, out
    assert "| r50 | pool | linear | all | 900 |" in out and "/ 0 |" in out and "per class, linear: r50 [pool] vs r18 [pool]" in out
    code, out = run_probe(["compare", str(folder), "--json", "--reference", "r50"])
    doc = json.loads(out)
    assert doc["reference"] == "r50"
    (row,) = [r for r in doc["rows"] if r["label"] == "r18"]
    assert (row["n01"], row["n10"]) == (0, 40) and row["delta"] == pytest.approx(-40 / 9) and row["mcnemar_p"] < 1e-10
    assert doc["per_class"]["r18"][0]["classes"][-1]["name"].startswith("n0000")
    code, out = run_probe(["compare", str(folder), "--reference", "vit"])
    assert code == 2 and out.count("error:") == 1 and "no store labelled 'vit'" in out and "r18, r50" in out
    (folder / P.PREDICTIONS).unlink()
    code, out = run_probe(["compare", str(folder)])
    assert code == 2 and "holds no predictions.csv" in out and "Traceback" not in out
    code, out = run_probe(["compare", str(tmp_path / "nowhere")])
    assert code == 2 and "not found" in out


def parse_report(path):
    """Every <figure> of report.html: (id, decoded PNG bytes, caption)."""
    import base64
    from html.parser import HTMLParser

    class Figures(HTMLParser):
        def __init__(self):
            super().__init__()
            self.figures, self.current, self.in_caption, self.tables = [], None, False, 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "figure":
                self.current = {"id": a.get("id"), "png": None, "caption": ""}
            elif tag == "img" and self.current is not None:
                assert a["src"].startswith("data:image/png;base64,")  # embedded: the page is self-contained
                self.current["png"] = base64.b64decode(a["src"].split(",", 1)[1])
            elif tag == "figcaption":
                self.in_caption = True
            elif tag == "table":
                self.tables += 1

        def handle_endtag(self, tag):
            if tag == "figure":
                self.figures.append(self.current)
                self.current = None
            elif tag == "figcaption":
                self.in_caption = False

        def handle_data(self, data):
            if self.in_caption:
                self.current["caption"] += data

    parser = Figures()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.mark.slow
def test_probe_report_html_has_every_figure(tmp_path, three_encoders):
    from PIL import Image

    target, a, b, c = three_encoders
    run1 = results_folder(tmp_path / "run1", {"r18": (target, a), "r50": (target, b)})
    run2 = results_folder(tmp_path / "run2", {"vit": (target, c)})
    code, out = run_probe(["report", str(run1), str(run2), "--out", str(tmp_path / "rep")])
    assert code == 0, out
    rep = tmp_path / "rep"
    assert sorted(p.name for p in rep.iterdir()) == ["leaderboard.csv", "leaderboard.md", "report.html"]
    page = parse_report(rep / "report.html")
    ids = [f["id"] for f in page.figures]
    # LR curves, forest plot, and one per-class panel per store that is not the reference
    assert ids == ["g1-lr", "g1-forest", "g1-class-1", "g1-class-2"], ids
    for f in page.figures:
        img = Image.open(io.BytesIO(f["png"]))
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 150 and f["caption"]
    assert page.tables == 1
    text = (rep / "report.html").read_text()
    assert "protocol_hash" in text and "lr_grid" in text  # the protocol record
    import csv as csv_mod

    board = list(csv_mod.DictReader(open(rep / "leaderboard.csv")))
    assert [r["label"] for r in board] == ["r50", "r18", "vit"]  # best first
    assert board[1]["reference"] == "r18" and board[0]["n01"] == "40" and float(board[2]["delta"]) == 0  # "0.0": results.csv's cell rule
    assert float(board[0]["ci95_low"]) < float(board[0]["top1"]) < float(board[0]["ci95_high"])
    assert "| 1 | r50 |" in out


@pytest.mark.slow
def test_probe_report_refuses_mixed_results(tmp_path, three_encoders):
    from probe.protocol import Protocol

    target, a, b, _ = three_encoders
    base = results_folder(tmp_path / "base", {"r18": (target, a)})
    other_protocol = results_folder(tmp_path / "p", {"r50": (target, b)}, protocol=Protocol(lr_grid=LRS, epochs=4))
    other_data = results_folder(tmp_path / "d", {"r50": (target, b)}, manifest="x" * 64)
    other_split = results_folder(tmp_path / "s", {"r50": (target, b)}, report_split="val")
    for folder, field in ((other_protocol, "protocol"), (other_data, "dataset"), (other_split, "report split")):
        code, out = run_probe(["report", str(base), str(folder), "--out", str(tmp_path / "rep")])
        assert code == 2 and out.count("error:") == 1 and f"differ in {field} (" in out and "--allow-mixed" in out, out
        # only the protocol fields that differ, not the hashes
        assert ("differ in protocol (epochs 3 vs 4)" in out) == (field == "protocol"), out
        assert not (tmp_path / "rep").exists()  # nothing written
    code, out = run_probe(["report", str(base), str(other_protocol), str(other_data), "--out", str(tmp_path / "rep"), "--allow-mixed"])
    assert code == 0, out
    assert "### group 1: LR sweep 0.001…0.1 (3)" in out and "### group 2: LR sweep 0.001…0.1 (3); epochs 4" in out, out
    assert "### group 3: LR sweep 0.001…0.1 (3); epochs 3; manifest xxxxxxxxxxxx" in out
    board = list(csv.DictReader(open(tmp_path / "rep" / "leaderboard.csv")))
    assert [(r["group"], r["label"], r["rank"]) for r in board] == [("1", "r18", "1"), ("2", "r50", "1"), ("3", "r50", "1")]
    assert "3 groups (--allow-mixed): the results differ in protocol and dataset (" in (tmp_path / "rep" / "report.html").read_text()
    assert "3 groups, ranked separately (--allow-mixed): the results differ in protocol and dataset" in out


def test_same_label_in_two_runs_is_told_apart(tmp_path, three_encoders):
    target, a, b, _ = three_encoders
    run1 = results_folder(tmp_path / "monday", {"r18": (target, a)})
    run2 = results_folder(tmp_path / "tuesday", {"r18": (target, b)})
    from probe.output import leaderboard

    (g,) = leaderboard.gather([run1, run2])
    assert [e.label for e in g.entries] == ["monday/r18", "tuesday/r18"]
    assert g.comparison.rows[1].n01 == 40


def test_predict_agrees_with_logits_and_evaluate():
    import torch

    from probe.methods import heads as H

    g = torch.Generator().manual_seed(0)
    heads = H.LinearHeads(16, 12, [1e-3, 1e-2, 1e-1], [0.0, 0.0, 0.0])
    heads.w.copy_(torch.randn(heads.w.shape, generator=g))
    heads.b.copy_(torch.randn(heads.b.shape, generator=g))
    x = torch.randn(301, 16, generator=g)
    y = torch.randint(0, 12, (301,), generator=g)
    top = H.predict(heads, x).numpy()
    assert top.shape == (301, 3, 5)
    logits = (x.double() @ heads.weight.double() + heads.bias.double()[:, None, :]).numpy()  # (H, N, C)
    ranked = np.argsort(-logits, axis=-1)[..., :5].transpose(1, 0, 2)
    assert (top == ranked).all()
    acc = H.evaluate(heads, x, y)
    np.testing.assert_allclose(acc["top1"], (top[:, :, 0] == y.numpy()[:, None]).mean(0) * 100)
    np.testing.assert_allclose(acc["top5"], (top == y.numpy()[:, None, None]).any(-1).mean(0) * 100)
    from_ranked = H.accuracy(H.predict(heads, x), y, 12)  # what probe fit reads off the reported split's ranking
    assert from_ranked.keys() == acc.keys() and all(np.array_equal(from_ranked[k], acc[k]) for k in acc)
    assert H.predict(H.LinearHeads(16, 3, [0.1], [0.0]), x).shape == (301, 1, 3)  # k capped at the class count


def test_tiny_sets_give_null_intervals_in_json():
    comp = compare([preds("a", np.array([1]), np.array([1])), preds("b", np.array([0]), np.array([1]))])
    doc = json.loads(json.dumps(comp.to_json(), allow_nan=False))
    assert doc["rows"][1]["ci95"] == [None, None] and doc["rows"][1]["delta"] == -100.0 and doc["rows"][1]["n10"] == 1


def test_report_of_results_without_predictions_uses_wilson(tmp_path, three_encoders):
    from probe.output import leaderboard

    target, a, b, _ = three_encoders
    old = results_folder(tmp_path / "old", {"r18": (target, a), "r50": (target, b)})
    (old / P.PREDICTIONS).unlink()
    (g,) = leaderboard.gather([old])
    assert g.comparison is None
    rows = leaderboard.table_rows([g])
    top1 = rows[0]["top1"]
    k = round(top1 * 900 / 100)
    assert (rows[0]["wilson95_low"], rows[0]["wilson95_high"]) == I.wilson_interval(k, 900)
    assert rows[0]["ci95_low"] is None and rows[0]["delta"] is None
    assert "— (no predictions)" in leaderboard.markdown([g], rows)


# ---------------------------------------------------------------- probe fit writes what compare reads


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """probe fit on two digits 'encoders' (pixels, and pixels with a quarter of them zeroed), one run folder."""
    import probe
    from tests.test_probe import FAST, digits_splits, make_store

    d = digits_splits()
    blurred = {k: (x * (np.arange(64) % 4 != 0), y, i) for k, (x, y, i) in d.items()}
    root = tmp_path_factory.mktemp("fit")
    a = make_store(root / "pixels.zarr", d)
    b = make_store(root / "sparse.zarr", blurred)
    rows = probe.fit(
        [f"pix={a}", f"sparse={b}"], probe.Protocol(lr_grid="1e-3,1e-2,1e-1", **FAST), device="cpu", out=root / "run", warn=lambda m: None
    )
    return root / "run", rows, d


@pytest.mark.slow
def test_fit_writes_predictions_and_intervals(fitted):
    run, rows, d = fitted
    sel = [r for r in rows if r["selected"]]
    back = P.read(run / P.PREDICTIONS)
    assert [(p.label, p.view, p.method, p.shots, p.seed) for p in back] == [
        ("pix", "pixels", "linear", "", 0),
        ("sparse", "pixels", "linear", "", 0),
    ]
    test_ids = d["test"][2]
    for p, r in zip(back, sel):
        # one row per report-split image, in the store's order, scored as results.csv reports it
        assert list(p.paths) == [f"{int(i)}.png" for i in test_ids] and (p.target == d["test"][1]).all()
        assert p.correct.mean() * 100 == pytest.approx(r["report_top1_pct"], abs=1e-4)
        assert (p.top5[:, 0] == p.pred).all() and (
            (p.top5 == p.target[:, None]).any(1).mean() * 100 == pytest.approx(r["report_top5_pct"], abs=1e-4)
        )
        np.testing.assert_allclose([r["ci95_low"], r["ci95_high"]], numpy_bootstrap(p.correct, I.N_RESAMPLES, I.BOOTSTRAP_SEED), atol=1e-4)
        assert (r["wilson95_low"], r["wilson95_high"]) == pytest.approx(I.wilson_interval(int(p.correct.sum()), len(p.correct)), abs=1e-4)
    others = [r for r in rows if not r["selected"]]
    assert all(r["ci95_low"] is None and r["wilson95_low"] is not None for r in others)  # Wilson everywhere, bootstrap on the selected rows
    assert [(p.label, p.paths.tolist()) for p in P.of_rows(rows)] == [(p.label, p.paths.tolist()) for p in back]
    written = list(csv.DictReader(open(run / "results.csv")))
    assert float(written[0]["wilson95_low"]) == rows[0]["wilson95_low"]
    record = json.loads((run / "protocol.json").read_text())
    assert record["run"]["dataset"]["manifest_sha256"] == "digits-manifest" and len(record["run"]["dataset"]["class_names"]) == 10


def test_fit_table_and_compare_agree(fitted):
    import probe.output.files
    import probe.output.tables

    run, rows, _ = fitted
    table = probe.output.tables.markdown_table(rows)
    code, out = run_probe(["compare", str(run), "--json"])
    assert code == 0, out
    doc = json.loads(out)
    (row,) = [r for r in doc["rows"] if r["label"] == "sparse"]
    assert doc["reference"] == "pix" and row["n"] == 360
    assert f"{row['delta']:+.2f} [{row['delta_ci95'][0]:+.2f}, {row['delta_ci95'][1]:+.2f}]" in table
    assert "Δ vs pix [95% CI]" in table and "| reference |" in table
    sel = next(r for r in rows if r["selected"] and r["label"] == "sparse")
    assert f"{sel['report_top1_pct']:.2f} [{sel['ci95_low']:.2f}, {sel['ci95_high']:.2f}]" in table


def test_labels_that_look_like_numbers_stay_labels(tmp_path):
    """Stores labelled "0" and "1e3": results.csv read back keeps them as text (was: 0 → the folder's
    name, 1e3 → 1000.0, and probe report failing on a TypeError with several methods and seeds)."""
    import probe
    from probe.results.runs import load
    from tests.test_probe import FAST, digits_splits, make_store

    d = digits_splits()
    a = make_store(tmp_path / "pixels.zarr", d)
    b = make_store(tmp_path / "sparse.zarr", {k: (x * (np.arange(64) % 4 != 0), y, i) for k, (x, y, i) in d.items()})
    protocol = probe.Protocol(lr_grid="1e-2,1e-1", methods=("linear", "knn"), seeds=(0, 1), **FAST)
    probe.fit([f"0={a}", f"1e3={b}"], protocol, device="cpu", out=tmp_path / "run", warn=lambda m: None)
    assert {r["label"] for r in load(tmp_path / "run").rows} == {"0", "1e3"}
    code, out = run_probe(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--reference", "1e3"])
    assert code == 0, out
    board = list(csv.DictReader(open(tmp_path / "rep" / "leaderboard.csv")))
    assert {r["label"] for r in board} == {"0", "1e3"} and len(board) == 4


@pytest.mark.slow
def test_predictions_follow_what_is_reported(tmp_path):
    """--select-on report: predictions on the reported (= selection) split; a single split with
    nothing reported: no predictions, and probe compare says why."""
    import probe
    from tests.test_probe import FAST, digits_splits, make_store

    d = digits_splits()
    store = make_store(tmp_path / "s.zarr", d)
    rows = probe.fit([str(store)], probe.Protocol(lr_grid="1e-2,1e-1", select_on="report", **FAST), device="cpu", warn=lambda m: None)
    (sel,) = [r for r in rows if r["selected"]]
    (p,) = P.of_rows(rows)
    assert len(p.paths) == sel["n_report"] and p.correct.mean() * 100 == pytest.approx(sel["report_top1_pct"], abs=1e-4)
    assert list(p.paths) == [f"{int(i)}.png" for i in d[sel["report_split"]][2]]

    only = make_store(tmp_path / "all.zarr", {"all": d["train"]}, manifest="m3")
    rows = probe.fit([str(only)], probe.Protocol(lr_grid="1e-2,1e-1", **FAST), device="cpu", out=tmp_path / "run", warn=lambda m: None)
    assert all(r.get("report_predictions") is None and r["ci95_low"] is None and r["wilson95_low"] is None for r in rows)
    assert (tmp_path / "run" / P.PREDICTIONS).read_text().splitlines() == [",".join(P.COLUMNS)]
    code, out = run_probe(["compare", str(tmp_path / "run")])
    assert code == 2 and "reported no split" in out


def test_probe_report_errors(tmp_path, three_encoders):
    target, a, _, _ = three_encoders
    run = results_folder(tmp_path / "run", {"r18": (target, a)})
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    for args, needle in (
        ([str(tmp_path / "nowhere")], "not found"),
        ([str(tmp_path / "empty")], "holds no results.csv"),
        ([str(run), str(run)], "given twice"),
        ([str(run), "--out", str(tmp_path / "afile")], "is a file"),
        ([str(run), "--reference", "vit", "--out", str(tmp_path / "rep")], "no store labelled 'vit'"),
    ):
        code, out = run_probe(["report", *args])
        assert code == 2 and out.count("error:") == 1 and needle in out and "Traceback" not in out, (args, out)
    assert not (tmp_path / "rep").exists()


def test_bootstrap_of_counts_over_seeds():
    """Per-image counts of correct seeds (0..S) bootstrapped over images: the interval of the seed-mean accuracy."""
    counts = np.random.default_rng(3).integers(0, 4, 777)
    got = I.bootstrap_interval(counts, per=3, n_resamples=1000, seed=2)
    np.testing.assert_allclose(got, numpy_bootstrap(counts / 3, 1000, 2), atol=1e-9)
    with pytest.raises(ValueError):
        I.bootstrap_interval(counts, per=2)


@pytest.mark.slow
def test_battery_predictions_summary_and_comparison(tmp_path):
    """linear, k-NN and logreg over two seeds on two stores: every selected configuration's
    predictions in predictions.csv, summary intervals over seeds, the comparison per seed."""
    import probe
    from tests.test_probe import digits_splits, make_store

    d = digits_splits()
    a = make_store(tmp_path / "pixels.zarr", d)
    b = make_store(tmp_path / "sparse.zarr", {k: (x * (np.arange(64) % 4 != 0), y, i) for k, (x, y, i) in d.items()})
    protocol = probe.Protocol(
        methods="linear,knn,logreg", seeds="0,1", lr_grid="1e-2,0.1", epochs=3, batch_size=128, knn_k="1,5,20", logreg_C="1e-3:10:5"
    )
    rows = probe.fit([f"pix={a}", f"sparse={b}"], protocol, device="cpu", out=tmp_path / "run", warn=lambda m: None)
    back = P.read(tmp_path / "run" / P.PREDICTIONS)
    assert sorted((p.label, p.method, p.seed) for p in back) == sorted(
        (l, m, s) for l in ("pix", "sparse") for m in ("linear", "knn", "logreg") for s in (0, 1)
    )
    selected = {(r["label"], r["method"], r["seed"]): r for r in rows if r["selected"]}
    for p in back:
        r = selected[(p.label, p.method, p.seed)]
        assert p.correct.mean() * 100 == pytest.approx(r["report_top1_pct"], abs=1e-3) and p.top5 is not None
        np.testing.assert_allclose([r["ci95_low"], r["ci95_high"]], numpy_bootstrap(p.correct, I.N_RESAMPLES, I.BOOTSTRAP_SEED), atol=1e-3)
    summary = list(csv.DictReader(open(tmp_path / "run" / "summary.csv")))
    for s in summary:
        label = "pix" if s["store"].endswith("pixels.zarr") else "sparse"
        per_seed = [p for p in back if (p.label, p.method) == (label, s["method"])]
        expected = numpy_bootstrap(sum(p.correct.astype(int) for p in per_seed) / 2, I.N_RESAMPLES, I.BOOTSTRAP_SEED)
        np.testing.assert_allclose([float(s["ci95_low"]), float(s["ci95_high"])], expected, atol=1e-3)
    code, out = run_probe(["compare", str(tmp_path / "run"), "--json"])
    doc = json.loads(out)
    knn = [r for r in doc["rows"] if r["label"] == "sparse" and r["method"] == "knn"]
    assert [r["seed"] for r in knn] == [0, 1] and all(r["delta"] is not None for r in knn)
    (s,) = [s for s in doc["seeds"] if s["label"] == "sparse" and s["method"] == "knn"]
    assert s["delta_per_seed"] == [r["delta"] for r in knn] and s["delta_mean"] == pytest.approx(np.mean(s["delta_per_seed"]))
    import probe.output.files
    import probe.output.tables

    table = probe.output.tables.markdown_table(rows)
    assert "Δ vs pix [95% CI]" in table and "over 2 seeds" in table
    # the leaderboard names each row's selected configuration: lr, k or C, as the run chose it
    from probe.output import leaderboard

    (g,) = leaderboard.gather([tmp_path / "run"])
    board = leaderboard.table_rows([g], per_seed=True)  # the default table is over seeds: "lr 0.1 ×2"
    for r in board:
        chosen = selected[(r["label"], r["method"], r["seed"])]
        expected = {
            "linear": lambda: f"lr {chosen['lr']:g}",
            "knn": lambda: f"k {chosen['k']}",
            "logreg": lambda: f"C {chosen['C']:g} (refit)",
        }[r["method"]]()
        assert r["selected"] == expected
    assert "| selected |" in leaderboard.markdown([g], board) and {r["method"] for r in board} == {"linear", "knn", "logreg"}


def test_leaderboard_over_seeds_names_no_single_lr_when_the_seeds_chose_different_ones(tmp_path, three_encoders):
    """leaderboard.csv's lr column of a row merged over seeds: the seeds' common lr, empty when they
    chose different ones (was seed 0's, as if every seed had used it)."""
    import probe.output.files
    from probe.output import leaderboard
    from probe.results.runs import load

    target, a, b, _ = three_encoders
    folder = results_folder(tmp_path / "run", {"r18": (target, a), "r50": (target, b)})
    rows = load(folder).rows
    for r in list(rows):  # seed 1: r18 selects lr 0.1 instead of 0.01, r50 the same lr again
        moved = r["label"] == "r18"
        rows.append({**r, "seed": 1, "selected": r["lr"] == (LRS[2] if moved else LRS[1])})
    (folder / "results.csv").write_text(probe.output.files.csv_text(rows))
    sets = P.read(folder / P.PREDICTIONS)
    P.write(sets + [P.Predictions(p.label, p.store, p.view, p.method, p.shots, 1, p.paths, p.target, p.pred) for p in sets],
            folder / P.PREDICTIONS)  # fmt: skip
    (g,) = leaderboard.gather([folder])
    board = {r["label"]: r for r in leaderboard.table_rows([g])}
    assert board["r18"]["n_seeds"] == 2 and board["r18"]["lr"] is None and board["r18"]["selected"] == "lr 0.01 ×1; lr 0.1 ×1"
    assert board["r50"]["n_seeds"] == 2 and board["r50"]["lr"] == LRS[1] and board["r50"]["selected"] == "lr 0.01 ×2"


def test_rows_with_predictions_compare_equal():
    a = P.ImagePredictions(paths=np.array(["x", "y"]), target=np.array([0, 1]), pred=np.array([0, 0]), top5=None)
    b = P.ImagePredictions(paths=np.array(["x", "y"]), target=np.array([0, 1]), pred=np.array([0, 0]), top5=None)
    assert {"lr": 0.1, "report_predictions": a} == {"lr": 0.1, "report_predictions": b}
    b["pred"] = np.array([0, 1])
    assert a != b and a["pred"].shape == (2,)


def test_report_names_the_report_split_not_its_description(tmp_path, three_encoders):
    """probe report's titles say "on the test split", not the reported_as phrase of results.csv."""
    import csv as csv_mod

    from probe.output import leaderboard

    target, a, b, _ = three_encoders
    folder = results_folder(tmp_path / "run", {"r18": (target, a), "r50": (target, b)})
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv_mod.DictReader(f))
    for r in rows:
        r["reported_as"] = "test (reported; selection on val)"  # as probe fit writes it
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv_mod.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (g,) = leaderboard.gather([folder])
    assert g.fields["report split"] == "test" and g.runs[0].report_splits == ["test"]
    table = leaderboard.markdown([g], leaderboard.table_rows([g]))
    assert "top-1 in percent on the test split, ranked within each method;" in table and "(reported; selection on val)" not in table


def test_report_html_per_class_heading_only_with_something_under_it(tmp_path, three_encoders):
    """A single store has no per-class chart against a reference: no empty "Per class" heading."""
    from probe.output import leaderboard
    from probe.output.html import render

    target, a, b, _ = three_encoders
    for name, encoders, charts in (("one", {"r18": (target, a)}, 0), ("two", {"r18": (target, a), "r50": (target, b)}, 1)):
        groups = leaderboard.gather([results_folder(tmp_path / name, encoders)])
        page = render(groups, leaderboard.table_rows(groups))
        assert page.count("<h3>Per class, against the reference</h3>") == charts and page.count('id="g1-class-') == charts, name


def test_markdown_per_class_titles_name_the_probe(three_encoders):
    """Two per-class tables of one store (linear and k-NN, or two shot counts) must not read the same."""
    from probe.comparison import compare, markdown

    target, a, b, _ = three_encoders
    paths = [f"val/{i:05d}.jpg" for i in range(len(target))]
    sets = [
        P.Predictions(label, f"/s/{label}", "pool", method, shots, 0, paths, target, pred)
        for method, shots in (("linear", ""), ("knn", ""), ("knn", "5"))
        for label, pred in (("r18", a), ("r50", b))
    ]
    titles = [line for line in markdown(compare(sets, n_resamples=200)).splitlines() if line.startswith("per class")]
    assert titles == [
        "per class, linear: r50 [pool] vs r18 [pool]:",
        "per class, knn: r50 [pool] vs r18 [pool]:",
        "per class, knn, 5-shot: r50 [pool] vs r18 [pool]:",
    ]


def test_report_table_breaks_long_encoder_paths_only_at_separators():
    """A file.py:build encoder wraps at its separators (the table stays inside 1300 px), and
    nothing else in a text cell gets a break opportunity or loses its escaping."""
    from probe.output.html import _breakable

    assert _breakable("/work/ex/encoder.py:build") == "/<wbr>work/<wbr>ex/<wbr>encoder.py:<wbr>build"
    assert _breakable("random-init <b>") == "random-init &lt;b&gt;"


def test_report_html_puts_each_seeds_pick_on_its_own_line():
    """Over seeds, the selected cell lists every seed's pick ("lr 0.1 (refit) ×2; lr 0.01 ×1"):
    report.html shows one a line (escaped), not one line wider than the page."""
    from probe.output import html as report_html
    from probe.output import leaderboard

    assert leaderboard.table_head(None)[leaderboard.SELECTED_COLUMN] == "selected"
    assert report_html._cell(leaderboard.SELECTED_COLUMN, "lr 0.1 (refit) ×2; lr 0.01 ×1") == "<td>lr 0.1 (refit) ×2<br>lr 0.01 ×1</td>"
    assert report_html._cell(leaderboard.SELECTED_COLUMN, "k <5") == "<td>k &lt;5</td>"


def test_report_out_inside_a_file_is_refused_before_the_runs_are_read(tmp_path, three_encoders, monkeypatch):
    """probe report --out under a file: one line naming it, before any run is read (it failed after
    reading them, as "unexpected NotADirectoryError")."""
    from probe.output import report as report_module

    target, a, b, _ = three_encoders
    folder = results_folder(tmp_path / "run", {"r18": (target, a), "r50": (target, b)})
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file")
    monkeypatch.setattr(report_module, "report", lambda *a, **k: pytest.fail("the runs were read"))
    for out in (blocker, blocker / "rep"):
        code, text = run_probe(["report", str(folder), "--out", str(out)])
        assert code == 2 and text.count("error:") == 1 and "Traceback" not in text, text
        assert f"--out {str(out)!r}" in text and ("is a file" in text or "cannot be made" in text), text


def test_a_cut_short_or_garbled_results_folder_is_a_one_line_error(tmp_path, three_encoders):
    """A results.csv or predictions.csv cut short (a full disk, a copy interrupted), bytes that are
    not text, a protocol.json that is JSON but not a record: one `error:` line naming the file (and
    the line), exit 2, where the short row's empty cells had surfaced as an unexpected TypeError."""
    import shutil

    target, a, b, _ = three_encoders
    folder = results_folder(tmp_path / "run", {"r18": (target, a), "r50": (target, b)})
    assert run_probe(["compare", str(folder)])[0] == 0

    copies = iter(range(100))

    def broken(name: str, content: bytes):
        copy = tmp_path / f"broken-{next(copies)}"
        shutil.copytree(folder, copy)
        (copy / name).write_bytes(content)
        return copy

    for name in ("results.csv", "predictions.csv"):
        whole = (folder / name).read_bytes()
        cut = broken(name, whole[: len(whole) // 2])
        header = whole.split(b"\n", 1)[0].count(b",") + 1
        for command in (["compare", str(cut)], ["report", str(cut), "--out", str(tmp_path / "rep")]):
            code, out = run_probe(command)
            assert code == 2 and out.count("error:") == 1 and "Traceback" not in out, out
            assert f"{name}' line " in out and f"not the {header} cells of its header (the file was cut short or edited)" in out, out
        code, out = run_probe(["compare", str(broken(name, b"\x84\xff\x00garbage"))])
        assert code == 2 and "is not a CSV file probe wrote" in out, out
    for record in (b"[]", b'{"protocol": 3}', b"\xff\xfe"):
        code, out = run_probe(["compare", str(broken("protocol.json", record))])
        assert code == 2 and "protocol.json" in out and "unexpected" not in out, out
