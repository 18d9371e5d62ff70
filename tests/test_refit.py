"""Refit after selection (#27): the reported linear head, k-NN and logistic regression use every
training row. k-NN is checked against the authors' code (DINO's ``knn_classifier``), the refit
linear head against the same head trained directly on all train rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import probe
from probe import Protocol
from probe.methods import heads as H
from probe.methods import knn
from probe.selection import refits
from tests.test_battery import blobs
from tests.test_probe import digits_splits, make_store, one_thread, run_cli  # noqa: F401 (fixture: one thread)

KS = (10, 20, 100, 200)  # DINO's --nb_knn
T = 0.07  # DINO's --temperature


def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """DINO's k-NN evaluation, its arithmetic restated (not the file): facebookresearch/dino,
    ``eval_knn.py``, function ``knn_classifier`` (commit 7c446df5b9f45747937fb0d72314eb9f7b66930a,
    lines 143-182), on features its caller L2-normalised (same file, lines 81-82,
    ``nn.functional.normalize(…, dim=1, p=2)``).

    The test rows in chunks of ``N // 100``; per chunk: similarity = chunk @ trainᵀ over *every*
    training row, its top-k (largest, sorted) values and indices, the neighbours' labels one-hot,
    weighted by exp(similarity / T) and summed per class; classes sorted by that sum, descending;
    top-1 = the first, top-5 = any of the first min(5, k); percent of all test rows."""
    n = test_labels.shape[0]
    per_chunk = n // 100
    hits1 = hits5 = 0
    for start in range(0, n, per_chunk):
        features = test_features[start : min(start + per_chunk, n)]
        targets = test_labels[start : min(start + per_chunk, n)]
        distances, indices = torch.mm(features, train_features.t()).topk(k, largest=True, sorted=True)
        neighbours = train_labels.view(1, -1).expand(len(targets), -1).gather(1, indices)
        one_hot = torch.zeros(len(targets) * k, num_classes).scatter_(1, neighbours.reshape(-1, 1), 1)
        weights = distances.clone().div_(T).exp_()
        probs = (one_hot.view(len(targets), k, num_classes) * weights.view(len(targets), k, 1)).sum(1)
        predictions = probs.sort(1, True).indices
        correct = predictions.eq(targets.view(-1, 1))
        hits1 += correct[:, :1].sum().item()
        hits5 += correct[:, : min(5, k)].sum().item()
    return hits1 * 100.0 / n, hits5 * 100.0 / n


@pytest.fixture(scope="module")
def features():
    """digits through a fixed random projection and ReLU: continuous features (no exact similarity
    ties, which DINO's unstable sort and ours would break differently), real labels."""
    d = digits_splits()
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    return {s: (np.maximum(x @ w, 0) + 0.01, y, i) for s, (x, y, i) in d.items()}


def _dino(train, train_y, test, test_y, k):
    norm = lambda a: F.normalize(torch.from_numpy(np.ascontiguousarray(a)), dim=1, p=2)  # noqa: E731 (eval_knn.py lines 81-82)
    return dino_knn_classifier(norm(train), torch.from_numpy(train_y), norm(test), torch.from_numpy(test_y), k, T, 10)


@pytest.mark.parametrize("layout", [("train", "test"), ("train", "val", "test"), ("train", "val")])
def test_knn_equals_dino_knn_classifier_on_every_train_row(tmp_path, features, layout):
    """Without a val split the k is chosen on a 10% holdout and the reported rows then use train +
    holdout as neighbours: DINO's ``knn_classifier`` over every train row, to 0.01 points at each
    k. With a val split nothing changes (val is not train). ``--no-refit`` (the old behaviour)
    searches 90% of train: DINO over those rows, and not over all of them."""
    store = make_store(tmp_path / "s.zarr", {s: features[s] for s in layout})
    report = "test" if "test" in layout else "val"
    train_x, train_y, _ = features["train"]
    report_x, report_y, _ = features[report]
    differs = False
    for k in KS:
        (refit,) = [r for r in probe.fit(store, Protocol(methods="knn", knn_k=str(k)), device="cpu") if r["selected"]]
        top1, top5 = _dino(train_x, train_y, report_x, report_y, k)
        assert refit["report_split"] == report and refit["n_train"] == len(train_y)
        assert refit["refit"] == ("val" not in layout or report == "val")
        assert refit["report_top1_pct"] == pytest.approx(top1, abs=0.01), k
        assert refit["report_top5_pct"] == pytest.approx(top5, abs=0.01), k
        if refit["refit"]:
            (old,) = [r for r in probe.fit(store, Protocol(methods="knn", knn_k=str(k), refit=False), device="cpu") if r["selected"]]
            train_rows, _ = probe.selection.stratified_holdout(train_y, 0.1, 0)
            assert old["n_train"] == len(train_rows) < len(train_y) and not old["refit"]
            top1_90, _ = _dino(train_x[train_rows], train_y[train_rows], report_x, report_y, k)
            assert old["report_top1_pct"] == pytest.approx(top1_90, abs=0.01), k
            differs |= bool((old["report_predictions"]["pred"] != refit["report_predictions"]["pred"]).any())
    if "val" not in layout or report == "val":
        assert differs  # the holdout's neighbours change reported predictions: the check can fail


def test_knn_grid_refits_the_selected_k_only(tmp_path, features):
    store = make_store(tmp_path / "s.zarr", {s: features[s] for s in ("train", "test")})
    rows = probe.fit(store, Protocol(methods="knn"), device="cpu")
    sweep = [r for r in rows if not r["refit"]]
    (refit,) = [r for r in rows if r["refit"]]
    chosen = max(sweep, key=lambda r: (r["select_top1_pct"], -r["k"]))
    assert [r["k"] for r in sweep] == list(KS) and not any(r["selected"] for r in sweep)
    assert refit["selected"] and refit["k"] == chosen["k"] and refit["select_top1_pct"] is None
    assert refit["n_train"] == chosen["n_train"] + chosen["n_select"] == len(features["train"][1])
    top1, _ = _dino(features["train"][0], features["train"][1], features["test"][0], features["test"][1], refit["k"])
    assert refit["report_top1_pct"] == pytest.approx(top1, abs=0.01)
    pred = refit["report_predictions"]["pred"]
    assert (pred == features["test"][1]).mean() * 100 == pytest.approx(refit["report_top1_pct"], abs=1e-3)


@pytest.mark.parametrize("k_max", [5, 40, 400])
def test_neighbour_union_is_one_search_over_both_sets(k_max):
    """The refit's neighbours (train's nearest merged with the holdout's) are the nearest of one
    search over train + holdout; a k_max above either part's size keeps every row of it."""
    x, y = blobs(300, 16, 5, seed=3, sep=0.4)
    q, _ = blobs(50, 16, 5, seed=4, sep=0.4)
    x, q = knn.l2_normalize(torch.from_numpy(x)), knn.l2_normalize(torch.from_numpy(q))
    y = torch.from_numpy(y)
    a, b = slice(0, 260), slice(260, 300)
    ks = [k for k in (1, 5, 20, 40, 400) if k <= k_max]
    kept = knn.predict(x[a], y[a], q, ks, 5, keep_neighbours=True).neighbours
    assert kept is not None and kept.labels.shape == (50, min(k_max, 260))
    near = kept.union(knn.nearest(x[b], y[b], q, k_max), k_max)
    direct = knn.predict(x, y, q, ks, 5)
    merged = knn.vote(near, ks, 5)
    np.testing.assert_array_equal(merged.top5, direct.top5)
    np.testing.assert_array_equal(merged.top1, direct.top1)
    # without keep_neighbours nothing extra is held
    assert knn.predict(x[a], y[a], q, ks, 5).neighbours is None


@pytest.mark.parametrize("normalize", ["standardize", "none"])
def test_refit_linear_head_equals_the_head_trained_on_every_train_row(tmp_path, normalize):
    """The refit of the selected lr (on train + holdout, in split order, with invalid rows left
    out) is bit for bit the head of a one-lr run that trains on every usable train row
    (``--lr LR --select-on report``), and a head trained here by hand on those rows."""
    d = digits_splits()
    store = make_store(tmp_path / "s.zarr", {"train": d["train"], "test": d["test"]}, invalid={"train": [3, 500, 901]})
    common = dict(epochs=3, batch_size=128, normalize=normalize, seed=2)
    rows = probe.fit(store, Protocol(lr_grid="1e-3,1e-2,0.1,1", **common), device="cpu", warn=lambda m: None)
    (refit,) = [r for r in rows if r["refit"]]
    chosen = max((r for r in rows if not r["refit"]), key=lambda r: (r["select_top1_pct"], -r["lr"]))
    assert refit["selected"] and refit["lr"] == chosen["lr"] and refit["n_train"] == len(d["train"][1]) - 3
    assert refit["train_top1_pct"] is not None and refit["select_top1_pct"] is None and refit["train_loss"] is not None

    (direct,) = probe.fit(store, Protocol(lr_grid=[refit["lr"]], select_on="report", **common), device="cpu", warn=lambda m: None)
    assert direct["n_train"] == refit["n_train"]
    assert direct["report_top1_pct"] == refit["report_top1_pct"] and direct["train_top1_pct"] == refit["train_top1_pct"]
    assert direct["train_loss"] == refit["train_loss"]
    np.testing.assert_array_equal(direct["report_predictions"]["top5"], refit["report_predictions"]["top5"])

    # by hand: every usable train row, statistics of those rows, the seed's epoch orders kept to them
    usable = np.setdiff1d(np.arange(len(d["train"][1])), [3, 500, 901])
    x, y = torch.from_numpy(d["train"][0][usable]), torch.from_numpy(d["train"][1][usable])
    stats = H.standardize_stats(x) if normalize == "standardize" else None
    protocol = Protocol(lr_grid=[refit["lr"]], **common)
    head = H.LinearHeads(64, 10, [refit["lr"]], [0.0])
    orders = H.restrict_orders(H.epoch_orders(len(d["train"][1]), 3, 2), usable)
    H.train(H.prepare(x, normalize, torch.float32, stats), y, head, protocol, torch.from_numpy(orders))
    top = H.predict(head, H.prepare(torch.from_numpy(d["test"][0]), normalize, torch.float32, stats))[:, 0]
    np.testing.assert_array_equal(top.numpy(), refit["report_predictions"]["top5"])


def test_where_each_method_refits(tmp_path):
    """Linear and k-NN refit only on a holdout of train; logistic regression on val too; nothing
    refits on the reported rows, few-shot, or with --no-refit."""
    d = digits_splits()
    quick = dict(methods="linear,knn,logreg", lr_grid="1e-2,0.1", epochs=2, batch_size=128, knn_k="1,5", logreg_C="1e-2,1")
    with_val = make_store(tmp_path / "v.zarr", d)
    holdout = make_store(tmp_path / "h.zarr", {"train": d["train"], "test": d["test"]})

    def refit_methods(store, **kw):
        rows = probe.fit(store, Protocol(**{**quick, **kw}), device="cpu", warn=lambda m: None)
        assert all(
            sum(r["selected"] for r in rows if (r["method"], r["shots"]) == key) == 1 for key in {(r["method"], r["shots"]) for r in rows}
        )
        return sorted({(r["method"], r["shots"]) for r in rows if r["refit"]}, key=str)

    assert refit_methods(holdout) == [("knn", None), ("linear", None), ("logreg", None)]
    assert refit_methods(with_val) == [("logreg", None)]
    assert refit_methods(holdout, refit=False) == refit_methods(with_val, refit=False) == []
    assert refit_methods(holdout, select_on="report") == []
    assert refit_methods(holdout, shots="5,all") == [("knn", None), ("linear", None), ("logreg", None)]
    assert refits(True, "report", None, "holdout") and not refits(True, "report", None, "val")
    assert refits(True, "report", None, "val", val=True) and not refits(True, "select", None, "holdout", val=True)
    assert not refits(True, "report", 5, "holdout") and not refits(False, "report", None, "holdout")
    assert not refits(True, None, None, "holdout")


def test_results_csv_marks_refit_rows_and_protocol_records_the_choice(tmp_path):
    d = digits_splits()
    store = make_store(tmp_path / "h.zarr", {"train": d["train"], "val": d["val"]})
    code, out = run_cli(["fit", "--store", str(store), "--method", "linear,knn", "--lr-grid", "0.01,0.1", "--epochs", "2",
                         "--knn-k", "1,5", "--out", str(tmp_path / "r"), "--quiet"])  # fmt: skip
    assert code == 0, out
    assert "(refit)" in out
    rows = list(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    assert {r["refit"] for r in rows} == {"true", "false"}
    for r in rows:
        if r["refit"] == "true":
            assert r["selected"] == "true" and r["select_top1_pct"] == "" and int(r["n_train"]) == len(d["train"][1])
        else:
            assert r["selected"] == "false" and int(r["n_train"]) + int(r["n_select"]) == len(d["train"][1])
    record = json.loads((tmp_path / "r" / "protocol.json").read_text())
    assert record["protocol"]["refit"] is True and record["protocol_hash"] == Protocol.from_dict(record["protocol"]).hash
    code, out = run_cli(["fit", "--store", str(store), "--method", "linear,knn", "--lr-grid", "0.01,0.1", "--epochs", "2",
                         "--knn-k", "1,5", "--no-refit", "--out", str(tmp_path / "n"), "--quiet"])  # fmt: skip
    assert code == 0, out
    old = json.loads((tmp_path / "n" / "protocol.json").read_text())
    assert old["protocol"]["refit"] is False and old["protocol_hash"] != record["protocol_hash"]
    assert {r["refit"] for r in csv.DictReader((tmp_path / "n" / "results.csv").open())} == {"false"}
    # a record written before #27 names the choice logreg_refit: read as refit
    legacy = {**old["protocol"], "logreg_refit": False}
    del legacy["refit"]
    assert Protocol.from_dict(legacy).refit is False


def test_a_fixed_lr_and_its_refit_draw_the_fixed_figure_of_the_reported_number(tmp_path):
    """probe fit --lr on a store without val (refit on by default): the head and its refit are one
    setting, so the run draws accuracy.png with the refit's reported number (it drew
    accuracy_vs_lr.png: an LR axis of one point, a selection panel, a star beside the refit's ◆),
    and the refit note speaks of the fixed lr, not of a selected head."""
    from probe.output import plots

    d = digits_splits()
    store = make_store(tmp_path / "h.zarr", {"train": d["train"], "test": d["test"]})
    code, out = run_cli(["fit", "--store", f"A={store}", "--lr", "0.1", "--epochs", "2", "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == ["accuracy.png"] and "accuracy_vs_lr.png" not in out
    assert "(refit): the fixed lr's one head trained again on every train row" in out and "selected head" not in out

    rows = probe.fit(store, Protocol(lr_grid=(0.1,), epochs=2), device="cpu", warn=lambda m: None)
    (refit,) = [r for r in rows if r["refit"]]
    assert len(rows) == 2 and plots.is_fixed(rows) and plots.plot_name(rows) == plots.FIXED_PLOT
    fig = plots.fixed_figure(plots.plot_rows(rows))
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [refit["label"]]  # one row: the refit, not the head it trained again
    (number,) = [t.get_text() for t in ax.texts]
    assert number == f"{refit['report_top1_pct']:.1f} [{refit['ci95_low']:.1f}, {refit['ci95_high']:.1f}]"
    assert "★" not in fig.texts[0].get_text() and "(refit)" in ax.get_xlabel()
