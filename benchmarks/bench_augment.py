"""Benchmark (issue #25): what K augmented views cost an extraction, per train image, against the center crop alone.

Target: extraction with ``--augment rrc-flip --augment-views K`` costs at most 1.2 × K × the
center-crop extraction per train image (each image is decoded once and cropped K + 1 times; the
encoder runs K + 1 times).

File lists of imagenette train images (every class, evenly spaced; a train split only, so every
image is a train image) of two sizes (``--limits``) are extracted with each loader (torch with
``--workers 0``: decoding runs in this process, so its CPU time is counted; DALI's CPU threads are
this process's too) without and with K views, ``--rounds`` times after a warm-up run of each list and
loader; the fastest run of each is kept.
The cost per train image is the *marginal* one, (cost at the larger size − cost at the smaller) /
the images between, so the fixed cost of a run (building the model, creating and finalizing the
store) does not dilute it. The center-crop runs use K + 1 times as many images (``--limits`` × (K + 1)),
so that both estimates span the same number of forward passes: a span of a few seconds is within
a shared machine's run-to-run noise. Both the wall time and the process's CPU time (all its threads) are
recorded: on a shared machine the CPU time is the steadier one.

    .venv/bin/python benchmarks/bench_augment.py --limits 20,60 --views 10 --loaders torch,dali
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMAGENETTE, OUT_DIR, fail, machine, table, write_json
from featstore.extraction import ExtractConfig, extract


def file_list(root: Path, limit: int, folder: Path) -> Path:
    """A CSV (path,label,split) of ``limit`` train images, the same number from every class, evenly spaced."""
    classes = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    per = max(1, limit // len(classes))
    rows = []
    for label, c in enumerate(classes):
        files = sorted(c.glob("*.JPEG"))
        step = max(1, len(files) // per)
        rows += [(str(f), label, "train") for f in files[::step][:per]]
    path = folder / f"train-{limit}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


def run(dataset: Path, out: Path, args, views: int | None, loader: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    config = ExtractConfig(
        model=args.model,
        dataset=str(dataset),
        out=str(out),
        random_init=True,
        loader=loader,
        device="cpu",
        workers=0 if loader == "torch" else 2,
        batch_size=args.batch_size,
        image_size=args.image_size,
        resize=args.resize,
        augment="rrc-flip" if views else None,
        augment_views=views,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    result = extract(config, log=lambda s: None, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = result.rows["train"]
    return {"loader": loader, "views": views or 0, "images": n, "wall_s": wall, "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=IMAGENETTE)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--limits", default="20,60", help="two sizes of the file list: the marginal cost is between them")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--loaders", default="torch,dali")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=66)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--out", type=Path, default=OUT_DIR / "augment-extract.json")
    args = ap.parse_args()
    if not (args.data / "train").is_dir():
        fail(f"no imagenette at {args.data} (pass --data)")
    small, large = (int(x) for x in args.limits.split(","))
    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    k = args.views
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as tmp:
        folder = Path(tmp)
        sizes = {0: (small * (k + 1), large * (k + 1)), k: (small, large)}
        lists = {n: file_list(args.data, n, folder) for both in sizes.values() for n in both}
        for loader in loaders:  # warm-up, not measured: first imports, allocator, the files' checks and page cache
            for n in lists:
                run(lists[n], folder / f"warm-{loader}-{n}.zarr", args, None, loader)
        for _ in range(args.rounds):
            for loader in loaders:
                for i in range(2):
                    for views in (0, k):
                        n = sizes[views][i]
                        runs.append(run(lists[n], folder / f"{loader}-{n}-{views}.zarr", args, views or None, loader))
    rows, verdicts = [], {}
    for loader in loaders:
        best: dict[tuple[int, int], dict] = {}
        for r in runs:
            key = (r["views"], r["images"])
            if r["loader"] == loader and (key not in best or r["cpu_s"] < best[key]["cpu_s"]):
                best[key] = r
        per = {}
        for views in (0, k):
            sizes = sorted(n for v, n in best if v == views)
            lo, hi = best[(views, sizes[0])], best[(views, sizes[-1])]
            span = hi["images"] - lo["images"]
            per[views] = {m: 1e3 * (hi[f"{m}_s"] - lo[f"{m}_s"]) / span for m in ("wall", "cpu")}
            what = "center crop only" if not views else f"center crop + {views} views"
            rows.append({"loader": loader, "what": what, "images": f"{lo['images']} -> {hi['images']}", "wall_ms": per[views]["wall"],
                         "cpu_ms": per[views]["cpu"]})  # fmt: skip
        ratio = {m: per[k][m] / (k * per[0][m]) for m in ("wall", "cpu")}
        verdicts[loader] = ratio
        rows[-1]["ratio_wall"], rows[-1]["ratio_cpu"] = ratio["wall"], ratio["cpu"]
    columns = [("loader", "loader", "s"), ("what", "run", "s"), ("images", "train images", "s"), ("wall_ms", "wall ms/img", ".1f"),
               ("cpu_ms", "CPU ms/img", ".1f"), ("ratio_wall", "wall / (K x center)", ".3f"), ("ratio_cpu", "CPU / (K x center)", ".3f")]  # fmt: skip
    print(table(rows, columns))
    print(f"\nmarginal cost per train image, {k} views against {k} x the center crop alone (target <= 1.2)")
    write_json(args.out, {"machine": machine(), "args": {a: str(v) for a, v in vars(args).items()}, "runs": runs, "marginal": rows,
                          "ratio_vs_k_center": verdicts, "target": 1.2})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
