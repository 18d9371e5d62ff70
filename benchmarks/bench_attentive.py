"""Attentive probe speed (#25 item 1): every LR of the grid trained at once on cached patch tokens.

    python benchmarks/bench_attentive.py                      # the target: 10,000 × 196 × 384, 13 LRs, 30 epochs
    python benchmarks/bench_attentive.py --rows 1000 --epochs 3 --skip-full   # only the comparisons

Writes a synthetic patch store (float16 tokens, 10 classes: a class-specific pattern on a few
random tokens of each image) under benchmarks/out/, then times ``probe.fit`` end to end (open,
finite check, read, train, evaluate, select):

1. the target: ``--rows`` train rows (plus a tenth each for val and test) × 196 tokens × 384,
   the default 13-LR grid at once, the protocol's default epochs (30) and batch (256), tokens in memory;
2. at ``--small-rows``: the same grid at once, in memory and streamed from the store
   (``--max-memory`` a quarter of the train tokens), and 13 separate runs of one LR each.

Wall time and process CPU time (both threads) are reported: other jobs share this machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import OUT_DIR, machine, table, write_json

CLASSES = 10


def write_store(path: Path, rows: int, tokens: int, dim: int, seed: int = 0) -> Path:
    from featstore.store import FeatureStore

    side = round(tokens**0.5)
    assert side * side == tokens, "tokens must be a square grid"
    if path.exists():
        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((CLASSES, dim)).astype(np.float32)
    sizes = {"train": rows, "val": max(rows // 10, CLASSES), "test": max(rows // 10, CLASSES)}
    labels = {s: rng.integers(0, CLASSES, n) for s, n in sizes.items()}
    splits = {s: ([f"{s}/{i}.png" for i in range(n)], labels[s]) for s, n in sizes.items()}
    store = FeatureStore.create(path, splits=splits, views={"patch": (side, side, dim)})
    for split in sizes:
        for unit in store.units(split):
            n = unit.rows
            block = rng.standard_normal((n, tokens, dim), dtype=np.float32)
            y = labels[split][unit.start : unit.stop]
            where = rng.integers(0, tokens, (n, 4))  # the class pattern on 4 random tokens of each image
            block[np.arange(n)[:, None], where] += 0.5 * patterns[y][:, None, :]
            store.write_unit(unit, {"patch": block.reshape(n, side, side, dim).astype(np.float16)}, np.ones(n))
    store.finalize()
    return path


def timed(store: Path, protocol, **kw) -> dict:
    import torch

    import probe

    t0, c0 = time.perf_counter(), time.process_time()
    rows = probe.fit(str(store), protocol, views=["patch"], **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    chosen = next(r for r in rows if r["selected"])
    return {"threads": torch.get_num_threads(), "dtype": chosen["dtype"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "method_s": round(max(r["sweep_seconds"] for r in rows), 1),
            "lr": chosen["lr"], "report_top1": chosen["report_top1_pct"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=None, help="default: the protocol's (30)")
    ap.add_argument("--small-rows", type=int, default=1000)
    ap.add_argument("--small-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-small", action="store_true", help="only the target")
    ap.add_argument("--no-float32", action="store_true", help="skip the float32 comparison at --small-rows")
    ap.add_argument("--json", default=str(OUT_DIR / "bench_attentive.json"))
    args = ap.parse_args()

    import torch

    from probe.protocol import Protocol

    if args.threads:
        torch.set_num_threads(args.threads)
    work = OUT_DIR / "attentive"
    work.mkdir(parents=True, exist_ok=True)
    base = Protocol(methods=("attentive",))
    epochs = args.epochs or base.epochs
    results: list[dict] = []
    if not args.skip_full:
        timed(write_store(work / "warm.zarr", 64, args.tokens, args.dim), base.replace(epochs=1, lr_grid=[1e-3]))  # warm-up
        shutil.rmtree(work / "warm.zarr")
        t0 = time.perf_counter()
        big = write_store(work / "full.zarr", args.rows, args.tokens, args.dim)
        print(f"wrote the {args.rows}-row store in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        r = timed(big, base.replace(epochs=epochs))
        results.append({"case": "target: 13 LRs at once, in memory", "rows": args.rows, "epochs": epochs, "runs": 1, **r})
        print(table(results, _COLUMNS), file=sys.stderr)
        shutil.rmtree(big)
    if not args.skip_small:
        _small(args, work, base, results)
    print(table(results, _COLUMNS))
    info = machine()
    print(f"\n{info['date']}, {info['host_cpu']}, {info['cpus']} CPUs, torch {info.get('torch')} threads {torch.get_num_threads()}, "
          f"load average {info['load_average']}")  # fmt: skip
    write_json(args.json, {"machine": info, "tokens": args.tokens, "dim": args.dim, "results": results})


def _small(args, work: Path, base, results: list[dict]) -> None:
    """The comparisons at ``--small-rows``: in memory, streamed, float32 products, 13 separate runs."""
    import torch

    small = write_store(work / "small.zarr", args.small_rows, args.tokens, args.dim)
    few = base.replace(epochs=args.small_epochs)
    timed(small, few.replace(epochs=1, lr_grid=[1e-3]))  # warm-up (first use of the kernels), not reported
    row_bytes = args.tokens * args.dim * 2
    for case, kw in (
        ("13 LRs at once, in memory", {}),
        ("13 LRs at once, streamed", {"max_memory": max(1 << 20, args.small_rows * row_bytes // 4)}),
    ):
        results.append({"case": case, "rows": args.small_rows, "epochs": args.small_epochs, "runs": 1, **timed(small, few, **kw)})
    if not args.no_float32:  # the token products in float32 (the path of CPUs without bfloat16 units)
        from probe.methods import attentive

        native = attentive.token_dtype
        attentive.token_dtype = lambda device: torch.float32  # type: ignore[assignment]
        results.append({"case": "13 LRs at once, in memory, float32 products", "rows": args.small_rows, "epochs": args.small_epochs,
                        "runs": 1, **timed(small, few)})  # fmt: skip
        attentive.token_dtype = native
    separate = [timed(small, few.replace(lr_grid=[lr])) for lr in few.lr_grid]
    results.append({"case": "13 separate runs of one LR", "rows": args.small_rows, "epochs": args.small_epochs, "runs": len(separate),
                    "wall_s": round(sum(s["wall_s"] for s in separate), 1), "cpu_s": round(sum(s["cpu_s"] for s in separate), 1),
                    "method_s": round(sum(s["method_s"] for s in separate), 1), "lr": None, "report_top1": None})  # fmt: skip
    shutil.rmtree(small)


_COLUMNS = [("case", "case", ""), ("rows", "train rows", ""), ("epochs", "epochs", ""), ("runs", "runs", ""), ("threads", "threads", ""), ("dtype", "products", ""),
            ("wall_s", "wall s", ""), ("cpu_s", "CPU s (all threads)", ""), ("method_s", "probe method s", ""),
            ("lr", "chosen lr", ""), ("report_top1", "test top-1 %", "")]  # fmt: skip

if __name__ == "__main__":
    main()
