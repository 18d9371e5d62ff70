"""Benchmark: what writing a store to object storage costs next to a local folder, in one run.

The same feature matrix (rows × dim float16, ``--chunk-rows`` units) is written through the store
API exactly as an extraction writes it (``FeatureStore.create``, ``write_unit`` for every unit,
``finalize``), then read back once (``features()[:]``), to:

  local folder   a temp folder (the baseline)
  S3 (moto)      moto's S3 server on 127.0.0.1, in this process (requests counted at the server)

Moto is an in-memory server in the same process: its numbers say how many requests a store costs
and what the client side spends, not what a real S3 endpoint's latency and bandwidth would give.

    .venv/bin/python benchmarks/bench_object_store.py                  # 65,536 × 768, 8192-row units
    .venv/bin/python benchmarks/bench_object_store.py --rows 16384     # quick
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MB, machine, table, write_json
from featstore.store import FeatureStore


class _Requests(logging.Handler):
    """Counts the requests moto's server (werkzeug) logs, by HTTP method."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
            if f'"{method} ' in text:
                self.counts[method] = self.counts.get(method, 0) + 1


def write_store(where: str, x: np.ndarray, chunk_rows: int) -> dict:
    n = len(x)
    labels = np.arange(n) % 10
    t0 = time.perf_counter()
    store = FeatureStore.create(
        where,
        splits={"train": ([f"{i}.jpg" for i in range(n)], labels)},
        views={"cls": x.shape[1]},
        dtype="float16",
        chunk_rows=chunk_rows,
        attrs={"cache_key": "bench", "dataset": {"name": "bench", "class_names": [str(c) for c in range(10)]}},
    )
    t1 = time.perf_counter()
    for unit in store.pending_units():
        store.write_unit(unit, {"cls": x[unit.start : unit.stop]}, np.ones(unit.rows, bool))
    t2 = time.perf_counter()
    store.finalize()
    t3 = time.perf_counter()
    back = FeatureStore.open(where, verify=True).features("train", "cls")[:]
    t4 = time.perf_counter()
    assert back.tobytes() == x.tobytes()
    return {"create_s": t1 - t0, "units_s": t2 - t1, "finalize_s": t3 - t2, "read_s": t4 - t3, "write_MBps": x.nbytes / MB / (t3 - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--json", default=None, help="where to write the JSON (default benchmarks/out/bench_object_store-<time>.json)")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    requests = _Requests()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.propagate = False
    werkzeug.handlers = [requests]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}"
    )
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float16)
    units = -(-args.rows // args.chunk_rows)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for attempt in range(2):  # alternated, so neither side gets the quieter moment
                rows.append({"where": "local folder", "attempt": attempt, **write_store(f"{tmp}/x{attempt}.zarr", x, args.chunk_rows)})
                requests.counts.clear()
                result = write_store(f"s3://bench/x{attempt}.zarr", x, args.chunk_rows)
                counts = dict(requests.counts)
                rows.append({"where": "S3 (moto)", "attempt": attempt, **result, "requests": sum(counts.values()), "by_method": counts})
    finally:
        server.stop()
    for r in rows:
        r["requests_per_unit"] = r["requests"] / units if r.get("requests") else None
    print(f"{args.rows:,} × {args.dim} float16 ({x.nbytes / MB:.1f} MB), {units} units of {args.chunk_rows} rows")
    print(
        table(
            rows,
            [
                ("where", "where", "s"),
                ("attempt", "try", "d"),
                ("create_s", "create s", ".2f"),
                ("units_s", "units s", ".2f"),
                ("finalize_s", "finalize s", ".2f"),
                ("write_MBps", "write MB/s", ".1f"),
                ("read_s", "read (verified) s", ".2f"),
                ("requests", "requests", "d"),
                ("requests_per_unit", "per unit", ".1f"),
            ],
        )
    )
    for r in rows:
        if r.get("by_method"):
            print(f"{r['where']} try {r['attempt']}: {r['by_method']}")
    out = args.json or f"benchmarks/out/bench_object_store-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"wrote {write_json(out, {'machine': machine(), 'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
