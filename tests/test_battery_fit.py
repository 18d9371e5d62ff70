"""``probe fit --method linear,knn,logreg --shots … --seeds …`` end to end on digits stores:
rows, selection that never reads the reported split, summaries over seeds, the CLI."""

from __future__ import annotations

import csv
import statistics

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from probe import Protocol
from probe.cli import main as cli
from tests.test_probe import digits, make_store, one_thread, store  # noqa: F401 (fixtures: one thread, the digits store)

QUICK = dict(lr_grid="1e-2,0.1", epochs=3, batch_size=128, knn_k="1,5,20", logreg_C="1e-3:10:5")


def _selected(rows):
    return {(r["method"], r["shots"], r["seed"]): r for r in rows if r["selected"]}


def test_battery_rows_selection_and_summary(store, tmp_path, digits):
    p = Protocol(methods="linear,knn,logreg", seeds="0,1", **QUICK)
    rows = probe.fit(store, p, device="cpu", warn=lambda m: None, out=tmp_path / "res")
    per_seed = 2 + 3 + 5 + 1  # linear heads, k values, C values, the refit
    assert len(rows) == 2 * per_seed
    assert {r["protocol_hash"] for r in rows} == {p.hash}
    sel = _selected(rows)
    assert set(sel) == {(m, None, s) for m in ("linear", "knn", "logreg") for s in (0, 1)}
    for (method, _, seed), r in sel.items():
        same = [x for x in rows if x["method"] == method and x["seed"] == seed]
        if method == "logreg":
            path = [x for x in same if not x["refit"]]
            best = max(path, key=lambda x: (x["select_top1_pct"], -x["C"]))
            assert r["refit"] and r["C"] == best["C"] and r["select_top1_pct"] is None
            assert r["n_train"] == best["n_train"] + best["n_select"]
        else:
            key = "lr" if method == "linear" else "k"
            best = max(same, key=lambda x: (x["select_top1_pct"], -x[key]))
            assert r[key] == best[key]
        assert r["report_top1_pct"] > 80
    # per-image predictions of the selected k-NN and logreg configurations (for predictions.csv)
    test_ids = digits["test"][2]
    for method in ("knn", "logreg"):
        pred = sel[(method, None, 0)]["report_predictions"]
        assert pred["pred"].shape == (len(test_ids),) and pred["top5"].shape == (len(test_ids), 5)
        np.testing.assert_array_equal(pred["pred"], pred["top5"][:, 0])
        np.testing.assert_array_equal(pred["target"], digits["test"][1])
        assert (pred["pred"] == pred["target"]).mean() * 100 == pytest.approx(sel[(method, None, 0)]["report_top1_pct"], abs=1e-3)
        assert len(pred["paths"]) == len(test_ids) and len(set(pred["paths"].tolist())) == len(test_ids)
    knn_rows = [r for r in rows if r["method"] == "knn"]
    assert all(r["temperature"] == 0.07 and r["lr"] is None and r["C"] is None and r["train_top1_pct"] is None for r in knn_rows)
    # summary: mean ± sample std over the seeds, checked against the statistics module
    text = (tmp_path / "res" / "summary.csv").read_text()
    summary = list(csv.DictReader(text.splitlines()))
    assert [(s["method"], s["n_seeds"]) for s in summary] == [("linear", "2"), ("knn", "2"), ("logreg", "2")]
    for s in summary:
        values = [sel[(s["method"], None, seed)]["report_top1_pct"] for seed in (0, 1)]
        assert float(s["report_top1_mean"]) == pytest.approx(statistics.mean(values), abs=1e-3)
        assert float(s["report_top1_std"]) == pytest.approx(statistics.stdev(values), abs=1e-3)
    header = (tmp_path / "res" / "results.csv").read_text().splitlines()[0].split(",")
    assert {"method", "k", "temperature", "C", "shots", "seed", "refit"} <= set(header)
    assert (tmp_path / "res" / "accuracy_vs_lr.png").exists()
    shown = probe.output.plots.plot_rows(rows)  # the LR plot: the linear heads of the first seed only
    assert len(shown) == 2 and {(r["method"], r["seed"]) for r in shown} == {("linear", 0)}
    table = probe.output.tables.markdown_table(rows, p)
    assert "±" in table and "k-NN" not in table and "| knn |" in table


def test_scrambled_report_labels_leave_every_selected_lr_k_and_C_unchanged(tmp_path, digits):
    p = Protocol(methods="linear,knn,logreg", shots="5,all", seeds="0,1", **QUICK)
    rng = np.random.default_rng(0)
    scrambled = dict(digits)
    x, y, ids = digits["test"]
    scrambled["test"] = (x, rng.permutation(y), ids)
    a = probe.fit(make_store(tmp_path / "a.zarr", digits), p, device="cpu", warn=lambda m: None)
    b = probe.fit(make_store(tmp_path / "b.zarr", scrambled), p, device="cpu", warn=lambda m: None)
    sa, sb = _selected(a), _selected(b)
    assert set(sa) == set(sb) and len(sa) == 3 * 2 * 2
    for key in sa:
        for setting in ("lr", "wd", "k", "C", "refit", "select_top1_pct", "n_train"):
            assert sa[key][setting] == sb[key][setting], (key, setting)
    assert any(sa[k]["report_top1_pct"] != sb[k]["report_top1_pct"] for k in sa)  # the report did change
    five = [r for r in a if r["shots"] == 5 and r["method"] == "knn"]
    assert {r["n_train"] for r in five} == {50}  # 5 per class × 10 classes


def test_holdout_layout_refits_on_train_and_holdout_and_reports_val(tmp_path, digits):
    layout = {"train": digits["train"], "val": digits["val"]}  # ImageNet's: no test split
    s = make_store(tmp_path / "in.zarr", layout)
    rows = probe.fit(s, Protocol(methods="logreg", **QUICK), device="cpu", warn=lambda m: None)
    refit = next(r for r in rows if r["selected"])
    assert refit["refit"] and refit["select_split"] == "holdout" and refit["report_split"] == "val"
    assert refit["n_train"] == len(digits["train"][1]) and refit["n_report"] == len(digits["val"][1])
    on_report = probe.fit(s, Protocol(methods="logreg", select_on="report", **QUICK), device="cpu", warn=lambda m: None)
    assert not any(r["refit"] for r in on_report)  # never refit on the reported rows
    chosen = next(r for r in on_report if r["selected"])
    assert chosen["report_top1_pct"] == chosen["select_top1_pct"] and chosen["best_report"]
    from probe.output.tables import battery_table

    notes = {"honest": battery_table(rows).splitlines()[-1], "on report": battery_table(on_report).splitlines()[-1]}
    assert "never on the reported split" in notes["honest"] and "optimistic" not in notes["honest"]
    assert "chosen on the reported split itself" in notes["on report"] and "never on the reported split" not in notes["on report"]


def _run(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_cli_battery(store, tmp_path):
    code, out = _run(
        [
            "fit",
            "--store",
            str(store),
            "--method",
            "linear,knn,logreg",
            "--seeds",
            "0,1",
            "--shots",
            "5,all",
            "--knn-k",
            "1,5",
            "--logreg-C",
            "0.01,1",
            "--lr-grid",
            "0.01,0.1",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ]
    )
    assert code == 0, out
    assert "| linear | 5 |" in out and "| knn | all |" in out and "± " in out and "(2)" in out
    assert "summary.csv" in out
    rows = list(csv.DictReader((tmp_path / "r" / "results.csv").read_text().splitlines()))
    assert {r["method"] for r in rows} == {"linear", "knn", "logreg"} and {r["shots"] for r in rows} == {"5", ""}
    code, out = _run(["fit", "--store", str(store), "--method", "knn", "--knn-k", "3", "--out", str(tmp_path / "k"), "--quiet"])
    assert code == 0, out
    assert not (tmp_path / "k" / "accuracy_vs_lr.png").exists() and "accuracy_vs_lr" not in out
    assert "| knn | all | k 3 |" in out


@pytest.mark.parametrize("args, needle", [
    (["--seed", "1", "--seeds", "0,1"], "--seed and --seeds are exclusive"),
    (["--method", "svm"], "unknown method svm"),
    (["--knn-k", "0"], "--knn-k"),
    (["--logreg-C", "0,1"], "C"),
    (["--shots", "x"], "--shots"),
])  # fmt: skip
def test_cli_battery_usage_errors(store, tmp_path, args, needle):
    code, out = _run(["fit", "--store", str(store), "--out", str(tmp_path / "o"), *args])
    assert code == 2 and out.startswith("error: ") and needle in out and "Traceback" not in out
    assert not (tmp_path / "o").exists()


def test_few_shot_logreg_is_never_refit_and_trains_on_k_per_class(store):
    rows = probe.fit(store, Protocol(methods="logreg", shots="2,all", **QUICK), device="cpu", warn=lambda m: None)
    few = [r for r in rows if r["shots"] == 2]
    assert not any(r["refit"] for r in few) and {r["n_train"] for r in few} == {20}
    assert sum(r["selected"] for r in few) == 1
    assert any(r["refit"] and r["selected"] for r in rows if r["shots"] is None)


def test_a_seed_reuses_knn_and_logreg_only_when_its_rows_are_the_same(tmp_path, digits):
    both = probe.fit(make_store(tmp_path / "v.zarr", digits), Protocol(methods="knn", seeds="0,1", knn_k="1,5,20"), device="cpu")
    by_seed = {s: [r["report_top1_pct"] for r in both if r["seed"] == s] for s in (0, 1)}
    assert by_seed[0] == by_seed[1]  # a store val split and every train row: nothing depends on the seed
    layout = {"train": digits["train"], "val": digits["val"]}
    held = probe.fit(make_store(tmp_path / "h.zarr", layout), Protocol(methods="knn", seeds="0,1", knn_k="1,5,20"), device="cpu")
    by_seed = {s: [r["select_top1_pct"] for r in held if r["seed"] == s] for s in (0, 1)}
    assert by_seed[0] != by_seed[1]  # a holdout per seed: recomputed


def test_every_store_of_a_comparison_gets_the_same_few_shot_rows(tmp_path, digits):
    # cosine k-NN ignores a feature scale: two stores whose features differ only by a factor
    # give identical predictions exactly when they trained on the same few-shot rows
    scaled = {k: (x * 3.0, y, ids) for k, (x, y, ids) in digits.items()}
    a = make_store(tmp_path / "a.zarr", digits)
    b = make_store(tmp_path / "b.zarr", scaled)
    rows = probe.fit(
        [f"a={a}", f"b={b}"], Protocol(methods="knn", shots="1,3", seeds="0,1", knn_k="1,3"), device="cpu", warn=lambda m: None
    )
    sel = {(r["label"], r["shots"], r["seed"]): r for r in rows if r["selected"]}
    for shots in (1, 3):
        for seed in (0, 1):
            pa, pb = sel[("a", shots, seed)]["report_predictions"], sel[("b", shots, seed)]["report_predictions"]
            np.testing.assert_array_equal(pa["pred"], pb["pred"])
    # and a different seed draws different rows
    assert not np.array_equal(sel[("a", 1, 0)]["report_predictions"]["pred"], sel[("a", 1, 1)]["report_predictions"]["pred"])


def test_few_shot_as_large_as_every_row_is_not_the_refit_result(store):
    # shots >= every class's size draws exactly the training rows: the rows match the full run's,
    # but a few-shot logreg is never refit, so its result must not be the full run's (refit) one
    p = Protocol(methods="logreg", shots="all,10000", **QUICK)
    rows = probe.fit(store, p, device="cpu", warn=lambda m: None)
    sel = _selected(rows)
    full, few = sel[("logreg", None, 0)], sel[("logreg", 10000, 0)]
    assert full["refit"] and full["n_train"] == few["n_train"] + few["n_select"]
    assert not few["refit"] and not any(r["refit"] for r in rows if r["shots"] == 10000)


def test_logreg_warns_once_per_store_about_unconverged_C(store):
    """A solve stopped above the tolerance (here by a one-iteration cap) is named in one line."""
    messages = []
    p = Protocol(methods="logreg", **{**QUICK, "logreg_C": "1e-3,10", "logreg_max_iter": 1, "refit": False})
    rows = probe.fit(store, p, device="cpu", warn=messages.append)
    unconverged = [m for m in messages if "logistic regression" in m]
    assert len(unconverged) == 1 and "\n" not in unconverged[0]
    assert "stopped above --logreg-tol 0.0001 at C " in unconverged[0] and "--logreg-max-iter 1" in unconverged[0]
    assert "10" in unconverged[0].split(" at C ")[1]
    assert len([r for r in rows if r["method"] == "logreg"]) == 2
