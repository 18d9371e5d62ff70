"""What verification costs a dense probe (#24 follow-up): ``probe fit --task depth`` with every unit of
patch tokens and targets checked against its digest (the default) against ``--no-verify``, on the
same synthetic store, tokens resident and streamed (--max-memory). Runs alternate (verify, no-verify,
verify, ...) and the best of each is kept: other jobs share the machine.

Synthetic store: N images × 16×16 tokens × 384 (float16) + a CLS view and 64×64 depth targets, written
as an extraction writes them (targets before the units, so the unit digests cover them).

    python benchmarks/bench_dense_verify.py [--images 500] [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json
from featstore.store import FeatureStore, write_split_targets
from probe.dense.fit import fit_dense, parse_memory
from probe.protocol import Protocol

GRID, C, TARGET = 16, 384, 64


def make_store(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sizes = {"train": n, "val": max(2, n // 10), "test": max(2, n // 10)}
    splits = {s: ([f"{s}/{i}.png" for i in range(k)], np.zeros(k)) for s, k in sizes.items()}
    store = FeatureStore.create(path, splits=splits, views={"patch": (GRID, GRID, C), "cls": C}, chunk_rows=128)
    direction = rng.standard_normal(C) / np.sqrt(C)
    tokens = {s: rng.standard_normal((k, GRID, GRID, C)).astype(np.float16) for s, k in sizes.items()}
    for split, k in sizes.items():  # targets first, as featstore extract writes them
        log_depth = 1.0 + 0.6 * (tokens[split].astype(np.float32) @ direction)
        depth = torch.nn.functional.interpolate(torch.tensor(np.exp(log_depth))[:, None], size=(TARGET, TARGET), mode="bilinear")
        write_split_targets(store, split, {"depth": depth[:, 0].numpy()}, np.ones(k, bool))
    for split in sizes:
        for unit in store.units(split):
            sl = slice(unit.start, unit.stop)
            t = tokens[split][sl]
            store.write_unit(unit, {"patch": t, "cls": t.mean(axis=(1, 2))}, np.ones(unit.rows, bool))
    store.update_attrs({"targets": {"kinds": ["depth"], "size": [TARGET, TARGET], "files_sha256": "synthetic", "invalid": {}}})
    store.finalize()
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_dense_verify-"))
    try:
        store = make_store(tmp / "s.zarr", args.images)
        covered = FeatureStore.open(store).digests.of("train", "targets/depth") is not None
        protocol = Protocol(lr_grid="1e-3:1e-1:3", epochs=args.epochs, batch_size=16)
        rows = []
        for memory in (None, "64M"):
            best: dict[bool, tuple[float, float]] = {}
            for _ in range(args.repeats):
                for verify in (True, False):
                    out = tmp / "o"
                    shutil.rmtree(out, ignore_errors=True)
                    wall, cpu = time.perf_counter(), time.thread_time()
                    fit_dense([str(store)], protocol, "depth", head="linear", out=out, device="cpu", verify=verify,
                              max_memory=parse_memory(memory))  # fmt: skip
                    m = (time.perf_counter() - wall, time.thread_time() - cpu)
                    best[verify] = min(best.get(verify, m), m)
            for verify in (True, False):
                rows.append({"tokens": "streamed 64M" if memory else "resident", "verify": "yes" if verify else "--no-verify", "wall_s": best[verify][0],
                             "cpu_s": best[verify][1], "vs_no_verify": best[verify][1] / best[False][1]})  # fmt: skip
                print(rows[-1], flush=True)
        print(f"targets covered by unit digests: {covered}")
        hashed = 0.0
        reads: dict[bool, float] = {}  # the read alone: every train token once, hashing included or not (best of 5, thread CPU)
        for verify in (True, False) * 5:
            fs = FeatureStore.open(store, verify=verify)
            cpu = time.thread_time()
            fs.patches("train", "patch").read()
            reads[verify] = min(reads.get(verify, float("inf")), time.thread_time() - cpu)
            if verify and fs.read_check is not None:
                hashed = fs.read_check.seconds
        mb = args.images * GRID * GRID * C * 2 / 1e6
        print(f"read of {mb:.0f} MB of train tokens: {reads[True]:.3f} s CPU verified, {reads[False]:.3f} s unverified "
              f"(×{reads[True] / reads[False]:.2f}); hashing {mb / max(hashed, 1e-9):.0f} MB/s")  # fmt: skip
        rows.append({"tokens": "read only", "verify": "yes", "cpu_s": reads[True], "vs_no_verify": reads[True] / reads[False]})
        rows.append({"tokens": "read only", "verify": "--no-verify", "cpu_s": reads[False], "vs_no_verify": 1.0})
        cols = [("tokens", "tokens", "s"), ("verify", "verify", "s"), ("wall_s", "wall s", ".2f"), ("cpu_s", "thread CPU s", ".2f"),
                ("vs_no_verify", "CPU vs --no-verify", ".2f")]  # fmt: skip
        print(table(rows, cols))
        write_json(Path(__file__).parent / "out" / f"bench_dense_verify-{time.strftime('%Y%m%d-%H%M%S')}.json",
                   {"machine": machine(), "images": args.images, "epochs": args.epochs, "rows": rows})  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
