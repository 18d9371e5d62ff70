"""Benchmark: what the refit after selection (#27) costs, per method, against the method's sweep.

On one store × view without a val split (CIFAR size: 50,000 train × 512, of which a seeded 10%
holdout selects, and 10,000 test rows; 10 classes, or 100 with ``--sizes cifar100``), each method's ``run`` (probe.methods) is
timed with ``refit=False`` (the sweep: fit the grid, select on the holdout, evaluate) and with
``refit=True`` (the same, plus the refit of the chosen setting on train + holdout):

  linear   13 LRs, 10 epochs, batch 1024 (bench_probe's CIFAR protocol); the refit trains 1 head
  knn      k = 10, 20, 100, 200; the refit searches the holdout only and merges (no second train search)
  logreg   13 C (1e-4…1e2); the refit solves the chosen C on train + holdout from the path's solution

Each configuration runs ``--repeats`` times, alternating refit off/on, and the fastest run is kept;
both wall time and the thread's CPU time are recorded (CPU time is robust to other jobs on a
shared machine when torch runs 1 thread). Features are synthetic (bench_probe.synth).

    .venv/bin/python benchmarks/bench_refit.py --threads 1
    .venv/bin/python benchmarks/bench_refit.py --threads 1 --sizes cifar100 --methods linear
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probe import synth
from common import OUT_DIR, machine, sync, table, write_json
from featstore.device import compute_dtype, resolve_device
from probe import Protocol, methods
from probe.methods import Case
from probe.selection import stratified_holdout

SIZES = {
    "cifar10": dict(train=50_000, test=10_000, dim=512, classes=10, sep=0.15),
    # the same rows with 100 classes: the sweep's 13 × 100 output columns make its steps compute-bound,
    # as ImageNet's 13 × 1,000 are (with 10 classes a step is a memory-bound minibatch gather + 2 skinny GEMMs)
    "cifar100": dict(train=50_000, test=10_000, dim=512, classes=100, sep=0.3),
}
PROTOCOL = dict(epochs=10, batch_size=1024, knn_k="10,20,100,200", logreg_C=",".join(f"{c:.4g}" for c in np.logspace(-4, 2, 13)))


def make_case(protocol: Protocol, device: torch.device, size: str = "cifar10") -> Case:
    spec = SIZES[size]
    x, y = synth(spec["train"], spec["dim"], spec["classes"], spec["sep"], 0, device)
    test_x, test_y = synth(spec["test"], spec["dim"], spec["classes"], spec["sep"], 1, device)
    train_rows, hold = stratified_holdout(y.cpu().numpy(), protocol.val_fraction, protocol.seed)
    take = lambda t, rows: t.index_select(0, torch.from_numpy(rows).to(device))  # noqa: E731
    return Case(
        protocol=protocol,
        x={"train": take(x, train_rows), "select": take(x, hold), "report": test_x},
        y={"train": take(y, train_rows), "select": take(y, hold), "report": test_y},
        rows={"train": train_rows, "select": hold, "report": np.arange(spec["test"])},
        split_rows=spec["train"], num_classes=spec["classes"], seed=protocol.seed, shots=None, reported_role="report",
        select_split="holdout", device=device, dtype=compute_dtype(device), name="bench", where="bench", first=True,
        first_view=True, first_seed=True, warn=lambda m: None, log=lambda m: None,
    )  # fmt: skip


def timed(method: str, case: Case) -> tuple[float, float, float, int]:
    """(wall s, thread CPU s, reported top-1 %, n_train of the reported model) of one run."""
    device = case.device
    sync(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    result = methods.get(method).run(case)
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    chosen = result.selected
    n_train = len(case.rows["train"]) + (len(case.rows["select"]) if chosen.settings.get("refit") else 0)
    return wall, cpu, chosen.metrics["report"]["top1"], n_train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="linear,knn,logreg")
    ap.add_argument("--sizes", default="cifar10", help="comma list of cifar10, cifar100")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    report = {"machine": machine(), "device": str(device), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    rows = []
    for size, method in [(s.strip(), m.strip()) for s in args.sizes.split(",") if s.strip() for m in args.methods.split(",") if m.strip()]:
        base = make_case(Protocol(methods="linear,knn,logreg", refit=False, **PROTOCOL), device, size)
        best: dict[bool, tuple] = {}
        for _ in range(args.repeats):
            for refit in (False, True):
                case = Case(**{**base.__dict__, "protocol": base.protocol.replace(refit=refit)})
                run = timed(method, case)
                if refit not in best or run[1] < best[refit][1]:
                    best[refit] = run
        (w0, c0, a0, n0), (w1, c1, a1, n1) = best[False], best[True]
        rows.append({"size": size, "method": method, "sweep_wall": w0, "sweep_cpu": c0, "refit_wall": w1, "refit_cpu": c1,
                     "cost_wall": 100 * (w1 - w0) / w0, "cost_cpu": 100 * (c1 - c0) / c0,
                     "top1_sweep": a0, "top1_refit": a1, "n_train": f"{n0} -> {n1}"})  # fmt: skip
        print(table(rows[-1:], COLUMNS), flush=True)
    report["rows"] = rows
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = table(rows, COLUMNS)
    print()
    print(text)
    print(f"load average at start {report['machine']['load_average'][0]}, at end {report['load_average_end'][0]} ({os.cpu_count()} CPUs)")
    report["table"] = text
    path = write_json(Path(args.out) / f"bench_refit-{time.strftime('%Y%m%d-%H%M%S')}.json", report)
    print(f"wrote {path}")


COLUMNS = [("size", "size", ""), ("method", "method", ""), ("sweep_wall", "sweep s", ".2f"), ("refit_wall", "sweep + refit s", ".2f"),
           ("cost_wall", "refit cost % (wall)", ".1f"), ("sweep_cpu", "sweep CPU s", ".2f"), ("refit_cpu", "+ refit CPU s", ".2f"),
           ("cost_cpu", "refit cost % (CPU)", ".1f"), ("top1_sweep", "top-1 no refit", ".2f"), ("top1_refit", "top-1 refit", ".2f"),
           ("n_train", "n_train", "")]  # fmt: skip

if __name__ == "__main__":
    main()
