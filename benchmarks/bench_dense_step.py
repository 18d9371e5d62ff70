"""One training step of the dense bins head (#24): where a step of the depth sweep goes.

    python benchmarks/bench_dense_step.py                  # 16 images × 16×16 tokens × 384 + CLS, 13 heads × 256 bins
    python benchmarks/bench_dense_step.py --steps 600      # a long run: shows a machine that drifts

Times ``DenseHeads.train_step`` on fixed synthetic tokens (the fit's batch shape, bf16 token GEMMs,
loss at 64×64) with glibc's mmap threshold fixed and each step inside ``step_heap``, as ``probe fit
--task depth`` runs it; then the step's two token GEMMs alone (logits and weight gradient) at the
same shapes. Run it beside a baseline tree (``PYTHONPATH=<tree>``) in the same minutes: machines drift.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a baseline tree can be measured with this script

from benchmarks.common import OUT_DIR, machine, table, write_json

HEADS, BINS, IMAGES, GRID, C = 13, 256, 16, 16, 384


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=str(OUT_DIR / "bench_dense_step.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from probe.dense import allocator
    from probe.dense.heads import DenseHeads, DenseSpec
    from probe.protocol import Protocol

    allocator.fix_mmap_threshold()
    lrs = [10 ** (-5 + i / 3) for i in range(HEADS)]
    heads = DenseHeads(DenseSpec("depth", "bins", BINS), C, C, lrs, [0.0] * HEADS, "cpu", matmul_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(IMAGES, GRID, GRID, C, generator=g)
    cls = torch.randn(IMAGES, C, generator=g)
    target = torch.rand(IMAGES, 64, 64, generator=g) * 9 + 0.5
    protocol = Protocol()
    step_heap = getattr(allocator, "step_heap", None)  # absent in a tree from before it

    def step() -> None:
        if step_heap is None:
            heads.train_step(patches, cls, target, protocol, 1.0)
            return
        with step_heap():
            heads.train_step(patches, cls, target, protocol, 1.0)

    for _ in range(args.warmup):
        step()
    times = []
    cpu0 = time.process_time()
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / args.steps
    ms = np.array(times) * 1e3

    tokens = IMAGES * GRID * GRID
    x = patches.reshape(-1, C).bfloat16()
    w = torch.randn(C, HEADS * BINS, generator=g).bfloat16()
    grad = torch.randn(tokens, HEADS * BINS, generator=g).bfloat16()
    gemms = {}
    for name, f in (("logits GEMM", lambda: x @ w), ("weight-gradient GEMM", lambda: x.t() @ grad)):
        for _ in range(3):
            f()
        t = time.perf_counter()
        for _ in range(10):
            f()
        gemms[name] = (time.perf_counter() - t) / 10 * 1e3
    flops = 2 * tokens * C * HEADS * BINS
    rows = [{"what": "train step (median)", "ms": float(np.median(ms)), "gflops": None},
            {"what": "train step (mean)", "ms": float(ms.mean()), "gflops": None},
            {"what": "train step (CPU ms, all threads)", "ms": cpu * 1e3, "gflops": None}]  # fmt: skip
    rows += [{"what": name, "ms": t, "gflops": flops / t / 1e6} for name, t in gemms.items()]
    print(table(rows, [("what", "what", "s"), ("ms", "ms", ".1f"), ("gflops", "GFLOP/s", ".0f")]))
    tenths = [round(float(m), 1) for m in np.array_split(ms, min(10, len(ms)))[0:10] for m in [m.mean()]]
    print(f"mean ms per tenth of the run: {tenths}")
    info = machine()
    print(f"\n{info['date']}, {info['host_cpu']}, torch threads {torch.get_num_threads()}, load average {info['load_average']}")
    write_json(args.json, {"machine": info, "steps": args.steps, "step_ms": ms.tolist(), "rows": rows})


if __name__ == "__main__":
    main()
