"""Two GPUs through torchrun against one (issue 22 target: >= 1.8x), with the featstore CLI.

    python3 benchmarks/gpu/bench_ranks.py --model resnet50 --limit 24576 --out $OUT/ranks.json

Over the upscaled set (``bench_extract.py``'s), after the file checks are cached: ``featstore
extract`` in one process on one GPU, then ``torchrun --standalone --nproc_per_node N`` (N = the
GPUs present, at most ``--gpus``) into a new store; wall seconds of each command and their ratio.
Skips (exit 0, says so) with fewer than two GPUs. ``--dry-run`` prints the commands only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_extract import bench_folder, select_images, upscaled_images, warm_checks  # noqa: E402
from common import IMAGENETTE, OUT_DIR, machine, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--limit", type=int, default=24576)
    ap.add_argument("--images", type=Path, default=IMAGENETTE)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--loader", default="auto")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "ranks.json")
    args = ap.parse_args()

    import torch

    gpus = min(args.gpus, torch.cuda.device_count())
    if gpus < 2 and not args.dry_run:
        print(f"torchrun: skipped ({torch.cuda.device_count()} GPU here; the target needs two)")
        write_json(args.out, {"benchmark": "ranks", "skipped": f"{torch.cuda.device_count()} GPU"})
        return
    workers = os.cpu_count() or 1
    if args.dry_run:  # the commands only: no images are built
        args.limit = min(args.limit, 8)
    with tempfile.TemporaryDirectory(prefix="featstore-ranks-") as tmp:
        tmp_path = Path(tmp)
        images = upscaled_images(select_images(args.images, args.limit), args.images, workers)
        folder = bench_folder(images, tmp_path / "images")
        warm_checks(folder)
        common = [
            "extract", "--model", args.model, "--random-init", "--dataset", str(folder), "--loader", args.loader,
            "--batch-size", str(args.batch_size), "--no-progress",
        ]  # fmt: skip
        one = [sys.executable, "-m", "featstore.cli", *common, "--out", str(tmp_path / "one.zarr"), "--workers", str(workers)]
        many = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={max(gpus, 2)}",
            "-m", "featstore.cli", *common, "--out", str(tmp_path / "many.zarr"), "--workers", str(max(1, workers // max(gpus, 2))),
        ]  # fmt: skip
        if args.dry_run:
            print(" ".join(one))
            print(" ".join(many))
            return
        seconds = {}
        for name, cmd in (("one", one), ("torchrun", many)):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            seconds[name] = time.perf_counter() - t0
            print(f"{name}: {seconds[name]:.1f} s, exit {proc.returncode}; {proc.stdout.strip()[-300:]}", flush=True)
            if proc.returncode:
                print(proc.stderr[-2000:], flush=True)
            shutil.rmtree(tmp_path / f"{name}.zarr", ignore_errors=True)
    speedup = seconds["one"] / seconds["torchrun"]
    print(f"{gpus} GPUs through torchrun: {speedup:.2f}x one GPU (target >= 1.8x), {len(images)} images")
    write_json(
        args.out,
        {"benchmark": "ranks", "machine": machine(), "gpus": gpus, "images": len(images), "seconds": seconds, "speedup": speedup},
    )


if __name__ == "__main__":
    main()
