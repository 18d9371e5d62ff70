"""Measurement (issue #25): a linear probe trained on K augmented views vs on the center crop, on imagenette.

One store holds, for a subset of imagenette (``--per-class`` train images of each class, and
``--val-per-class`` val images of each class; seeded, evenly spaced), the center crop of every
image and K random-resized-crop + flip views of each train image (``featstore extract --augment
rrc-flip --augment-views K``). ``probe fit`` runs twice on it under the same protocol but for
``--augment on`` / ``off``: the same rows, the same minibatch orders, the same LR grid; the LR is
selected on a seeded 10% holdout of train (center crops) and val is reported once. Printed and
written: each run's reported top-1 with its bootstrap interval, the paired difference on the same
val images with its interval and McNemar's p, the store's bytes with and without the views, and
the extraction time.

The encoder is what earlier imagenette measurements used offline (docs/probe.md, "Worked example"):
ResNet-18, random init, at 64 px (resize 72) on CPU: no pretrained weights are on this machine.

    .venv/bin/python benchmarks/bench_augment_probe.py --per-class 100 --val-per-class 50 --views 10
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

import probe
from common import IMAGENETTE, OUT_DIR, fail, machine, table, write_json
from featstore.extraction import ExtractConfig, extract
from featstore.store import FeatureStore
from probe.intervals import paired_difference


def file_list(root: Path, per_class: int, val_per_class: int, out: Path) -> Path:
    rows = []
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    for split, n in (("train", per_class), ("val", val_per_class)):
        for label, c in enumerate(classes):
            files = sorted((root / split / c).glob("*.JPEG"))
            step = max(1, len(files) // n)
            rows += [(str(f), label, split) for f in files[::step][:n]]
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=IMAGENETTE)
    ap.add_argument("--work", type=Path, default=OUT_DIR / "augment-probe")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr-grid", default="1e-4:1:9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT_DIR / "augment-probe.json")
    args = ap.parse_args()
    if not (args.data / "train").is_dir():
        fail(f"no imagenette at {args.data} (pass --data)")
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = file_list(args.data, args.per_class, args.val_per_class, args.work / "subset.csv")
    common = dict(model="resnet18", dataset=str(dataset), random_init=True, loader="torch", device="cpu", workers=1,
                  image_size=64, resize=72, batch_size=66)  # fmt: skip
    timings = {}
    for name, extra in (("center", {}), ("views", {"augment": "rrc-flip", "augment_views": args.views})):
        t0 = time.perf_counter()
        result = extract(ExtractConfig(out=str(args.work / f"{name}.zarr"), **common, **extra), progress=False)  # type: ignore[arg-type]
        timings[name] = {"seconds": time.perf_counter() - t0, "status": result.status, "rows": result.rows}
    views_store = FeatureStore.open(args.work / "views.zarr")
    center_store = FeatureStore.open(args.work / "center.zarr")
    runs = {}
    for augment in ("on", "off"):
        protocol = probe.Protocol(lr_grid=args.lr_grid, epochs=args.epochs, seed=args.seed, augment=augment)
        t0 = time.perf_counter()
        fit = probe.fit_run([f"K{args.views}-{augment}={args.work / 'views.zarr'}"], protocol, device="cpu", verify=True)
        selected = next(r for r in fit.rows if r["selected"])
        # the refit row (the reported model) has no holdout number: the sweep's row of the same lr has it
        swept = next(r for r in fit.rows if r["lr"] == selected["lr"] and not r["refit"])
        predictions = selected["report_predictions"]
        runs[augment] = {
            "seconds": time.perf_counter() - t0,
            "lr": selected["lr"],
            "select_top1": swept["select_top1_pct"],
            "report_top1": selected["report_top1_pct"],
            "ci95": [selected["ci95_low"], selected["ci95_high"]],
            "train_loss": selected["train_loss"],
            "augment": selected["augment"],
            "protocol_hash": selected["protocol_hash"],
            "correct": (np.asarray(predictions["pred"]) == np.asarray(predictions["target"])),
            "paths": list(predictions["paths"]),
        }
    assert runs["on"]["paths"] == runs["off"]["paths"], "the two runs reported other images"
    diff = paired_difference(runs["on"]["correct"], runs["off"]["correct"])
    info = views_store.info()
    rows = [
        {"run": f"--augment on ({args.views} views)", **{k: v for k, v in runs["on"].items() if k not in ("correct", "paths")}},
        {"run": "--augment off (center crop)", **{k: v for k, v in runs["off"].items() if k not in ("correct", "paths")}},
    ]
    for r in rows:
        r["ci"] = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
    print(table(rows, [("run", "run", "s"), ("lr", "selected lr", "g"), ("select_top1", "holdout top-1", ".2f"),
                       ("report_top1", "val top-1", ".2f"), ("ci", "95% CI", "s"), ("protocol_hash", "protocol", "s")]))  # fmt: skip
    print(
        f"\npaired Δ (on − off) on the same {diff.n} val images: {diff.delta:+.2f} points [{diff.ci95[0]:+.2f}, {diff.ci95[1]:+.2f}], "
        f"McNemar n01/n10 {diff.test.n01}/{diff.test.n10}, p = {diff.test.p:.3g}"
    )
    center_bytes, views_bytes = center_store.size_on_disk(), views_store.size_on_disk()
    print(
        f"store: {center_bytes / 1e6:.2f} MB center crop only, {views_bytes / 1e6:.2f} MB with views "
        f"(views arrays {info['augment']['bytes'] / 1e6:.2f} MB); extraction {timings['center']['seconds']:.0f} s vs {timings['views']['seconds']:.0f} s"
    )
    write_json(args.out, {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "extract": timings,
                          "bytes": {"center_store": center_bytes, "views_store": views_bytes, "views_arrays": info["augment"]["bytes"]},
                          "runs": [{k: v for k, v in r.items()} for r in rows],
                          "paired": {"n": diff.n, "delta": diff.delta, "ci95": diff.ci95, "n01": diff.test.n01, "n10": diff.test.n10, "p": diff.test.p}})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
