"""Issue 23 item 1 (probe side): ``--test-fraction`` draws a seeded, stratified report split from a
store's only split, before the selection holdout, so a plain class-folder dataset gets a number."""

from __future__ import annotations

import numpy as np
import pytest

import probe
from featstore.errors import UsageError
from probe.protocol import Protocol
from probe.selection import DRAWN_TEST, plan_splits
from tests.test_probe import FAST, assert_one_line_error, digits, make_store, one_thread, run_cli, store  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def only_all(tmp_path_factory, digits):
    x = np.concatenate([digits[s][0] for s in ("train", "val", "test")])
    y = np.concatenate([digits[s][1] for s in ("train", "val", "test")])
    ids = np.concatenate([digits[s][2] for s in ("train", "val", "test")])
    return make_store(tmp_path_factory.mktemp("one") / "all.zarr", {"all": (x, y, ids)}, manifest="m-all"), y


def test_drawn_test_is_stratified_seeded_and_apart_from_train_and_selection(only_all):
    _, y = only_all
    plans = [plan_splits("s", {"all": len(y)}, lambda s: y, 0.1, seed, test_fraction=0.2, test_seed=7) for seed in (0, 1)]
    for plan in plans:
        assert plan.report_split == DRAWN_TEST and plan.report_source == "all" and plan.reported_role == "report"
        parts = [plan.train_rows, plan.select_rows, plan.report_rows]
        assert sum(len(p) for p in parts) == len(y) and len(np.unique(np.concatenate(parts))) == len(y)  # a partition
        for c in range(10):  # 20% of every class, rounded
            assert (y[plan.report_rows] == c).sum() == round(0.2 * (y == c).sum())
        # the selection holdout is 10% of what the draw left, per class
        rest = np.setdiff1d(np.arange(len(y)), plan.report_rows)
        for c in range(10):
            assert (y[plan.select_rows] == c).sum() == max(1, round(0.1 * (y[rest] == c).sum()))
    # the test rows depend on the test seed only: every run seed (and store) scores the same images
    assert np.array_equal(plans[0].report_rows, plans[1].report_rows)
    assert not np.array_equal(plans[0].select_rows, plans[1].select_rows)
    other = plan_splits("s", {"all": len(y)}, lambda s: y, 0.1, 0, test_fraction=0.2, test_seed=8)
    assert not np.array_equal(other.report_rows, plans[0].report_rows)


def test_fit_reports_a_number_on_a_single_split_store(only_all, tmp_path):
    path, y = only_all
    p = Protocol(lr_grid="1e-3:1e-1:3", test_fraction=0.2, **FAST)
    assert p.to_dict()["test_fraction"] == 0.2 and "test_fraction" not in Protocol().to_dict()
    assert p.hash != Protocol(lr_grid="1e-3:1e-1:3", **FAST).hash
    warnings: list[str] = []
    rows = probe.fit(path, p, device="cpu", warn=warnings.append, out=tmp_path / "o")
    sel = next(r for r in rows if r["selected"])
    assert sel["report_split"] == DRAWN_TEST and sel["n_report"] == sum(round(0.2 * (y == c).sum()) for c in range(10))
    assert sel["report_top1_pct"] is not None and sel["report_top1_pct"] > 80 and sel["ci95_low"] is not None
    # the refit (the default) trains the reported head on train + the selection holdout: every row not reported
    assert sel["refit"] and sel["n_train"] + sel["n_report"] == len(y)
    swept = [r for r in rows if not r["refit"]]
    assert all(r["n_train"] + r["n_select"] + r["n_report"] == len(y) for r in swept)
    assert "drawn before selection" in sel["reported_as"] and not any("nothing reported" in w for w in warnings)
    import json

    assert json.loads((tmp_path / "o" / "protocol.json").read_text())["protocol"]["test_fraction"] == 0.2


def test_single_split_warning_says_what_to_run_and_the_cli_option(only_all, store, tmp_path):
    path, _ = only_all
    code, output = run_cli(["fit", "--store", str(path), "--lr", "0.05", "--epochs", "1", "--out", str(tmp_path / "a"), "--quiet"])
    assert code == 0 and f"`probe fit --store {path} --test-fraction 0.2`" in output
    code, output = run_cli(
        ["fit", "--store", str(path), "--lr", "0.05", "--epochs", "1", "--out", str(tmp_path / "b"), "--quiet", "--test-fraction", "0.25"]
    )
    assert code == 0 and "drawn-test" in output and "warning: store" not in output
    # a store with its own splits: nothing to draw, refused with the reason
    code, output = run_cli(["fit", "--store", str(store), "--lr", "0.05", "--epochs", "1", "--test-fraction", "0.2"])
    assert_one_line_error(code, output, 2, "--test-fraction", "train, val, test")
    with pytest.raises(UsageError, match="test fraction"):
        Protocol(test_fraction=1.0)
