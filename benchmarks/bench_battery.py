"""Benchmark: the evaluation battery's methods against their usual implementations, in one run.

  knn      probe.methods.knn (chunked cosine similarity, one top-200 serving k = 10, 20, 100, 200) vs
           scikit-learn's brute-force KNeighborsClassifier(metric="cosine") predicting each k
           (4 fits + predicts), on 50,000 train × 10,000 query × 512 (10 classes).
           With CUDA also ImageNet size: 1,281,167 × 50,000 × 384, 1,000 classes (ours only).
  logreg   probe.methods.logreg's warm-started L-BFGS path over 13 C (1e-4…1e2) vs scikit-learn's
           LogisticRegression(lbfgs, warm_start=True, max_iter=1000) walking the same 13 C, on the
           same standardised 50,000 × 512 rows (10 classes); accuracy at every C compared.
  battery  ``probe.fit`` from a float16 Zarr store (CIFAR size: 50,000 train, 5,000 val, 10,000
           test × 512), methods linear (13 LRs, 10 epochs, batch 1024), knn (4 k) and logreg
           (13 C), 5 seeds: the whole battery end to end, against the issue's 2-minute budget.

Features are synthetic (bench_probe.synth: Gaussian classes, correlated noise, per-dimension
scale and offset). Prints a table and writes JSON to benchmarks/out/.

    .venv/bin/python benchmarks/bench_battery.py --threads 1
    .venv/bin/python benchmarks/bench_battery.py --parts knn --device cuda --sizes imagenet
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probe import synth, write_store
from common import OUT_DIR, machine, sync, table, write_json
from featstore.device import resolve_device
from probe.methods import heads as H
from probe.methods import knn, logreg

KNN_SIZES = {
    "cifar": dict(train=50_000, query=10_000, dim=512, classes=10, sep=0.15),
    # sep 0.5: k-NN top-1 well above chance (at 0.12 it was 0.15%, chance 0.1%, which could hide a wrong answer)
    "imagenet": dict(train=1_281_167, query=50_000, dim=384, classes=1000, sep=0.5),
}
CHECK_ROWS = 1000  # query rows whose predictions are recomputed in float64 (the GPU run's correctness check)
KS = (10, 20, 100, 200)
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))


def bench_knn(size: str, device: torch.device, baseline: bool) -> list[dict]:
    spec = KNN_SIZES[size]
    train_x, train_y = synth(spec["train"], spec["dim"], spec["classes"], spec["sep"], 0, device)
    query_x, query_y = synth(spec["query"], spec["dim"], spec["classes"], spec["sep"], 1, device)
    rows = []
    for weights in ("exp", "uniform"):
        sync(device)
        t = time.perf_counter()
        a = knn.l2_normalize(train_x)
        q = knn.l2_normalize(query_x)
        pred = knn.predict(a, train_y, q, KS, spec["classes"], weights=weights)
        sync(device)
        seconds = time.perf_counter() - t
        acc = pred.accuracy(query_y.cpu().numpy())["top1"]
        row = {
            "part": "knn",
            "size": size,
            "method": f"probe.methods.knn {weights}, 4 k in one pass",
            "seconds": seconds,
            "top1": " / ".join(f"{v:.2f}" for v in acc),
            "pred": pred if weights == "uniform" else None,
        }
        if not baseline:  # no scikit-learn run to agree with: check against the rule in float64 instead
            same = float64_agreement(train_x, train_y, query_x[:CHECK_ROWS], pred.top1[:, :CHECK_ROWS], spec["classes"], weights)
            row["note"] = "top-1 = float64 direct rule on " + " / ".join(f"{v:.1f}%" for v in same) + f" of {CHECK_ROWS:,} rows"
        rows.append(row)
        del a, q
    if baseline:
        from sklearn.neighbors import KNeighborsClassifier

        xt, yt, xq, yq = (v.float().cpu().numpy() for v in (train_x, train_y, query_x, query_y))
        t = time.perf_counter()
        preds = []
        for k in KS:
            preds.append(KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(xt, yt).predict(xq))
        seconds = time.perf_counter() - t
        ours = rows[1].pop("pred")
        agree = [float((p == ours.top1[j]).mean() * 100) for j, p in enumerate(preds)]
        rows.append(
            {
                "part": "knn",
                "size": size,
                "method": "sklearn KNeighborsClassifier brute cosine, 4 × predict",
                "seconds": seconds,
                "top1": " / ".join(f"{(p == yq).mean() * 100:.2f}" for p in preds),
                "note": "uniform predictions identical to ours on " + " / ".join(f"{a:.2f}%" for a in agree) + " of rows",
            }
        )
        for r in rows[:2]:
            r["speedup"] = seconds / r["seconds"]
    for r in rows:
        r.pop("pred", None)
    return rows


def float64_agreement(train_x, train_y, query_x, top1, classes: int, weights: str, chunk: int = 50) -> list[float]:
    """Percent of rows whose top-1 per k equals the k-NN rule computed directly in float64 (full
    similarity row, sort, vote sum, argmax: ties to the smaller class, as probe.methods.knn)."""
    a = train_x.double()
    a /= a.norm(dim=1, keepdim=True)
    q = query_x.double()
    q /= q.norm(dim=1, keepdim=True)
    y = train_y.long()
    same = np.zeros(len(KS))
    for i in range(0, len(q), chunk):
        values, index = (q[i : i + chunk] @ a.t()).sort(dim=1, descending=True)
        for j, k in enumerate(KS):
            w = (values[:, :k] / knn.DEFAULT_TEMPERATURE).exp() if weights == "exp" else torch.ones_like(values[:, :k])
            votes = torch.zeros(len(w), classes, dtype=torch.float64, device=w.device).scatter_add_(1, y[index[:, :k]], w)
            same[j] += (votes.argmax(1).cpu().numpy() == top1[j, i : i + chunk]).sum()
    return list(same * 100.0 / len(q))


def bench_logreg(device: torch.device, baseline: bool) -> list[dict]:
    train_x, train_y = synth(50_000, 512, 10, 0.15, 0, device)
    test_x, test_y = synth(10_000, 512, 10, 0.15, 2, device)
    sync(device)
    t = time.perf_counter()
    stats = H.standardize_stats(train_x)
    xs = H.prepare(train_x, "standardize", torch.float32, stats)
    xt = H.prepare(test_x, "standardize", torch.float32, stats)
    sync(device)
    t_path = time.perf_counter()
    path = logreg.fit_path(xs, train_y, C_GRID, 10)
    sync(device)
    t_predict = time.perf_counter()
    top1, _ = path.predict(xt)
    sync(device)
    t_end = time.perf_counter()
    seconds = t_end - t
    yt = test_y.cpu().numpy()
    ours_acc = [float((top1[i] == yt).mean() * 100) for i in range(len(C_GRID))]
    rows = [
        {
            "part": "logreg",
            "size": "cifar",
            "method": "probe.methods.logreg warm-started L-BFGS path, 13 C",
            "seconds": seconds,
            "top1": f"best {max(ours_acc):.2f}",
            "iterations": sum(path.n_iter),
            "per_c": ours_acc,
            "n_iter": path.n_iter,
            "passes": path.passes,
            "split_s": {"standardize": t_path - t, "path": t_predict - t_path, "predict": t_end - t_predict},
            "note": f"{path.passes} data passes; standardise {t_path - t:.2f} s + path {t_predict - t_path:.2f} s + predict {t_end - t_predict:.2f} s",
        }
    ]
    if baseline:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        x_np, y_np, xt_np = xs.cpu().numpy(), train_y.cpu().numpy(), xt.cpu().numpy()
        model = LogisticRegression(max_iter=1000, warm_start=True)
        sk_acc, sk_iter = [], []
        t = time.perf_counter()
        for C in C_GRID:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.set_params(C=C).fit(x_np, y_np)
            sk_acc.append(float((model.predict(xt_np) == yt).mean() * 100))
            sk_iter.append(int(np.max(model.n_iter_)))
        seconds = time.perf_counter() - t
        diff = max(abs(a - b) for a, b in zip(ours_acc, sk_acc))
        rows.append(
            {
                "part": "logreg",
                "size": "cifar",
                "method": "sklearn LogisticRegression lbfgs warm_start path, 13 C",
                "seconds": seconds,
                "top1": f"best {max(sk_acc):.2f}",
                "iterations": sum(sk_iter),
                "per_c": sk_acc,
                "n_iter": sk_iter,
                "note": f"largest |test top-1 difference| over the 13 C: {diff:.2f} pt",
            }
        )
        rows[0]["speedup"] = seconds / rows[0]["seconds"]
        # the same work as scikit-learn's timed part (its rows come standardised): path + predict
        rows[0]["speedup_path_predict"] = seconds / (rows[0]["split_s"]["path"] + rows[0]["split_s"]["predict"])
        rows[0]["note"] += f"; path + predict alone {rows[0]['speedup_path_predict']:.1f}× scikit-learn"
        rows[0]["max_abs_diff_pt"] = diff
    return rows


def bench_full_battery(device: torch.device) -> list[dict]:
    import tempfile

    import probe
    from probe import Protocol

    data = {k: synth(n, 512, 10, 0.15, seed, device) for seed, (k, n) in enumerate((("train", 50_000), ("val", 5_000), ("test", 10_000)))}
    protocol = Protocol(epochs=10, batch_size=1024, methods="linear,knn,logreg", logreg_C=list(C_GRID), seeds="0,1,2,3,4")
    with tempfile.TemporaryDirectory(prefix="bench-battery-") as tmp:
        path = write_store(Path(tmp) / "feats.zarr", data)
        t = time.perf_counter()
        rows = probe.fit(path, protocol, device=device, warn=lambda m: None)
        seconds = time.perf_counter() - t
    from probe.output.tables import summary
    from probe.results.summary import mean_std

    per_method = {}
    for r in rows:
        per_method[r["method"]] = per_method.get(r["method"], 0.0) + (r["sweep_seconds"] if r["selected"] else 0.0)
    text = "; ".join(f"{e['method']} {mean_std(e)} ({e['selected']})" for e in summary(rows))
    return [
        {
            "part": "battery",
            "size": "cifar",
            "method": "probe.fit linear+knn+logreg, 5 seeds, float16 store",
            "seconds": seconds,
            "top1": text,
            "note": "seconds per method, all seeds: "
            + ", ".join(f"{m} {v:.1f}" for m, v in per_method.items())
            + f"; protocol {protocol.hash}",
        }
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="knn,logreg,battery", help="comma list of knn, logreg, battery")
    ap.add_argument("--sizes", default="cifar,imagenet", help="k-NN sizes (imagenet needs CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and scikit-learn's BLAS/OpenMP")
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    device = resolve_device(args.device)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    report = {"machine": machine(), "device": str(device), "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": []}
    rows: list[dict] = []
    if "knn" in parts:
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            if size == "imagenet" and device.type != "cuda":
                print("k-NN imagenet size: skipped (needs CUDA)", flush=True)
                continue
            rows += bench_knn(size, device, baseline=not args.skip_baselines and size != "imagenet")
            print(table(rows[-3:], COLUMNS), flush=True)
    if "logreg" in parts:
        rows += bench_logreg(device, baseline=not args.skip_baselines)
        print(table(rows[-2:], COLUMNS), flush=True)
    if "battery" in parts:
        rows += bench_full_battery(device)
        print(table(rows[-1:], COLUMNS), flush=True)
    report["rows"] = rows
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = table(rows, COLUMNS)
    print()
    print(text)
    print(f"load average at start {report['machine']['load_average'][0]}, at end {report['load_average_end'][0]} ({os.cpu_count()} CPUs)")
    report["table"] = text
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = write_json(Path(args.out) / f"bench_battery-{stamp}.json", report)
    print(f"wrote {path}")


COLUMNS = [("part", "part", ""), ("size", "size", ""), ("method", "method", ""), ("seconds", "seconds", ".2f"),
           ("speedup", "ours is", ".1f"), ("top1", "test top-1 (%)", ""), ("iterations", "iters", "d"), ("note", "note", "")]  # fmt: skip

if __name__ == "__main__":
    main()
