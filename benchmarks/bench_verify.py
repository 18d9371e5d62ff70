"""Benchmark: what content digests cost (issue 29 item 1).

One synthetic CIFAR-size float16 store (50,000 × 512 train, 5,000 val, 10,000 test, 10 classes,
4,096-row units), measured in one run:

  write      the store written unit by unit (create + write_unit + finalize), and the part of it
             spent hashing the units (the same rows hashed on their own, right after)
  read       every array probe reads (labels, valid, paths, features of every split), opened
             with verify=True and without: wall time, and the hashing time the reader counted
  fit        ``probe.fit`` end to end (13 LRs, 10 epochs, batch 1024: bench_probe's protocol),
             verify on and off, alternated ``--repeats`` times; the target is verify <= 10% of it
  verify     ``featstore verify`` of the whole store (every unit of every array): MB/s

    .venv/bin/python benchmarks/bench_verify.py [--repeats 3] [--rows 50000]

Prints a table and writes JSON to benchmarks/out/.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MB, OUT_DIR, machine, table, write_json
from featstore.store import FeatureStore
from featstore.store.digests import rows_digest
from featstore.store.verify import verify_store


def build(path: Path, rows: int, dim: int, classes: int, chunk_rows: int) -> tuple[float, float]:
    """Write the store; (seconds to write it, seconds of that spent hashing the units)."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(classes, dim)) * 0.15
    sizes = {"train": rows, "val": rows // 10, "test": rows // 5}
    data = {}
    for split, n in sizes.items():
        y = rng.integers(0, classes, n)
        data[split] = (y, (mu[y] + rng.normal(size=(n, dim))).astype(np.float16))
    t0 = time.perf_counter()
    store = FeatureStore.create(
        path,
        splits={s: ([f"{s}/{i}.png" for i in range(len(y))], y) for s, (y, _) in data.items()},
        views={"cls": dim},
        dtype="float16",
        chunk_rows=chunk_rows,
        attrs={"dataset": {"name": "synthetic", "class_names": [str(c) for c in range(classes)], "num_classes": classes}},
    )
    for split, (_, x) in data.items():
        for u in store.units(split):
            store.write_unit(u, {"cls": x[u.start : u.stop]}, np.ones(u.rows, bool))
    store.finalize()
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    for split, (_, x) in data.items():
        for u in store.units(split):
            rows_digest(x[u.start : u.stop])
            rows_digest(np.ones(u.rows, bool))
    return write, time.perf_counter() - t0


def read_all(path: Path, verify: bool) -> tuple[float, float, int]:
    """Read what probe reads; (wall seconds, hashing seconds, bytes)."""
    t0 = time.perf_counter()
    store = FeatureStore.open(path, verify=verify)
    nbytes = 0
    for split in store.splits:
        for values in (store.labels(split), store.valid(split), store.paths(split), store.features(split, "cls").read()):
            nbytes += values.nbytes
    hashing = store.read_check.seconds if store.read_check is not None else 0.0
    return time.perf_counter() - t0, hashing, nbytes


def fit(path: Path, verify: bool) -> float:
    import probe
    from probe.protocol import Protocol

    protocol = Protocol(lr_grid="1e-5:1e-1:13", epochs=10, batch_size=1024)
    t0 = time.perf_counter()
    probe.fit(path, protocol, device="cpu", verify=verify, warn=lambda m: None)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    folder = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    try:
        path = folder / "s.zarr"
        write, write_hash = build(path, args.rows, args.dim, 10, 4096)
        results = []
        results.append({"what": "write (create + units + finalize)", "seconds": write, "hash": write_hash, "share": write_hash / write})
        fit(path, False)  # warm-up: imports, allocator, the first torch kernels
        reads: dict[bool, list] = {True: [], False: []}
        fits: dict[bool, list] = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (True, False):  # alternated: the machine's load hits both alike
                reads[verify].append(read_all(path, verify))
                fits[verify].append(fit(path, verify))
        on, off = np.median([r[0] for r in reads[True]]), np.median([r[0] for r in reads[False]])
        hashing = float(np.median([r[1] for r in reads[True]]))
        nbytes = reads[True][0][2]
        results.append({"what": f"read what probe reads, verify ({nbytes / MB:.0f} MB)", "seconds": on, "hash": hashing})
        results.append({"what": "read what probe reads, --no-verify", "seconds": off})
        fit_on, fit_off = float(np.median(fits[True])), float(np.median(fits[False]))
        results.append({"what": "probe.fit, verify (default)", "seconds": fit_on, "hash": hashing, "share": hashing / fit_off})
        results.append({"what": "probe.fit, --no-verify", "seconds": fit_off, "share": (fit_on - fit_off) / fit_off})
        t0 = time.perf_counter()
        report = verify_store(FeatureStore.open(path))
        seconds = time.perf_counter() - t0
        assert report.ok, report.problems
        results.append({"what": f"featstore verify ({report.units} units, {report.bytes / MB:.0f} MB)", "seconds": seconds,
                        "mbps": report.bytes / MB / seconds})  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{info['date']}  {info['host_cpu']}  load {info['load_average']}  repeats {args.repeats} (medians)")
    print(table(results, [("what", "what", "s"), ("seconds", "seconds", ".3f"), ("hash", "hashing s", ".3f"),
                          ("share", "share", ".1%"), ("mbps", "MB/s", ".0f")]))  # fmt: skip
    print("fit shares: 'verify' row = hashing / fit without verify; '--no-verify' row = (fit on - fit off) / fit off")
    out = write_json(OUT_DIR / f"bench_verify-{time.strftime('%Y%m%d-%H%M%S')}.json", {"machine": info, "args": vars(args), "results": results,
                     "fits": {"verify": fits[True], "no_verify": fits[False]}})  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
