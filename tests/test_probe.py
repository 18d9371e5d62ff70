"""probe fit: protocol, batched heads, honest selection, outputs, CLI errors (CPU, digits pixels)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import probe
import probe.output.files
import probe.output.plots
import probe.output.tables
from featstore.errors import UsageError
from featstore.store import FeatureStore
from probe.cli import main as cli
from probe.methods import heads as H
from probe.protocol import Protocol, parse_grid
from probe.selection import stratified_holdout

FAST = dict(epochs=5, batch_size=128)  # enough for digits to reach ~95% at the best LR


def digits_splits(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, train_size=0.6, stratify=y, random_state=seed)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    return {k: (x[i], y[i], i) for k, i in (("train", tr), ("val", va), ("test", te))}


def make_store(
    path,
    splits: dict,
    *,
    view="pixels",
    dtype="float32",
    manifest="digits-manifest",
    invalid=None,
    finalize=True,
    extra_views=(),
    encoder=None,
):
    """A store from {split: (features, labels, ids)}; ``invalid``: {split: rows} written as valid=False + NaN;
    ``encoder``: fields that replace the default encoder record (name, family, weights_path, …)."""
    invalid = invalid or {}
    dim = next(iter(splits.values()))[0].shape[1]
    views = {view: dim, **{v: dim for v in extra_views}}
    spec = {s: ([f"{int(i)}.png" for i in ids], labels) for s, (_, labels, ids) in splits.items()}
    classes = int(max(l.max() for _, l, _ in splits.values())) + 1
    store = FeatureStore.create(
        path,
        splits=spec,
        views=views,
        dtype=dtype,
        chunk_rows=256,
        attrs={
            "encoder": {
                "name": "pixels",
                "arch": "none",
                "family": "none",
                "weights_path": None,
                "weights_sha256": "0" * 64,
                **(encoder or {}),
            },
            "dataset": {
                "name": "digits",
                "root": "/data",
                "class_names": [str(c) for c in range(classes)],
                "num_classes": classes,
                "splits": list(splits),
                "manifest_sha256": manifest,
            },
        },
    )
    for s, (x, _, _) in splits.items():
        x = x.copy()
        valid = np.ones(len(x), bool)
        valid[invalid.get(s, [])] = False
        x[~valid] = np.nan
        for u in store.units(s):
            store.write_unit(
                u,
                {v: x[u.start : u.stop] for v in views},
                valid[u.start : u.stop],
                {int(r) - u.start: "bad" for r in np.flatnonzero(~valid) if u.start <= r < u.stop} or None,
            )
    if finalize:
        store.finalize()
    return Path(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # digits-sized problems: a second OpenMP thread only adds barrier waits on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return digits_splits()


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits):
    return make_store(tmp_path_factory.mktemp("s") / "digits.zarr", digits)


def run_cli(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def assert_one_line_error(code, output, expected_code, *needles):
    assert code == expected_code, output
    errors = [l for l in output.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, output
    assert "Traceback" not in output
    for n in needles:
        assert n in errors[0], errors[0]


# ---------------------------------------------------------------- protocol


def test_grid_syntax():
    assert parse_grid("1e-4,1e-3,0.01") == (1e-4, 1e-3, 0.01)
    assert parse_grid("0.01,1e-4,0.01") == (1e-4, 0.01)
    grid = parse_grid("1e-5:1e-1:13")
    assert len(grid) == 13 and grid[0] == 1e-5 and grid[-1] == 0.1 and grid[3] == 1e-4
    assert parse_grid("0.5:0.5:1") == (0.5,)
    assert parse_grid("0,1e-4", what="weight decay", allow_zero=True) == (0.0, 1e-4)
    for bad in ["", "abc", "1e-3,x", "1e-5:1e-1", "1e-5:1e-1:zero", "0:1:5", "1:0.1:5", "1e-3:1e-1:1", "-0.1", "0,0.1", "inf"]:
        with pytest.raises(UsageError):
            parse_grid(bad)


@pytest.mark.slow
def test_protocol_hash_stable_and_sensitive():
    p = Protocol()
    assert p.hash == Protocol().hash == Protocol.from_dict(json.loads(json.dumps(p.to_dict()))).hash
    assert Protocol(lr_grid="0.1,0.01").hash == Protocol(lr_grid=[0.01, 0.1]).hash
    other_process = subprocess.run(
        [sys.executable, "-c", "from probe import Protocol; print(Protocol().hash)"], capture_output=True, text=True, check=True
    )
    assert other_process.stdout.strip() == p.hash
    changes = {
        "lr_grid": "1e-3,1e-2",
        "wd_grid": "0,1e-4",
        "optimizer": "adamw",
        "epochs": 7,
        "batch_size": 64,
        "momentum": 0.8,
        "betas": (0.8, 0.99),
        "eps": 1e-6,
        "schedule": "constant",
        "normalize": "l2",
        "val_fraction": 0.2,
        "seed": 3,
        "version": 99,
        "select_on": "holdout",
        "test_fraction": 0.2,
        "augment": "rrc-flip:10",  # resolved from a store's views (#25); "on"/"off" alone train on no views: no change
    }
    battery = {
        "methods",
        "knn_k",
        "knn_temperature",
        "knn_weights",
        "logreg_C",
        "logreg_max_iter",
        "logreg_tol",
        "refit",
        "shots",
        "seeds",
    }
    # the attentive probe's settings (#25) enter the hash only when it runs
    attentive = {"attentive_queries": 2, "attentive_heads": 3, "attentive_optimizer": "sgd"}
    assert set(changes) | {"selection"} | battery | set(attentive) == {f.name for f in fields(Protocol)}  # battery: tests/test_battery.py
    hashes = {p.hash}
    for name, value in changes.items():
        hashes.add(p.replace(**{name: value}).hash)
    assert len(hashes) == len(changes) + 1
    with_attentive = p.replace(methods="linear,attentive")
    for name, value in attentive.items():
        assert p.replace(**{name: value}).hash == p.hash  # not run: not part of the protocol
        assert with_attentive.replace(**{name: value}).hash != with_attentive.hash


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=0),
        dict(batch_size=0),
        dict(optimizer="lbfgs"),
        dict(normalize="pca"),
        dict(momentum=1.0),
        dict(val_fraction=0.0),
        dict(lr_grid="0,1"),
        dict(seed=-1),  # numpy's generators refuse it: an "unexpected ValueError" after the stores were read
        dict(seed=2**63),  # torch's generator overflows
        dict(seeds="0,99999999999999999999"),
    ],
)
def test_protocol_rejects_bad_values(bad):
    with pytest.raises(UsageError):
        Protocol(**bad)


# ---------------------------------------------------------------- batched heads


def _reference_head(x, y, orders, protocol, lr, wd):
    """One nn.Linear trained with torch.optim and the same minibatch order and schedule."""
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1).to(x.dtype)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    groups = [{"params": [lin.weight], "weight_decay": wd}, {"params": [lin.bias], "weight_decay": 0.0}]
    if protocol.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=protocol.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=protocol.betas, eps=protocol.eps)
    per = math.ceil(len(x) / protocol.batch_size)
    total = protocol.epochs * per
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: H.schedule_factor(protocol, t, total))
    for e in range(protocol.epochs):
        for s in range(per):
            idx = orders[e][s * protocol.batch_size : (s + 1) * protocol.batch_size]
            loss = torch.nn.functional.cross_entropy(lin(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return lin.weight.detach().T, lin.bias.detach()


def _batched_vs_single(digits, optimizer, dtype):
    x, y, _ = digits["train"]
    x = torch.from_numpy(x).to(dtype)
    x = H.prepare(x, "standardize", dtype, H.standardize_stats(x))
    y = torch.from_numpy(y)
    p = Protocol(
        lr_grid="1e-3,1e-2,0.1", wd_grid="0,1e-3", optimizer=optimizer, epochs=3, batch_size=100
    )  # 1078 rows: last batch is partial
    orders = torch.from_numpy(H.epoch_orders(len(x), p.epochs, p.seed))
    batched = H.LinearHeads(x.shape[1], 10, *zip(*p.heads), dtype=dtype)
    H.train(x, y, batched, p, orders)
    assert batched.weight.shape == (6, 64, 10) and batched.bias.shape == (6, 10)
    for h, (lr, wd) in enumerate(p.heads):
        single = H.LinearHeads(x.shape[1], 10, [lr], [wd], dtype=dtype)
        H.train(x, y, single, p, orders)
        ref_w, ref_b = _reference_head(x, y, orders, p, lr, wd)
        yield (batched.weight[h], single.weight[0], ref_w), (batched.bias[h], single.bias[0], ref_b)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_batched_heads_equal_single_head_runs_float64(digits, optimizer):
    """Head h of the batched run == a lone head == torch.optim on nn.Linear, same LR/seed/order."""
    for params in _batched_vs_single(digits, optimizer, torch.float64):
        for batched, single, reference in params:
            torch.testing.assert_close(batched, single, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(batched, reference, rtol=1e-9, atol=1e-10)


def test_batched_heads_equal_single_head_runs_float32(digits):
    # float32, as trained on CPU: equal to rounding (the GEMM is blocked differently for 1 and 6 heads)
    for params in _batched_vs_single(digits, "sgd", torch.float32):
        for batched, single, reference in params:
            torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-5)


def test_standardize_uses_train_statistics():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.normal(3, 2, (500, 8)).astype(np.float32))
    other = torch.from_numpy(rng.normal(-5, 9, (50, 8)).astype(np.float32))
    stats = H.standardize_stats(train)
    t = H.prepare(train, "standardize", torch.float32, stats)
    torch.testing.assert_close(t.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    bn = torch.nn.BatchNorm1d(8, affine=False).train()
    bn(train)  # BatchNorm without affine, running stats from train (momentum None = cumulative)
    bn.eval()
    bn.running_mean.copy_(train.mean(0))
    bn.running_var.copy_(train.var(0, unbiased=False))
    torch.testing.assert_close(H.prepare(other, "standardize", torch.float32, stats), bn(other), rtol=1e-4, atol=1e-4)
    l2 = H.prepare(other, "l2", torch.float32)
    torch.testing.assert_close(l2.norm(dim=1), torch.ones(50))


# ---------------------------------------------------------------- accuracy and selection


def test_selected_head_agrees_with_sklearn(store, digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    rows = probe.fit([store], Protocol(), device="cpu", warn=lambda m: None)
    chosen = [r for r in rows if r["selected"]]
    assert len(chosen) == 1 and chosen[0]["report_split"] == "test" and chosen[0]["select_split"] == "val"
    (xtr, ytr, _), (xv, yv, _), (xt, yt, _) = digits["train"], digits["val"], digits["test"]
    scaler = StandardScaler().fit(xtr)
    best = None
    with threadpool_limits(1):  # a tiny problem: BLAS threads only add contention
        for c in np.logspace(-3, 3, 13):
            m = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(xtr), ytr)
            val = 100 * m.score(scaler.transform(xv), yv)
            if best is None or val > best[0]:
                best = (val, 100 * m.score(scaler.transform(xt), yt))
    assert abs(chosen[0]["report_top1_pct"] - best[1]) <= 1.0, (chosen[0], best)


def test_selection_never_looks_at_test(tmp_path, digits):
    scrambled = dict(digits)
    x, y, ids = digits["test"]
    scrambled["test"] = (x, np.random.default_rng(1).permutation(y)[::-1].copy(), ids)
    a = probe.fit([make_store(tmp_path / "a.zarr", digits)], Protocol(**FAST), device="cpu", warn=lambda m: None)
    b = probe.fit(
        [make_store(tmp_path / "b.zarr", scrambled)], Protocol(**FAST), device="cpu", warn=lambda m: None, allow_different_data=True
    )
    pick = lambda rows: next(r for r in rows if r["selected"])  # noqa: E731
    assert pick(a)["lr"] == pick(b)["lr"]
    assert [r["select_top1_pct"] for r in a] == [r["select_top1_pct"] for r in b]
    assert pick(b)["report_top1_pct"] < pick(a)["report_top1_pct"] - 50


def test_holdout_when_store_has_no_val(tmp_path, digits):
    two = {"train": digits["train"], "test": digits["test"]}
    s = make_store(tmp_path / "tt.zarr", two, manifest="m2")
    rows = probe.fit(s, Protocol(**FAST), device="cpu", warn=lambda m: None)
    r = rows[0]
    assert (
        r["select_split"] == "holdout"
        and r["report_split"] == "test"
        and r["reported_as"] == "test (reported; selection on a 10% train holdout)"
    )
    assert r["n_train"] + r["n_select"] == len(digits["train"][1]) and abs(r["n_select"] - 0.1 * len(digits["train"][1])) <= 10
    again = probe.fit(s, Protocol(**FAST), device="cpu", warn=lambda m: None)
    assert [r["select_top1_pct"] for r in rows] == [r["select_top1_pct"] for r in again]
    tr, hold = stratified_holdout(digits["train"][1], 0.1, 0)
    assert len(np.intersect1d(tr, hold)) == 0 and set(np.unique(digits["train"][1][hold])) == set(range(10))

    # a single split: nothing is left to report on, unless the user opts in to the max over the holdout
    only = make_store(tmp_path / "all.zarr", {"all": digits["train"]}, manifest="m3")
    warnings = []
    rows = probe.fit(only, Protocol(**FAST), device="cpu", warn=warnings.append)
    sel = next(r for r in rows if r["selected"])
    assert sel["train_split"] == "all" and sel["select_split"] == "holdout" and sel["report_split"] is None
    assert all(r["report_top1_pct"] is None and r["n_report"] is None for r in rows) and not any(r["best_report"] for r in rows)
    assert sel["reported_as"].startswith("nothing reported") and any("only split is 'all'" in w for w in warnings)
    assert "nothing reported" in probe.output.tables.markdown_table(rows)
    assert [c for c, _ in probe.output.plots.plot_panels(rows)] == ["select_top1_pct"]
    opted = probe.fit(only, Protocol(select_on="report", **FAST), device="cpu", warn=lambda m: None)
    sel = next(r for r in opted if r["selected"])
    assert (
        sel["report_split"] == "holdout"
        and sel["report_top1_pct"] == sel["select_top1_pct"]
        and "max over the reported split" in sel["reported_as"]
    )


def test_two_stores_share_protocol_and_minibatch_order(tmp_path, digits):
    a = make_store(tmp_path / "a.zarr", digits)
    b = make_store(tmp_path / "b.zarr", digits)
    rows = probe.fit([a, b], Protocol(**FAST), device="cpu", warn=lambda m: None)
    ra = [r for r in rows if r["store"] == str(a)]
    rb = [r for r in rows if r["store"] == str(b)]
    keys = ["lr", "train_top1_pct", "select_top1_pct", "report_top1_pct", "train_loss", "selected"]
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    assert len({r["protocol_hash"] for r in rows}) == 1


def test_invalid_and_nonfinite_rows_are_excluded_and_counted(tmp_path, digits):
    # a valid row with Inf features (e.g. float16 overflow), as extracted (changed afterwards it is damage: test_hostile_stores)
    x, y, ids = digits["val"]
    x = x.copy()
    x[7, 0] = np.inf
    s = make_store(tmp_path / "inv.zarr", {**digits, "val": (x, y, ids)}, invalid={"train": [0, 5], "test": [3]})
    warnings = []
    rows = probe.fit(s, Protocol(**FAST), device="cpu", warn=warnings.append)
    r = rows[0]
    assert r["excluded_invalid"] == 3 and r["excluded_nonfinite"] == 1
    assert (
        r["n_train"] == len(digits["train"][1]) - 2
        and r["n_select"] == len(digits["val"][1]) - 1
        and r["n_report"] == len(digits["test"][1]) - 1
    )
    assert any("1 valid rows have NaN/Inf" in w and "'val'" in w for w in warnings)


def test_fewer_than_five_classes_has_no_top5(tmp_path, digits):
    three = {k: (x[y < 3], y[y < 3], i[y < 3]) for k, (x, y, i) in digits.items()}
    rows = probe.fit(make_store(tmp_path / "c3.zarr", three, manifest="m3c"), Protocol(**FAST), device="cpu", warn=lambda m: None)
    assert all(r["report_top5_pct"] is None and r["report_top1_pct"] is not None for r in rows)


def test_diverged_heads_are_flagged_and_never_selected(store):
    warnings = []
    rows = probe.fit(store, Protocol(lr_grid="0.01,1e38", normalize="none", **FAST), device="cpu", warn=warnings.append)
    bad = next(r for r in rows if r["lr"] == 1e38)
    assert bad["diverged"] and not bad["selected"] and bad["select_top1_pct"] is None
    assert next(r for r in rows if r["lr"] == 0.01)["selected"]
    assert any("diverged" in w for w in warnings)


# ---------------------------------------------------------------- outputs and CLI


def test_cli_writes_csv_protocol_and_plot(store, tmp_path):
    out = tmp_path / "res"
    code, output = run_cli(
        [
            "fit",
            "--store",
            str(store),
            "--lr-grid",
            "1e-3:1e-1:5",
            "--wd-grid",
            "0,1e-4",
            "--epochs",
            "5",
            "--batch-size",
            "128",
            "--out",
            str(out),
        ]
    )
    assert code == 0, output
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == probe.COLUMNS
    for col in [
        "label",
        "store",
        "encoder",
        "weights_sha256",
        "view",
        "lr",
        "wd",
        "epochs",
        "batch_size",
        "normalize",
        "seed",
        "select_on",
        "select_split",
        "report_split",
        "reported_as",
        "train_top1_pct",
        "select_top1_pct",
        "report_top1_pct",
        "train_top5_pct",
        "select_top5_pct",
        "report_top5_pct",
        "selected",
        "best_report",
        "protocol_hash",
        "sweep_seconds",
    ]:
        assert col in reader.fieldnames
    assert not {"test_top1", "val_top1", "seconds"} & set(reader.fieldnames)
    assert len(rows) == 10 and sum(r["selected"] == "true" for r in rows) == 1 and sum(r["best_report"] == "true" for r in rows) == 1
    assert {r["report_split"] for r in rows} == {"test"} and {r["reported_as"] for r in rows} == {"test (reported; selection on val)"}
    record = json.loads((out / "protocol.json").read_text())
    assert record["protocol_hash"] == rows[0]["protocol_hash"] == Protocol.from_dict(record["protocol"]).hash
    assert (out / "accuracy_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))
    assert "| label |" in output and "selected lr" in output and "best-of-sweep" in output and f"wrote {out}/" in output


def test_cli_fixed_lr_and_api_mirror(store, tmp_path):
    code, output = run_cli(
        ["fit", "--store", str(store), "--lr", "0.05", "--epochs", "3", "--batch-size", "256", "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert code == 0, output
    assert "lr (fixed)" in output and "best-of-sweep" not in output
    rows = probe.fit([store], Protocol(lr_grid=[0.05], epochs=3, batch_size=256), device="cpu")
    with open(tmp_path / "o" / "results.csv") as f:
        cli_row = next(csv.DictReader(f))
    assert float(cli_row["report_top1_pct"]) == rows[0]["report_top1_pct"] and cli_row["selected"] == "true"


def test_failed_run_writes_nothing(store, tmp_path, monkeypatch):
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.csv").write_text("previous\n")

    def boom(rows, path, protocol=None):
        raise RuntimeError("disk full")

    monkeypatch.setattr(probe.output.files, "plot", boom)
    code, output = run_cli(["fit", "--store", str(store), "--lr", "0.05", "--epochs", "1", "--out", str(out), "--overwrite"])
    assert_one_line_error(code, output, 1, "RuntimeError", "disk full")
    assert (out / "results.csv").read_text() == "previous\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no temp folder left beside it
    code, output = run_cli(["fit", "--store", str(store), "--lr", "0.05", "--epochs", "1", "--out", str(tmp_path / "new")])
    assert_one_line_error(code, output, 1, "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # a new folder is not left half-made either


@pytest.fixture(scope="module")
def bad_stores(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("bad")
    not_store = root / "plain"
    not_store.mkdir()
    single = {k: (x, np.zeros_like(y), i) for k, (x, y, i) in digits.items()}
    nan_train = make_store(root / "nan.zarr", digits, invalid={"train": list(range(len(digits["train"][1])))})
    return {
        "plain": not_store,
        "incomplete": make_store(root / "inc.zarr", digits, finalize=False),
        "nosplit": make_store(root / "nosplit.zarr", {"a": digits["train"], "b": digits["test"]}),
        "single": make_store(root / "single.zarr", single),
        "other": make_store(root / "other.zarr", digits, manifest="another-manifest"),
        "alltrainnan": nan_train,
    }


@pytest.mark.parametrize(
    "case, args, code, needles",
    [
        ("missing", ["--store", "{root}/nope.zarr", "--lr", "0.1"], 2, ["not found"]),
        ("plain", ["--store", "{plain}", "--lr", "0.1"], 2, ["not a featstore store"]),
        ("incomplete", ["--store", "{incomplete}", "--lr", "0.1"], 2, ["incomplete"]),
        ("view", ["--store", "{good}", "--view", "cls", "--lr", "0.1"], 2, ["view 'cls' not in store", "pixels"]),
        ("split", ["--store", "{nosplit}", "--lr", "0.1"], 2, ["no 'train' split", "a, b"]),
        ("grid", ["--store", "{good}", "--lr-grid", "1e-5:1e-1"], 2, ["start:stop:count"]),
        ("grid-word", ["--store", "{good}", "--lr-grid", "fast"], 2, ["'fast' is not a number"]),
        ("lr-zero", ["--store", "{good}", "--lr", "0"], 2, ["--lr must be positive"]),
        ("grid-zero", ["--store", "{good}", "--lr-grid", "0,0.1"], 2, ["0.0 is not a positive number"]),
        ("grid-neg", ["--store", "{good}", "--lr-grid", "1e-3,-1"], 2, ["-1.0 is not a positive number"]),
        ("both", ["--store", "{good}", "--lr", "0.1", "--lr-grid", "0.1,1"], 2, ["exclusive"]),
        ("single", ["--store", "{single}", "--lr", "0.1"], 2, ["single class"]),
        (
            "manifest",
            ["--store", "{good}", "--store", "{other}", "--lr", "0.1"],
            2,
            ["different data", "manifest_sha256", "--allow-different-data"],
        ),
        ("allinvalid", ["--store", "{alltrainnan}", "--lr", "0.1"], 1, ["no valid rows"]),
        ("choice", ["--store", "{good}", "--normalize", "pca"], 2, ["pca"]),
        ("nostore", ["--lr", "0.1"], 2, ["--store"]),
        ("twice", ["--store", "{good}", "--store", "{good}", "--lr", "0.1"], 2, ["given twice"]),
        ("epochs", ["--store", "{good}", "--epochs", "0"], 2, ["epochs must be >= 1"]),
    ],
)
def test_cli_bad_inputs(case, args, code, needles, bad_stores, store, tmp_path):
    paths = {k: str(v) for k, v in bad_stores.items()}
    args = [a.format(root=tmp_path, good=store, **paths) for a in args]
    out = tmp_path / "out"
    got, output = run_cli(["fit", *args, "--epochs" if "--epochs" not in args else "--seed", "1", "--out", str(out)])
    assert_one_line_error(got, output, code, *needles)
    assert not (out / "results.csv").exists()


def test_allow_different_data_warns(store, bad_stores, tmp_path):
    code, output = run_cli(
        [
            "fit",
            "--store",
            str(store),
            "--store",
            str(bad_stores["other"]),
            "--lr",
            "0.1",
            "--epochs",
            "1",
            "--allow-different-data",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0, output
    assert "warning: stores" in output and "different data" in output


@pytest.mark.slow
def test_debug_shows_traceback_and_console_script(tmp_path):
    code, output = run_cli(["fit", "--store", str(tmp_path / "nope.zarr"), "--debug"])
    assert code == 2 and "Traceback" in output and "error: store" in output
    exe = Path(sys.executable).with_name("probe")
    proc = subprocess.run([str(exe), "fit", "--store", str(tmp_path / "nope.zarr")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: store") and "Traceback" not in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sweep_matches_cpu(store):
    # bfloat16 features on the GPU: the same selection quality as float32 on the CPU
    p = Protocol(lr_grid="1e-3:1e-1:5", **FAST)
    cpu = probe.fit(store, p, device="cpu", warn=lambda m: None)
    gpu = probe.fit(store, p, device="cuda", warn=lambda m: None)
    assert gpu[0]["device"].startswith("cuda") and gpu[0]["dtype"] in ("bfloat16", "float16")
    for a, b in zip(cpu, gpu):
        assert abs(a["select_top1_pct"] - b["select_top1_pct"]) <= 1.5 and abs(a["report_top1_pct"] - b["report_top1_pct"]) <= 1.5
    # k-NN and logistic regression run in float32 on every device: the same choices, accuracies to rounding
    p = Protocol(methods="knn,logreg", knn_k="1,5,20", logreg_C="1e-3:10:5")
    cpu = probe.fit(store, p, device="cpu", warn=lambda m: None)
    gpu = probe.fit(store, p, device="cuda", warn=lambda m: None)
    for a, b in zip(cpu, gpu):
        assert (a["method"], a["k"], a["C"], a["refit"], a["selected"]) == (b["method"], b["k"], b["C"], b["refit"], b["selected"])
        assert abs(a["report_top1_pct"] - b["report_top1_pct"]) <= 0.3


def test_stores_of_different_widths_get_their_own_heads(tmp_path, digits):
    wide = make_store(tmp_path / "wide.zarr", digits)
    narrow = make_store(tmp_path / "narrow.zarr", {k: (x[:, :32], y, i) for k, (x, y, i) in digits.items()})
    rows = probe.fit([wide, narrow], Protocol(lr_grid="1e-2,1e-1", **FAST), device="cpu", warn=lambda m: None)
    assert {r["store"] for r in rows} == {str(wide), str(narrow)} and sum(r["selected"] for r in rows) == 2


# ---------------------------------------------------------------- issue 10: never select on the reported split


def test_imagenet_layout_selects_on_train_holdout_and_reports_val(tmp_path, digits):
    """train + val (no test): the LR is chosen on a train holdout; scrambling val's labels changes the
    reported number but neither the chosen LR nor any selection accuracy."""
    layout = {"train": digits["train"], "val": digits["val"]}
    x, y, ids = digits["val"]
    scrambled = {"train": digits["train"], "val": (x, np.random.default_rng(1).permutation(y)[::-1].copy(), ids)}
    p = Protocol(lr_grid="1e-4,1e-3,1e-2,0.1,1", **FAST)
    a = probe.fit(make_store(tmp_path / "a.zarr", layout), p, device="cpu", warn=lambda m: None)
    b = probe.fit(make_store(tmp_path / "b.zarr", scrambled), p, device="cpu", warn=lambda m: None, allow_different_data=True)
    pick = lambda rows: next(r for r in rows if r["selected"])  # noqa: E731
    assert pick(a)["lr"] == pick(b)["lr"]
    assert [r["select_top1_pct"] for r in a] == [r["select_top1_pct"] for r in b]
    assert pick(b)["report_top1_pct"] < pick(a)["report_top1_pct"] - 50
    r = pick(a)
    assert (r["train_split"], r["select_split"], r["report_split"]) == ("train", "holdout", "val")
    assert r["reported_as"] == "val (reported; selection on a 10% train holdout)"
    # the reported head is the chosen lr refit on train + holdout (#27); the sweep's heads trained without the holdout
    assert r["n_report"] == len(y) and r["refit"] and r["n_train"] == len(digits["train"][1])
    assert all(h["n_train"] + h["n_select"] == len(digits["train"][1]) for h in a if not h["refit"])
    table = probe.output.tables.markdown_table(a, p)
    assert "val (reported; selection on a 10% train holdout)" in table and "(10% train holdout)" in table
    panels = probe.output.plots.plot_panels(a, p)
    assert [c for c, _ in panels] == ["select_top1_pct", "report_top1_pct"]
    assert "10% train holdout" in panels[0][1] and "reported: val" in panels[1][1]


def test_select_on_report_is_opt_in_and_labelled_everywhere(tmp_path, digits):
    layout = {"train": digits["train"], "val": digits["val"]}
    s = make_store(tmp_path / "a.zarr", layout)
    p = Protocol(lr_grid="1e-3,1e-2,0.1", select_on="report", **FAST)
    rows = probe.fit(s, p, device="cpu", warn=lambda m: None, out=tmp_path / "res")
    sel = next(r for r in rows if r["selected"])
    assert sel["select_split"] == sel["report_split"] == "val" and sel["n_train"] == len(digits["train"][1])
    assert sel["report_top1_pct"] == max(r["report_top1_pct"] for r in rows) and sel["best_report"]
    assert all(r["reported_as"] == "val (max over the reported split)" for r in rows)
    with open(tmp_path / "res" / "results.csv") as f:
        assert {r["reported_as"] for r in csv.DictReader(f)} == {"val (max over the reported split)"}
    table = probe.output.tables.markdown_table(rows, p)
    assert "val (max over the reported split)" in table and "--select-on report" in table and "best-of-sweep" not in table
    panels = probe.output.plots.plot_panels(rows, p)
    assert len(panels) == 1 and "max over the reported split" in panels[0][1]
    assert p.hash != p.replace(select_on="auto").hash
    code, output = run_cli(["fit", "--store", str(s), "--select-on", "val", "--lr", "0.1"])
    assert_one_line_error(code, output, 2, "--select-on", "auto")


def test_holdout_selection_forced_on_a_store_with_val_and_test(tmp_path, store, digits):
    rows = probe.fit(store, Protocol(lr_grid="1e-2,0.1", select_on="holdout", **FAST), device="cpu", warn=lambda m: None)
    r = rows[0]
    assert (r["select_split"], r["report_split"]) == ("holdout", "test") and r["n_report"] == len(digits["test"][1])


# ---------------------------------------------------------------- issue 10: outputs that read right


def test_plot_has_title_legends_and_selected_lr_written(tmp_path, digits):
    layout = {"train": digits["train"], "val": digits["val"]}
    a = make_store(tmp_path / "a.zarr", layout)
    b = make_store(tmp_path / "b.zarr", layout)
    p = Protocol(lr_grid="1e-3,1e-2,0.1", **FAST)
    rows = probe.fit([f"first={a}", f"second={b}"], p, device="cpu", warn=lambda m: None)
    fig = probe.output.plots.figure(rows, p)
    title = fig._suptitle.get_text()
    assert "digits" in title and "view pixels" in title and p.hash in title and "5 epochs" in title
    assert len(fig.axes) == 2
    selected = {r["label"]: f"lr {r['lr']:g}" for r in rows if r["selected"]}
    for ax in fig.axes:
        # several lines: each selected LR in the legend (labels at the stars would collide), none at the stars
        legend = ax.get_legend()
        assert legend is not None and [t.get_text() for t in legend.get_texts()] == [f"{k} — ★ {v}" for k, v in selected.items()]
        assert list(ax.texts) == []
    # a single store and a single line: no legend needed, the star still carries its LR
    alone = [r for r in rows if r["label"] == "first"]
    fig = probe.output.plots.figure(alone, p)
    assert all(ax.get_legend() is None and [t.get_text() for t in ax.texts] == [selected["first"]] for ax in fig.axes)


def test_plot_of_several_views_colours_by_store_and_styles_by_view(tmp_path, digits):
    """Stores × views: a store's lines share one colour, a view's lines one line style, so twelve
    and more lines stay readable (a colour per line repeats after ten)."""
    layout = {"train": digits["train"], "val": digits["val"]}
    stores = [f"{name}={make_store(tmp_path / f'{name}.zarr', layout, extra_views=('deep',))}" for name in ("first", "second")]
    p = Protocol(lr_grid="1e-2,0.1", **FAST)
    rows = probe.fit(stores, p, device="cpu", warn=lambda m: None)
    fig = probe.output.plots.figure(rows, p)
    for ax in fig.axes:
        lines = {line.get_label().split(" — ")[0]: line for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert set(lines) == {"first [pixels]", "first [deep]", "second [pixels]", "second [deep]"}
        for store in ("first", "second"):
            assert lines[f"{store} [pixels]"].get_color() == lines[f"{store} [deep]"].get_color()
        assert lines["first [pixels]"].get_color() != lines["second [pixels]"].get_color()
        for view in ("pixels", "deep"):
            assert lines[f"first [{view}]"].get_linestyle() == lines[f"second [{view}]"].get_linestyle()
        assert lines["first [pixels]"].get_linestyle() != lines["first [deep]"].get_linestyle()


def test_line_styles_tell_every_line_apart():
    """Stores × views × extras (wd, few-shot size): no two lines share colour, style and marker;
    one view and no extras keeps a colour per line."""
    from probe.output.plots import line_styles

    keys = [(s, v, e) for s in ("a", "b", "c") for v in ("v1", "v2", "v3", "v4", "v5") for e in (None, 5, 10)]
    styles = line_styles(keys)
    assert len(set(styles.values())) == len(keys)
    assert all(styles[(s, v, e)][0] == "abc".index(s) for s, v, e in keys)  # a store's lines share its colour
    alone = line_styles([("a", "f", None), ("b", "f", None), ("c", "f", None)])
    assert [c for c, _, _ in alone.values()] == [0, 1, 2] and {st for _, st, _ in alone.values()} == {"-"}
    shots = line_styles([("a", "f", None), ("a", "f", 5), ("b", "f", None), ("b", "f", 5)])
    assert len(set(shots.values())) == 4 and shots[("a", "f", None)][0] == shots[("a", "f", 5)][0]
    # more stores than the palette's ten colours: the second round gets other markers
    for views in (("f",), ("f", "g")):
        many = line_styles([(f"s{i}", v, None) for i in range(12) for v in views], colours=10)
        assert len({(c % 10, st, m) for c, st, m in many.values()}) == 12 * len(views)


def test_plot_with_many_lines_puts_one_legend_beside_the_panels(tmp_path, digits):
    """Past six lines the legend leaves the panels (it covered the low-LR curves) for a strip on the right."""
    layout = {"train": digits["train"], "val": digits["val"]}
    stores = [f"s{i}={make_store(tmp_path / f's{i}.zarr', layout, extra_views=('deep',))}" for i in range(4)]
    p = Protocol(lr_grid="1e-2,0.1", **FAST)
    rows = probe.fit(stores, p, device="cpu", warn=lambda m: None)
    fig = probe.output.plots.figure(rows, p)
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 8
    right = max(ax.get_position().x1 for ax in fig.axes)
    assert right < 0.8  # the panels end where the legend's strip begins


def test_out_is_never_silently_overwritten(store, tmp_path):
    out = tmp_path / "res"
    args = ["fit", "--store", str(store), "--lr", "0.05", "--epochs", "1", "--quiet"]
    code, output = run_cli([*args, "--out", str(out)])
    assert code == 0, output
    first = (out / "results.csv").read_text()
    assert len(first.splitlines()) == 2
    code, output = run_cli([*args, "--out", str(out)])
    assert_one_line_error(code, output, 2, "already holds", "--overwrite")
    assert (out / "results.csv").read_text() == first
    (out / "stale.txt").write_text("notes")
    code, output = run_cli([*args, "--seed", "3", "--out", str(out), "--overwrite"])
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",  # a fixed lr: each store's accuracy with its interval, no LR axis
        "predictions.csv",
        "protocol.json",
        "results.csv",
        "stale.txt",
        "summary.csv",
    ]  # others' files stay
    assert len((out / "results.csv").read_text().splitlines()) == 2 and ",3," in (out / "results.csv").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, output = run_cli([*args, "--out", str(mine), "--overwrite"])
    assert_one_line_error(code, output, 2, "not probe results")
    assert (mine / "notes.txt").read_text() == "keep"
    (tmp_path / "afile").write_text("x")
    code, output = run_cli([*args, "--out", str(tmp_path / "afile")])
    assert_one_line_error(code, output, 2, "is a file")


def test_default_out_is_a_new_run_folder_each_time(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--store", str(store), "--lr", "0.05", "--epochs", "1", "--quiet"]
    outputs = [run_cli(args) for _ in range(2)]
    runs = sorted((tmp_path / "probe-results").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("run-") for r in runs)
    for (code, output), run in zip(outputs, runs):
        assert code == 0, output
        assert f"wrote probe-results/{run.name}/" in output
        assert len((run / "results.csv").read_text().splitlines()) == 2


# ---------------------------------------------------------------- issue 10: names and flags


def test_probe_help_version_and_every_option_documented():
    for flag in ("-h", "--help"):
        code, output = run_cli([flag])
        assert code == 0 and "Usage: probe" in output and "fit" in output
    code, output = run_cli(["fit", "-h"])
    assert code == 0 and "--select-on" in output and "[LABEL=]PATH[:VIEW]" in output
    code, output = run_cli(["--version"])
    assert code == 0 and output.strip() == f"probe, version {__import__('featstore').__version__}"
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and len(param.help) > 10, f"probe {name} {param.opts[0]} has no help"
        # the help as printed: click does no %-formatting, so an escaped '%%' would show as typed
        shown = command.get_help(click.Context(command, info_name=name))
        assert "%%" not in shown, f"probe {name} --help shows '%%'"
