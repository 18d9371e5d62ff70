"""Benchmark (issue #25): what K augmented views cost an extraction, per train image, against the center crop alone.

Target: extraction with ``--augment rrc-flip --augment-views K`` costs at most 1.2 × K × the
center-crop extraction per train image (each image is decoded once and cropped K + 1 times; the
encoder runs K + 1 times).

A file list of ``--limit`` imagenette train images (every class, evenly spaced; a train split only,
so every image is a train image) is extracted with the torch loader (``--workers 0``: decoding
runs in this process, so its CPU time is counted) once without and once with K views, alternating
``--rounds`` times; the fastest run of each is kept. Both the wall time and the process's CPU time
(all its threads) are recorded: on a shared machine the CPU time is the steadier one.

    .venv/bin/python benchmarks/bench_augment.py --limit 48 --views 10 --rounds 2
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
    path = folder / "train.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


def run(dataset: Path, out: Path, args, views: int | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    config = ExtractConfig(
        model=args.model,
        dataset=str(dataset),
        out=str(out),
        random_init=True,
        loader="torch",
        device="cpu",
        workers=0,
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
    return {
        "views": views or 0,
        "images": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "wall_ms_per_image": 1e3 * wall / n,
        "cpu_ms_per_image": 1e3 * cpu / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=IMAGENETTE)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=66)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--out", type=Path, default=OUT_DIR / "augment-extract.json")
    args = ap.parse_args()
    if not (args.data / "train").is_dir():
        fail(f"no imagenette at {args.data} (pass --data)")
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as tmp:
        folder = Path(tmp)
        dataset = file_list(args.data, args.limit, folder)
        runs: dict[int, list[dict]] = {0: [], args.views: []}
        for _ in range(args.rounds):
            for views in (0, args.views):
                runs[views].append(run(dataset, folder / f"k{views}.zarr", args, views or None))
    best = {k: min(r, key=lambda x: x["cpu_s"]) for k, r in runs.items()}
    base, aug = best[0], best[args.views]
    k = args.views
    ratio = {m: aug[f"{m}_ms_per_image"] / (k * base[f"{m}_ms_per_image"]) for m in ("wall", "cpu")}
    rows = [
        {"what": "center crop only", **base},
        {"what": f"center crop + {k} views", **aug},
    ]
    print(
        table(
            rows,
            [
                ("what", "run", "s"),
                ("images", "train images", "d"),
                ("wall_ms_per_image", "wall ms/img", ".1f"),
                ("cpu_ms_per_image", "CPU ms/img", ".1f"),
            ],
        )
    )
    print(f"\n{k} views / ({k} × center crop), per train image: wall {ratio['wall']:.3f}, CPU {ratio['cpu']:.3f} (target <= 1.2)")
    write_json(args.out, {"machine": machine(), "args": {k_: str(v) for k_, v in vars(args).items()}, "runs": runs,
                          "best": rows, "ratio_vs_k_center": ratio, "target": 1.2})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
