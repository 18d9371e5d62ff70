"""Benchmark: write and read MB/s of a 262,144 × 768 float16 feature matrix (384 MiB), in one run:

  featstore        FeatureStore.create + write_unit for every 8192-row unit + finalize; read with
                   FeatureStore.open(...).features() — exactly what extraction and probes do
  zarr zstd        a raw Zarr v3 array, same chunks, zarr's default codec (zstd), written in one call
  zarr raw         the same without a codec
  zarr raw per unit  the same, written one 8192-row chunk per call (featstore's pattern, minus markers)
  h5py chunked     HDF5, same chunks, no compression
  h5py contiguous  HDF5, one contiguous dataset
  numpy.save       np.save / np.load of one .npy file

"write" stops once the bytes are on disk (every written file fsync'ed); "write (cache)" is the time
until the call returned. Before the "cold" read, this run's own files are dropped from the page cache
(posix_fadvise DONTNEED on each of them; nothing else is touched); "warm" reads the same files again.
MB/s = feature bytes (402.7 MB at the default size; MB = 10^6 bytes) / seconds, whatever else the format stores.

    .venv/bin/python benchmarks/bench_store.py                  # default size, temp dir under /tmp
    .venv/bin/python benchmarks/bench_store.py --rows 16384     # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import MB, OUT_DIR, machine, table, write_json

CHUNK_ROWS = 8192  # featstore's default unit
VIEW = "cls"


def files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def fsync_all(path: Path) -> None:
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_from_cache(path: Path) -> None:
    """Evict only these files' (clean, fsync'ed) pages, so the next read comes from the disk."""
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- formats: write(path, x), read(path) -> x


def write_featstore(path: Path, x: np.ndarray) -> None:
    from featstore.store import FeatureStore

    n = len(x)
    store = FeatureStore.create(
        path,
        splits={"train": ([f"img/{i:07d}.jpg" for i in range(n)], np.zeros(n, np.int32))},
        views={VIEW: x.shape[1]},
        dtype=str(x.dtype),
        chunk_rows=CHUNK_ROWS,
    )
    valid = np.ones(CHUNK_ROWS, bool)
    for unit in store.units("train"):
        store.write_unit(unit, {VIEW: x[unit.start : unit.stop]}, valid[: unit.rows])
    store.finalize()


def read_featstore(path: Path) -> np.ndarray:
    from featstore.store import FeatureStore

    return FeatureStore.open(path).features("train", VIEW)


def _zarr_writer(compressed: bool, per_unit: bool = False):
    def write(path: Path, x: np.ndarray) -> None:
        import zarr

        codec = {} if compressed else {"compressors": None}
        arr = zarr.create_array(str(path), shape=x.shape, dtype=x.dtype, chunks=(CHUNK_ROWS, x.shape[1]), **codec)
        step = CHUNK_ROWS if per_unit else len(x)  # per unit: one chunk per call, as featstore's writer does
        for start in range(0, len(x), step):
            arr[start : start + step] = x[start : start + step]

    return write


def read_zarr(path: Path) -> np.ndarray:
    import zarr

    return zarr.open_array(str(path), mode="r")[:]


def _h5_writer(chunked: bool):
    def write(path: Path, x: np.ndarray) -> None:
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x, chunks=(CHUNK_ROWS, x.shape[1]) if chunked else None)

    return write


def read_h5(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f["x"][:]


def write_npy(path: Path, x: np.ndarray) -> None:
    np.save(path, x)


def read_npy(path: Path) -> np.ndarray:
    return np.load(path)


FORMATS = {
    "featstore": ("feats.zarr", write_featstore, read_featstore),
    "zarr zstd": ("zstd.zarr", _zarr_writer(True), read_zarr),
    "zarr raw": ("raw.zarr", _zarr_writer(False), read_zarr),
    "zarr raw per unit": ("raw-units.zarr", _zarr_writer(False, per_unit=True), read_zarr),
    "h5py chunked": ("chunked.h5", _h5_writer(True), read_h5),
    "h5py contiguous": ("contiguous.h5", _h5_writer(False), read_h5),
    "numpy.save": ("x.npy", write_npy, read_npy),
}


def measure(name: str, x: np.ndarray, workdir: Path) -> dict:
    filename, write, read = FORMATS[name]
    path = workdir / filename
    t0 = time.perf_counter()
    write(path, x)
    t1 = time.perf_counter()
    fsync_all(path)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in files_under(path))
    drop_from_cache(path)
    t3 = time.perf_counter()
    cold = read(path)
    t4 = time.perf_counter()
    warm = read(path)
    t5 = time.perf_counter()
    if not (np.array_equal(cold.view(np.uint16), x.view(np.uint16)) and np.array_equal(warm.view(np.uint16), x.view(np.uint16))):
        raise SystemExit(f"error: {name} read back different values")
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return {"write_cache_s": t1 - t0, "write_s": t2 - t0, "read_cold_s": t4 - t3, "read_warm_s": t5 - t4, "bytes_on_disk": size}


def summarize(name: str, runs: list[dict], nbytes: int) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {
        "format": name,
        "write_cache_MBps": nbytes / MB / med["write_cache_s"],
        "write_MBps": nbytes / MB / med["write_s"],
        "read_cold_MBps": nbytes / MB / med["read_cold_s"],
        "read_warm_MBps": nbytes / MB / med["read_warm_s"],
        "disk_ratio": med["bytes_on_disk"] / nbytes,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of: " + ", ".join(FORMATS))
    ap.add_argument("--repeats", type=int, default=1, help="runs per format; the table shows the median")
    ap.add_argument("--dir", default="/tmp", help="where the temp files go (same disk as the repo here; see `df`)")
    ap.add_argument("--out", default=str(OUT_DIR / "store.json"))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.formats.split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise SystemExit(f"error: unknown format(s) {unknown}; choose from {list(FORMATS)}")

    # Gaussian features: like real ones, their low mantissa bits are noise, so codecs gain little
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32).astype(args.dtype)
    info = machine()
    print(
        f"{args.rows:,} x {args.dim} {args.dtype} = {x.nbytes / MB:.1f} MB; {info['date']}, {info['host_cpu']}, "
        f"{info['cpus']} CPUs, load {info['load_average']}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="featstore-bench-store-", dir=args.dir) as tmp:
        for name in names:
            runs = [measure(name, x, Path(tmp)) for _ in range(args.repeats)]
            results.append(summarize(name, runs, x.nbytes))
            print(f"  {name}: done", flush=True)
    print(
        table(
            results,
            [
                ("format", "format", "s"),
                ("write_MBps", "write MB/s", ".0f"),
                ("write_cache_MBps", "write (cache) MB/s", ".0f"),
                ("read_cold_MBps", "read cold MB/s", ".0f"),
                ("read_warm_MBps", "read warm MB/s", ".0f"),
                ("disk_ratio", "disk/raw", ".2f"),
            ],
        )
    )
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before {info['load_average']}, after {info['load_average_after']}")
    path = write_json(
        args.out,
        {
            "benchmark": "store",
            "machine": info,
            "command": " ".join(sys.argv),
            "rows": args.rows,
            "dim": args.dim,
            "dtype": args.dtype,
            "dir": args.dir,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
