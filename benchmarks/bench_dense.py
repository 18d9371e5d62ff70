"""Dense probe sweep (#24): 13 LRs × 10 epochs of depth heads on cached patch tokens, every head
trained at once (probe.dense), against the same sweep as 13 separate one-LR runs.

Synthetic store: N images × 16×16 tokens × 384 dims (float16, with a CLS view) and 64×64 depth
targets that are a smooth function of the tokens; val/test 10% each. The matmul rate of this
machine is measured in the same run, and the batched sweep's useful GEMM FLOPs are compared to it.

    python benchmarks/bench_dense.py [--images 1000] [--heads linear,bins] [--precision fp32,bf16] [--threads 1] [--separate]
    python benchmarks/bench_dense.py --rss 250,1000,4000 --max-memory 64M   # peak RSS of streamed runs as N grows
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_rate, table, write_json
from featstore.store import FeatureStore, write_split_targets
from probe.dense.fit import fit_dense
from probe.protocol import Protocol

GRID, C, TARGET = 16, 384, 64


def make_store(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sizes = {"train": n, "val": max(2, n // 10), "test": max(2, n // 10)}
    splits = {s: ([f"{s}/{i}.png" for i in range(k)], np.zeros(k)) for s, k in sizes.items()}
    store = FeatureStore.create(path, splits=splits, views={"patch": (GRID, GRID, C), "cls": C}, chunk_rows=128)
    direction = rng.standard_normal(C) / np.sqrt(C)
    for split, k in sizes.items():
        tokens = rng.standard_normal((k, GRID, GRID, C)).astype(np.float16)
        log_depth = 1.0 + 0.6 * (tokens.astype(np.float32) @ direction)  # (k, 16, 16): depth carried by one direction
        depth = torch.nn.functional.interpolate(torch.tensor(np.exp(log_depth))[:, None], size=(TARGET, TARGET), mode="bilinear")
        for unit in store.units(split):
            sl = slice(unit.start, unit.stop)
            store.write_unit(unit, {"patch": tokens[sl], "cls": tokens[sl].mean(axis=(1, 2))}, np.ones(unit.rows, bool))
        write_split_targets(store, split, {"depth": depth[:, 0].numpy()}, np.ones(k, bool))
    store.update_attrs({"targets": {"kinds": ["depth"], "size": [TARGET, TARGET], "files_sha256": "synthetic", "invalid": {}}})
    store.finalize()
    return path


def gemm_flops(n: int, heads: int, outputs: int, epochs: int) -> float:
    """Useful GEMM FLOPs of training: forward and weight gradient (the input needs no gradient)."""
    return 2 * 2 * n * GRID * GRID * C * heads * outputs * epochs


def run(store: Path, out: Path, protocol: Protocol, head: str, precision: str | None = None) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    lines: list[str] = []
    wall, cpu = time.perf_counter(), time.thread_time()
    extra = {"precision": precision} if precision else {}  # (absent: a tree from before --precision, as a baseline)
    result = fit_dense([str(store)], protocol, "depth", head=head, out=out, device="cpu", log=lines.append, **extra)
    train = next(r["train_seconds"] for r in result.rows)
    return time.perf_counter() - wall, time.thread_time() - cpu, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--heads", default="linear,bins")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--separate", action="store_true", help="also run the 13 LRs one at a time")
    ap.add_argument(
        "--precision", default="fp32,bf16", help="dtypes of the token GEMMs to run (comma-separated; 'none': the fit's default)"
    )
    ap.add_argument("--rss", default=None, help="N values: peak RSS of a 1-epoch streamed run per N, each in its own process")
    ap.add_argument("--max-memory", default="64M")
    ap.add_argument("--lrs", type=int, default=1, help="--rss: heads in the grid")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one --rss measurement
    args = ap.parse_args()
    if args.one:
        return measure_rss(Path(args.one), args.max_memory, args.lrs)
    if args.rss:
        return rss_sweep([int(n) for n in args.rss.split(",")], args.max_memory, args.lrs)
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = matmul_rate(torch.device("cpu"), torch.float32)
    rate_bf16 = matmul_rate(torch.device("cpu"), torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dense-"))
    try:
        store = make_store(tmp / "s.zarr", args.images)
        grid = "1e-5:1e-1:13"
        rows = []
        for head, precision in [(h, p) for h in args.heads.split(",") for p in args.precision.split(",")]:
            outputs = 256 if head == "bins" else 1
            protocol = Protocol(lr_grid=grid, epochs=args.epochs, batch_size=16)
            wall, cpu, train = run(store, tmp / f"o-{head}-{precision}", protocol, head, None if precision == "none" else precision)
            flops = gemm_flops(args.images, 13, outputs, args.epochs)
            own = rate_bf16 if precision == "bf16" else rate
            rows.append({"head": head, "precision": precision, "mode": "13 heads at once", "train_s": train, "wall_s": wall, "cpu_s": cpu,
                         "gflops": flops / train / 1e9, "of_matmul": flops / train / rate, "of_own_matmul": flops / train / own})  # fmt: skip
            print(rows[-1], flush=True)
            if args.separate:
                total_train, total_wall = 0.0, 0.0
                for lr in Protocol(lr_grid=grid).lr_grid:
                    w, _, t = run(store, tmp / f"o-{head}-{lr}", Protocol(lr_grid=[lr], epochs=args.epochs, batch_size=16), head,
                                  None if precision == "none" else precision)  # fmt: skip
                    total_train += t
                    total_wall += w
                rows.append({"head": head, "precision": precision, "mode": "13 separate runs", "train_s": total_train, "wall_s": total_wall, "cpu_s": None,
                             "gflops": flops / total_train / 1e9, "of_matmul": flops / total_train / rate, "of_own_matmul": flops / total_train / own})  # fmt: skip
                print(rows[-1], flush=True)
        peak_rss = peak_rss_mib()
        print(
            f"matmul rate {rate / 1e9:.1f} GFLOP/s float32, {rate_bf16 / 1e9:.1f} bf16 ({torch.get_num_threads()} threads); peak RSS {peak_rss:.0f} MiB"
        )
        cols = [("head", "head", "s"), ("precision", "GEMMs", "s"), ("mode", "mode", "s"), ("train_s", "train s", ".1f"), ("wall_s", "wall s", ".1f"),
                ("gflops", "GEMM GFLOP/s", ".1f"), ("of_matmul", "of fp32 matmul rate", ".0%"), ("of_own_matmul", "of its dtype's rate", ".0%")]  # fmt: skip
        print(table(rows, cols))
        write_json(Path(__file__).parent / "out" / f"bench_dense-{time.strftime('%Y%m%d-%H%M%S')}.json",
                   {"machine": machine(), "images": args.images, "matmul_gflops": rate / 1e9, "matmul_bf16_gflops": rate_bf16 / 1e9,
                    "peak_rss_mib": peak_rss, "rows": rows})  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM, MiB). Not ru_maxrss: Linux folds the peak RSS of the
    process image an exec replaced into ru_maxrss, so a child spawned by a large parent (this
    benchmark after building a store, or pytest) reports at least the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_rss(store: Path, max_memory: str, lrs: int = 1) -> None:
    from probe.dense.fit import parse_memory

    shutil.rmtree(store.parent / "o", ignore_errors=True)
    protocol = Protocol(lr_grid=[1e-3] if lrs == 1 else f"1e-4:1e-2:{lrs}", epochs=1, batch_size=16)
    fit_dense([str(store)], protocol, "depth", head="linear", out=store.parent / "o", device="cpu",
              max_memory=parse_memory(max_memory), save_predictions=True)  # fmt: skip
    print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def rss_sweep(sizes: list[int], max_memory: str, lrs: int = 1) -> None:
    import subprocess

    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="bench_dense_rss-"))
        try:
            store = make_store(tmp / "s.zarr", n)
            out = subprocess.run([sys.executable, __file__, "--one", str(store), "--max-memory", max_memory, "--lrs", str(lrs)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            hwm, maxrss = (float(x) for x in out.stdout.strip().splitlines()[-1].split())
            tokens_mib = n * GRID * GRID * C * 4 / 2**20
            rows.append({"images": n, "tokens_mib": tokens_mib, "peak_rss_mib": hwm, "ru_maxrss_mib": maxrss})
            print(rows[-1], flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    cols = [("images", "images", "d"), ("tokens_mib", "train tokens float32 MiB", ".0f"), ("peak_rss_mib", "peak RSS (VmHWM) MiB", ".0f"),
            ("ru_maxrss_mib", "ru_maxrss MiB (inherits the parent's peak)", ".0f")]  # fmt: skip
    print(table(rows, cols))
    write_json(Path(__file__).parent / "out" / f"bench_dense_rss-{time.strftime('%Y%m%d-%H%M%S')}.json",
               {"machine": machine(), "max_memory": max_memory, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
