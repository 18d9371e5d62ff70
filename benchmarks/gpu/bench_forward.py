"""The forward alone, three ways (issue 22, item 4): eager, replayed from a CUDA graph (what extract
does by default on CUDA), and ``torch.compile(mode="reduce-overhead")``; images/s and how far the
features are from the eager forward's.

    python3 benchmarks/gpu/bench_forward.py --model resnet50,dino --out $OUT/forward.json
    .venv/bin/python benchmarks/gpu/bench_forward.py --device cpu --model resnet18 --steps 2 --batch-size 8   # a dry run

Each way runs ``featstore.inference.BatchEncoder`` (features end on the host, as in extract) over
random channels_last batches of the model's crop size, bf16 autocast on CUDA. ``--compile`` adds
torch.compile (its compilation takes a minute or more per model; capped by ``--compile-timeout``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import OUT_DIR, machine, sync, table, write_json  # noqa: E402


def rate(runner, batch: torch.Tensor, steps: int, device: torch.device) -> tuple[float, np.ndarray]:
    first = None
    for i in range(3):  # warm-up: capture, cudnn plans, compilation
        runner.submit(i, batch)
        for _, feats in runner.ready(drain=True):
            first = next(iter(feats.values()))
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        runner.submit(i, batch)
        for _ in runner.ready():
            pass
    for _ in runner.ready(drain=True):
        pass
    sync(device)
    return steps * len(batch) / (time.perf_counter() - t0), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50,dino")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "forward.json")
    args = ap.parse_args()

    from featstore.inference import BatchEncoder
    from featstore.models.encoders import build_encoder, feature_dims, resolve_encoder

    device = torch.device(args.device)
    rows = []
    for model in args.model.split(","):
        spec = resolve_encoder(model, random_init=True)
        encoder = build_encoder(spec).to(device).to(memory_format=torch.channels_last)
        views = feature_dims(encoder, spec.preprocess, device)
        size = spec.preprocess.image_size
        g = torch.Generator().manual_seed(0)
        batch = torch.randn(args.batch_size, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        notes: list[str] = []
        ways = {
            "eager": BatchEncoder(encoder, views, device, args.batch_size, cuda_graphs=False),
            "cuda graph": BatchEncoder(encoder, views, device, args.batch_size, cuda_graphs=True, log=notes.append),
        }
        if args.compile:
            runner = BatchEncoder(encoder, views, device, args.batch_size, cuda_graphs=False, fixed_shapes=True)
            runner.model = torch.compile(encoder, mode="reduce-overhead", dynamic=False)
            ways["compile reduce-overhead"] = runner
        reference = None
        for way, runner in ways.items():
            t0 = time.perf_counter()
            try:
                r, first = rate(runner, batch, args.steps, device)
            except Exception as e:  # one way failing must not lose the others' numbers
                rows.append(dict(model=model, way=way, error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            reference = first if reference is None else reference
            diff = float(np.abs(first - reference).max() / max(np.abs(reference).max(), 1e-6))
            graphed = getattr(runner, "graph", None) is not None
            rows.append(dict(model=model, way=way, img_per_s=r, max_rel_diff=diff, graph_in_use=graphed, first_s=time.perf_counter() - t0))
            print(
                f"{model} / {way}: {r:.1f} img/s, max relative diff to eager {diff:.2e}{' ' + '; '.join(notes) if notes else ''}",
                flush=True,
            )
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(
        table(
            rows,
            [
                ("model", "model", ""),
                ("way", "way", ""),
                ("img_per_s", "img/s", ".1f"),
                ("max_rel_diff", "max rel diff", ".2e"),
                ("graph_in_use", "graph", ""),
                ("error", "error", ""),
            ],
        )
    )
    write_json(args.out, {"benchmark": "forward", "machine": machine(), "args": vars(args), "results": rows})
    print(json.dumps({"wrote": str(args.out)}))


if __name__ == "__main__":
    main()
