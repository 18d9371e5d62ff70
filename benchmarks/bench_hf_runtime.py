"""A transformers folder run by transformers (what featstore does) against its timm twin (what a
conversion would run): forward time of featstore's encoder for each, same architecture, same batch.

    .venv/bin/python benchmarks/bench_hf_runtime.py --rounds 3
    .venv/bin/python benchmarks/bench_hf_runtime.py --models dinov2-s --batch-size 4 --rounds 1   # smoke

Each model is saved once by transformers' save_pretrained (random weights: speed does not depend on
them) and run by featstore's transformers path (transformers_folder.build_model); the twin is the
timm model featstore builds for the same architecture (random init; what hf_to_timm.py converts a
Dinov2Model folder into). Both are featstore ``FeatureEncoder``s giving all their
views, fed channels_last float32 pixels as the pipeline feeds them, under inference_mode (and bf16
autocast on CUDA, as the pipeline runs). The two are timed alternately, round by round; the best
round counts (other processes only slow a run down). On CPU the process's CPU time is reported
too, which the load of other jobs disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine, sync, table, write_json

# name -> (transformers config class, its kwargs, the timm twin featstore runs)
MODELS = {
    "dinov2-s": ("Dinov2Config", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518), "vit_small_patch14_dinov2"),
    "dino-vits16": ("ViTConfig", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16, image_size=224, layer_norm_eps=1e-6), "vit_small_patch16_224"),
    "clip-b16": ("CLIPVisionConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16, image_size=224), "vit_base_patch16_clip_224"),
}  # fmt: skip
MODEL_CLASS = {"Dinov2Config": "Dinov2Model", "ViTConfig": "ViTModel", "CLIPVisionConfig": "CLIPVisionModel"}


def build(name: str, folder: Path, device):
    import torch
    import transformers

    from featstore.models.encoders import FeatureEncoder, build_encoder, resolve_encoder
    from featstore.models.transformers_folder import build_model, read_folder

    config_cls, kwargs, twin = MODELS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    getattr(transformers, MODEL_CLASS[config_cls])(config).save_pretrained(folder / name)
    sizes = dict(image_size=224, resize=256)
    hf = FeatureEncoder(build_model(read_folder(folder / name)), "custom").eval()  # transformers' forward, whatever featstore picks
    tm = build_encoder(resolve_encoder(twin, random_init=True, preprocess_overrides=sizes))
    return {
        "transformers": hf.to(device).to(memory_format=torch.channels_last),
        "timm twin": tm.to(device).to(memory_format=torch.channels_last),
    }


def time_forward(encoder, x, device, reps: int) -> tuple[float, float]:
    import torch

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        encoder(x)  # warm-up
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(reps):
            encoder(x)
        sync(device)
        return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="forwards per timing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(OUT_DIR / "hf_runtime.json"))
    args = ap.parse_args()

    import torch

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    )
    info = machine()
    print(f"{info['date']}  {info['host_cpu']}  load {info['load_average']}  torch threads {info.get('torch_threads')}  device {device}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            encoders = build(name, Path(tmp), device)
            x = torch.randn(args.batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
            best: dict[str, tuple[float, float]] = {}
            for _ in range(args.rounds):
                for impl, enc in encoders.items():  # alternated: both see the same moments of load
                    wall, cpu = time_forward(enc, x, device, args.reps)
                    old = best.get(impl)
                    best[impl] = (min(wall, old[0]), min(cpu, old[1])) if old else (wall, cpu)
            base = best["timm twin"]
            for impl, (wall, cpu) in best.items():
                rows.append(
                    {
                        "model": name,
                        "runs": impl,
                        "img_s": args.batch_size / wall,
                        "wall_ms": 1000 * wall / args.batch_size,
                        "cpu_ms": 1000 * cpu / args.batch_size,
                        "vs_timm": wall / base[0],
                        "cpu_vs_timm": cpu / base[1] if base[1] > 0 else None,
                    }
                )
            del encoders
    print(
        table(
            rows,
            [
                ("model", "model", "s"),
                ("runs", "runs", "s"),
                ("img_s", "img/s", ".1f"),
                ("wall_ms", "wall ms/img", ".1f"),
                ("cpu_ms", "CPU ms/img", ".1f"),
                ("vs_timm", "wall / timm", ".3f"),
                ("cpu_vs_timm", "CPU / timm", ".3f"),
            ],
        )
    )
    info["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(f"load after {info['load_average_after']}")
    path = write_json(args.out, {"machine": info, "args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
