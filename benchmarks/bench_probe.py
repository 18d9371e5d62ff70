"""Benchmark: a 13-LR linear-probe sweep, batched (probe.methods.heads) vs the usual ways, in one run.

Sizes: ``cifar`` (50,000 × 512 train, 10 classes; CPU or GPU) and ``imagenet`` (1,281,167 × 768,
1,000 classes; CUDA only, skipped without it). Features are synthetic (Gaussian classes with
correlated noise, per-dimension scale and offset), so accuracy is comparable across methods but
not with any paper. Measured in the same run:

  batched    every head of the grid at once (probe.methods.heads: one GEMM per step for all heads)
  (a) loop   the same grid as 13 sequential single-head trainings: nn.Linear, torch.optim.SGD,
             cosine LambdaLR, DataLoader(TensorDataset) over the cached, normalized features
  (b) sklearn LogisticRegression (lbfgs) over 13 C values on the same normalized features
  (c) matmul the achieved FLOP rate of the batched training against a large fp32 (CPU) or
             bf16 (GPU) torch matmul measured just before

plus ``digits``: the real 8×8 scans of scikit-learn (1,797 rows) as a real-feature accuracy check
(batched sweep vs LogisticRegression tuned over C, both selected on the same val split).

    .venv/bin/python benchmarks/bench_probe.py                 # cifar (+ imagenet with CUDA) + digits
    .venv/bin/python benchmarks/bench_probe.py --sizes cifar --baseline-lrs 3   # quicker, extrapolated

Prints a table and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import matmul_rate, sync
from featstore.device import compute_dtype, resolve_device
from probe.methods import heads as H
from probe.protocol import Protocol
from probe.selection import choose

SIZES = {
    "cifar": dict(train=50_000, val=5_000, test=10_000, dim=512, classes=10, sep=0.15),
    "imagenet": dict(train=1_281_167, val=50_000, test=50_000, dim=768, classes=1000, sep=0.12),
}
C_GRID = np.logspace(-4, 2, 13)  # inverse L2 strength; spans under- to un-regularized on standardized features


def synth(n: int, dim: int, classes: int, sep: float, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic features: class means + low-rank correlated noise + isotropic noise, then a
    per-dimension scale and offset (so normalization matters, as with real encoders)."""
    g = torch.Generator(device="cpu").manual_seed(1234)  # class structure shared by all splits
    mu = torch.randn(classes, dim, generator=g) * sep
    rank = 32
    mix = torch.randn(rank, dim, generator=g) / math.sqrt(rank)
    scale = torch.rand(dim, generator=g) * 2.8 + 0.2
    offset = torch.rand(dim, generator=g) * 2
    mu, mix, scale, offset = (t.to(device) for t in (mu, mix, scale, offset))
    gs = torch.Generator(device=device).manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gs, device=device)
    store_dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.empty(n, dim, dtype=store_dtype, device=device)
    step = 1 << 16
    for i in range(0, n, step):
        m = min(step, n - i)
        z = mu[y[i : i + m]] + torch.randn(m, rank, generator=gs, device=device) @ mix + torch.randn(m, dim, generator=gs, device=device)
        x[i : i + m] = (z * scale + offset).to(store_dtype)
    return x, y


def batched_sweep(data, protocol: Protocol, device: torch.device) -> dict:
    """The probe.methods.heads path: normalize on the device, train all heads at once, evaluate, select."""
    sync(device)
    t0 = time.perf_counter()
    xs = {k: v[0].to(device) for k, v in data.items()}
    ys = {k: v[1].to(device) for k, v in data.items()}
    dtype = compute_dtype(device)
    stats = H.standardize_stats(xs["train"]) if protocol.normalize == "standardize" else None
    xs = {k: H.prepare(v, protocol.normalize, dtype, stats) for k, v in xs.items()}
    n, dim = xs["train"].shape
    classes = int(max(int(y.max()) for y in ys.values())) + 1
    orders = torch.from_numpy(H.epoch_orders(n, protocol.epochs, protocol.seed)).to(device)
    lrs = [lr for lr, _ in protocol.heads]
    wds = [wd for _, wd in protocol.heads]
    heads = H.LinearHeads(dim, classes, lrs, wds, device)
    sync(device)
    t1 = time.perf_counter()
    H.train(xs["train"], ys["train"], heads, protocol, orders)
    sync(device)
    t2 = time.perf_counter()
    metrics = {k: H.evaluate(heads, xs[k], ys[k]) for k in ("val", "test")}
    finite = heads.finite().cpu().numpy()
    sync(device)
    t3 = time.perf_counter()
    chosen = choose(metrics["val"]["top1"], list(zip(lrs, wds)), finite)
    train_flops = protocol.epochs * 4 * n * dim * len(lrs) * classes  # forward GEMM + weight-gradient GEMM
    return {
        "seconds": t3 - t0,
        "train_seconds": t2 - t1,
        "train_flops": train_flops,
        "val_top1": metrics["val"]["top1"].tolist(),
        "test_top1": metrics["test"]["top1"].tolist(),
        "selected": {
            "lr": lrs[chosen],
            "val_top1": float(metrics["val"]["top1"][chosen]),
            "test_top1": float(metrics["test"]["top1"][chosen]),
        },
    }


def loop_sweep(data, protocol: Protocol, device: torch.device, lr_subset: list[float]) -> dict:
    """(a) The textbook way: one training per LR, DataLoader over the cached (normalized) features."""
    from torch.utils.data import DataLoader, TensorDataset

    dtype = torch.float32
    xs = {k: v[0].float() for k, v in data.items()}
    if protocol.normalize == "standardize":
        mean, inv_std = H.standardize_stats(xs["train"])
        xs = {k: (v - mean) * inv_std for k, v in xs.items()}
    ys = {k: v[1] for k, v in data.items()}
    xs = {k: v.cpu() for k, v in xs.items()}
    ys = {k: v.cpu() for k, v in ys.items()}
    dim = xs["train"].shape[1]
    classes = int(max(int(y.max()) for y in ys.values())) + 1
    per_lr = []
    for lr in lr_subset:
        sync(device)
        t0 = time.perf_counter()
        torch.manual_seed(protocol.seed)
        loader = DataLoader(TensorDataset(xs["train"], ys["train"]), batch_size=protocol.batch_size, shuffle=True)
        model = torch.nn.Linear(dim, classes).to(device=device, dtype=dtype)
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=protocol.momentum)
        total = protocol.epochs * len(loader)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t, total=total: 0.5 * (1 + math.cos(math.pi * t / total)))
        for _ in range(protocol.epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        acc = {}
        with torch.no_grad():
            for k in ("val", "test"):
                correct = 0
                for i in range(0, len(ys[k]), 8192):
                    correct += int((model(xs[k][i : i + 8192].to(device)).argmax(1) == ys[k][i : i + 8192].to(device)).sum())
                acc[k] = 100.0 * correct / len(ys[k])
        sync(device)
        per_lr.append({"lr": lr, "seconds": time.perf_counter() - t0, "val_top1": acc["val"], "test_top1": acc["test"]})
    return {"per_lr": per_lr, "seconds_measured": sum(r["seconds"] for r in per_lr)}


def sklearn_sweep(data, c_values, max_iter: int) -> dict:
    """(b) scikit-learn LogisticRegression (lbfgs, multinomial) over C, standardized features, select on val."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = {k: v[0].float().cpu().numpy() for k, v in data.items()}
    y = {k: v[1].cpu().numpy() for k, v in data.items()}
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(x["train"])
    x = {k: scaler.transform(v) for k, v in x.items()}
    per_c = []
    for c in c_values:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=float(c), max_iter=max_iter).fit(x["train"], y["train"])
        per_c.append(
            {
                "C": float(c),
                "seconds": time.perf_counter() - t,
                "n_iter": int(np.max(model.n_iter_)),
                "val_top1": 100.0 * model.score(x["val"], y["val"]),
                "test_top1": 100.0 * model.score(x["test"], y["test"]),
            }
        )
    best = min(per_c, key=lambda r: (-r["val_top1"], r["C"]))  # ties → smaller C, as probe's ties → smaller lr
    return {"per_c": per_c, "seconds": time.perf_counter() - t0, "selected": best}


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, train_size=0.6, stratify=y, random_state=0)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=0)
    return {k: (torch.from_numpy(x[i]), torch.from_numpy(y[i])) for k, i in (("train", tr), ("val", va), ("test", te))}


def write_store(path: Path, data) -> Path:
    """``data`` ({split: (features, labels)}) as a complete float16 feature store with one view, ``feat``."""
    from featstore.store import FeatureStore

    dim = data["train"][0].shape[1]
    splits = {k: ([f"{i}" for i in range(len(y))], y.cpu().numpy()) for k, (x, y) in data.items()}
    store = FeatureStore.create(
        path,
        splits=splits,
        views={"feat": dim},
        dtype="float16",
        chunk_rows=8192,
        attrs={"encoder": {"name": "synthetic"}, "dataset": {"name": "synthetic", "manifest_sha256": "bench"}},
    )
    for k, (x, _y) in data.items():
        x16 = x.cpu().to(torch.float16).numpy()
        for u in store.units(k):
            store.write_unit(u, {"feat": x16[u.start : u.stop]}, np.ones(u.rows, bool))
    store.finalize()
    return path


def end_to_end(data, protocol: Protocol, device: torch.device) -> dict:
    """``probe.fit`` from a float16 feature store on disk: read once, train, evaluate, select."""
    import tempfile

    import probe

    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        path = write_store(Path(tmp) / "feats.zarr", data)
        t = time.perf_counter()
        rows = probe.fit(path, protocol, device=device, warn=lambda m: None)
        seconds = time.perf_counter() - t
    sel = next(r for r in rows if r["selected"])
    return {"seconds": seconds, "selected": {"lr": sel["lr"], "val_top1": sel["select_top1_pct"], "test_top1": sel["report_top1_pct"]}}


def fmt_row(cells, widths):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="cifar,imagenet", help="comma list of cifar, imagenet")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument(
        "--baseline-lrs", type=int, default=13, help="LRs the (a) loop baseline runs; fewer are extrapolated to 13 and labelled so"
    )
    ap.add_argument("--sklearn-max-iter", type=int, default=1000)
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the BLAS under scikit-learn (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            pass

    device = resolve_device(args.device)
    protocol = Protocol(epochs=args.epochs, batch_size=args.batch_size)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "protocol": protocol.to_dict(),
        "protocol_hash": protocol.hash,
        "results": {},
    }
    # the CPU may be shared: record the load so contended numbers can be told apart
    report["loadavg_start"] = os.getloadavg()
    rate = matmul_rate(device, compute_dtype(device))
    report["matmul_flops"] = rate
    print(f"device {device} ({compute_dtype(device)}); measured 4096³ matmul: {rate / 1e9:.1f} GFLOP/s", flush=True)
    print(
        f"protocol {protocol.hash}: {len(protocol.lr_grid)} LRs {protocol.lr_grid[0]:g}…{protocol.lr_grid[-1]:g}, {protocol.epochs} epochs, batch {protocol.batch_size}, {protocol.optimizer}, {protocol.normalize}",
        flush=True,
    )

    lines = []
    widths = [9, 44, 10, 12, 10, 10, 9]
    lines.append(fmt_row(["size", "method", "seconds", "selected", "val top-1", "test top-1", "speedup"], widths))
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")

    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        spec = SIZES[size]
        if size == "imagenet" and device.type != "cuda":
            print("imagenet size: skipped (needs CUDA)", flush=True)
            report["results"][size] = {"skipped": "no CUDA device"}
            continue
        t = time.perf_counter()
        data = {
            k: synth(spec[k], spec["dim"], spec["classes"], spec["sep"], seed, device) for seed, k in enumerate(("train", "val", "test"))
        }
        print(
            f"{size}: synthetic features {spec['train']}×{spec['dim']} ({spec['classes']} classes) made in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
        res = {"spec": spec}
        b = batched_sweep(data, protocol, device)
        b["achieved_flops"] = b["train_flops"] / b["train_seconds"]
        b["fraction_of_matmul"] = b["achieved_flops"] / rate
        res["batched"] = b
        print(
            f"  batched: {b['seconds']:.2f}s total, {b['train_seconds']:.2f}s training at {b['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * b['fraction_of_matmul']:.0f}% of matmul",
            flush=True,
        )
        lines.append(
            fmt_row(
                [
                    size,
                    f"batched: {len(protocol.heads)} heads at once",
                    f"{b['seconds']:.2f}",
                    f"lr {b['selected']['lr']:g}",
                    f"{b['selected']['val_top1']:.2f}",
                    f"{b['selected']['test_top1']:.2f}",
                    "1×",
                ],
                widths,
            )
        )
        lines.append(
            fmt_row(
                [
                    size,
                    f"(c) FLOP rate: {b['achieved_flops'] / 1e9:.1f} of {rate / 1e9:.1f} GFLOP/s",
                    f"{b['train_seconds']:.2f}",
                    "",
                    "",
                    "",
                    f"{100 * b['fraction_of_matmul']:.0f}%",
                ],
                widths,
            )
        )

        if size == "cifar":
            e = end_to_end(data, protocol, device)
            res["probe_fit_from_store"] = e
            print(f"  probe.fit from a float16 store: {e['seconds']:.2f}s", flush=True)
            lines.append(
                fmt_row(
                    [
                        size,
                        "probe.fit end to end (float16 Zarr store)",
                        f"{e['seconds']:.2f}",
                        f"lr {e['selected']['lr']:g}",
                        f"{e['selected']['val_top1']:.2f}",
                        f"{e['selected']['test_top1']:.2f}",
                        "",
                    ],
                    widths,
                )
            )

        if not args.skip_baselines:
            k = max(1, min(args.baseline_lrs, len(protocol.lr_grid)))
            if size == "imagenet":
                k = 1
            subset = [protocol.lr_grid[i] for i in np.linspace(0, len(protocol.lr_grid) - 1, k).round().astype(int)]
            loop_protocol = protocol if size != "imagenet" else protocol.replace(epochs=1)
            a = loop_sweep(data, loop_protocol, device, subset)
            scale = (len(protocol.lr_grid) / len(subset)) * (protocol.epochs / loop_protocol.epochs)
            a["seconds_for_sweep"] = a["seconds_measured"] * scale
            a["extrapolated"] = scale != 1
            a["speedup_batched"] = a["seconds_for_sweep"] / b["seconds"]
            res["loop"] = a
            label = "(a) 13 × DataLoader loop" + (
                f" [measured {len(subset)} LR × {loop_protocol.epochs} ep, ×{scale:g} extrapolated]" if a["extrapolated"] else ""
            )
            if len(subset) == len(protocol.lr_grid):
                lv = np.array([r["val_top1"] for r in a["per_lr"]])
                chosen = choose(lv, [(lr, 0.0) for lr in protocol.lr_grid], np.ones(len(lv), bool))
                a["selected"] = a["per_lr"][chosen]
                sel = (f"lr {a['selected']['lr']:g}", f"{a['selected']['val_top1']:.2f}", f"{a['selected']['test_top1']:.2f}")
            else:
                sel = ("", "", "")
            print(
                f"  (a) loop: {a['seconds_measured']:.1f}s measured, {a['seconds_for_sweep']:.1f}s for the sweep → batched is {a['speedup_batched']:.1f}× faster",
                flush=True,
            )
            lines.append(fmt_row([size, label, f"{a['seconds_for_sweep']:.2f}", *sel, f"{a['speedup_batched']:.1f}×"], widths))
            if size != "imagenet":
                s = sklearn_sweep(data, C_GRID, args.sklearn_max_iter)
                s["speedup_batched"] = s["seconds"] / b["seconds"]
                res["sklearn"] = s
                print(f"  (b) sklearn: {s['seconds']:.1f}s → batched is {s['speedup_batched']:.1f}× faster", flush=True)
                lines.append(
                    fmt_row(
                        [
                            size,
                            f"(b) sklearn LogisticRegression, 13 C (max_iter {args.sklearn_max_iter})",
                            f"{s['seconds']:.2f}",
                            f"C {s['selected']['C']:.3g}",
                            f"{s['selected']['val_top1']:.2f}",
                            f"{s['selected']['test_top1']:.2f}",
                            f"{s['speedup_batched']:.1f}×",
                        ],
                        widths,
                    )
                )
            else:
                res["sklearn"] = {"skipped": "1.28M × 768 × 1000 classes is out of reach for lbfgs in a benchmark run"}
        report["results"][size] = res
        del data
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # real features: digits pixels, batched (default protocol) vs sklearn tuned over C on the same val split
    try:
        digits = digits_data()
    except ImportError:  # the GPU machine may lack scikit-learn
        digits = None
        report["results"]["digits"] = {"skipped": "scikit-learn not installed"}
    if digits is not None:
        dp = Protocol()
        db = batched_sweep(digits, dp, torch.device("cpu"))
        ds = sklearn_sweep(digits, np.logspace(-4, 4, 17), 5000)
        report["results"]["digits"] = {
            "protocol": dp.to_dict(),
            "protocol_hash": dp.hash,
            "batched": db,
            "sklearn": ds,
            "test_top1_difference": db["selected"]["test_top1"] - ds["selected"]["test_top1"],
        }
        lines.append(
            fmt_row(
                [
                    "digits",
                    f"batched, default protocol {dp.hash[:8]}",
                    f"{db['seconds']:.2f}",
                    f"lr {db['selected']['lr']:g}",
                    f"{db['selected']['val_top1']:.2f}",
                    f"{db['selected']['test_top1']:.2f}",
                    "",
                ],
                widths,
            )
        )
        lines.append(
            fmt_row(
                [
                    "digits",
                    "sklearn LogisticRegression, 17 C",
                    f"{ds['seconds']:.2f}",
                    f"C {ds['selected']['C']:.3g}",
                    f"{ds['selected']['val_top1']:.2f}",
                    f"{ds['selected']['test_top1']:.2f}",
                    "",
                ],
                widths,
            )
        )

    report["loadavg_end"] = os.getloadavg()
    table = "\n".join(lines)
    print()
    print(table)
    print(
        f"load average at start {report['loadavg_start'][0]:.2f}, at end {report['loadavg_end'][0]:.2f} (1-minute; {os.cpu_count()} CPUs)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["table"] = table
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"bench_probe-{stamp}.json", "bench_probe-latest.json"):
        (out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out / f'bench_probe-{stamp}.json'}")


if __name__ == "__main__":
    main()
