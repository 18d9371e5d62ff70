"""What computing torchvision's sizes per sample costs DALI's CPU pipeline (resize-rounding): the
DaliLoader of two featstore trees, interleaved round by round, over the same photos.

    PYTHONPATH=. .venv/bin/python benchmarks/dali_resize_cost.py --baseline /path/to/old/checkout

Each tree runs in its own subprocess (``PYTHONPATH`` = the tree) loading ``--images`` real-photo
JPEGs (tests/photos.py: the three shipped photos at their own sizes, then 224-px crops) in batches of
64 on 2 DALI threads; reported: images/s (wall) and the process's CPU seconds per 1,000 images, best
of the rounds. Only the ratio measured in the same run means anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import OUT_DIR, machine, table, write_json  # noqa: E402

CHILD = r"""
import json, os, sys, time
import numpy as np, torch
from featstore.loaders.dali import DaliLoader
from featstore.preprocess import Preprocess
files = json.loads(sys.argv[1])
loader = DaliLoader(Preprocess(224, 256, "bicubic"), torch.device("cpu"), 2)
plan = [np.arange(i, min(i + 64, len(files))) for i in range(0, len(files), 64)]
list(loader.batches(files[:64], [np.arange(64)]))  # warm: libraries loaded, file checks made
w0, c0 = time.perf_counter(), time.process_time()
n = sum(len(b.rows) for b in loader.batches(files, plan))
print(json.dumps({"images": n, "wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}))
"""


def run(tree: str, files: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(files)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a featstore checkout to compare with (its root)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(OUT_DIR / "dali_resize_cost.json"))
    args = parser.parse_args()
    from tests.photos import photo_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, data in enumerate(photo_jpegs(args.images, originals=True)):
            path = Path(tmp) / f"{i}.jpg"
            path.write_bytes(data)
            files.append(str(path))
        trees = {"baseline": args.baseline, "this tree": str(REPO)}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(run(tree, files))
    rows = []
    for name, results in runs.items():
        rows.append(
            dict(
                tree=name,
                rate=max(r["images"] / r["wall"] for r in results),
                cpu=min(1000 * r["cpu"] / r["images"] for r in results),
                rates=" ".join(f"{r['images'] / r['wall']:.0f}" for r in results),
            )
        )
    print(
        table(
            rows,
            [
                ("tree", "tree", "s"),
                ("rate", "img/s (best)", ".1f"),
                ("cpu", "CPU s / 1000 img (best)", ".2f"),
                ("rates", "img/s per round", "s"),
            ],
        )
    )
    path = write_json(args.out, {"machine": machine(), "runs": runs, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
