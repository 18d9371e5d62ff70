"""Pretrain the study's backbone with one self-supervised method and save a checkpoint.

    python examples/ssl_study/pretrain.py --method simclr --data ../shared/data/imagenette/train \\
        --epochs 20 --out simclr.pth

Labels are never read: every image file under --data is used. All three methods share the
backbone (encoder.py), the optimizer (AdamW, cosine schedule) and the data; each has its own
augmentation, head, and default batch size and learning rate (DEFAULTS below). The checkpoint holds the
whole model in the layout of that method's reference code under ``state_dict`` (see each
method's module), plus ``method``, ``args`` and the per-epoch ``losses``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from featstore.device import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, from any working directory

from autoencoder import AutoEncoder
from images import image_files, load_images
from jigsaw import Jigsaw
from simclr import SimCLR

METHODS = {"simclr": SimCLR, "autoencoder": AutoEncoder, "jigsaw": Jigsaw}
# Per-method batch size and peak learning rate. SimCLR's negatives are the rest of its batch, so
# it keeps a large one; the autoencoder and jigsaw have no use for a large batch, and on a CPU
# budget small batches buy them several times more optimizer steps per second (measured: the
# table of variants in docs/ssl_study.md), with a lower learning rate to match.
DEFAULTS = {
    "simclr": {"batch_size": 128, "lr": 2e-3},
    "autoencoder": {"batch_size": 16, "lr": 5e-4},
    "jigsaw": {"batch_size": 16, "lr": 5e-4},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--data", required=True, help="folder of images (an ImageFolder split such as imagenette/train); labels are ignored")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True, help="checkpoint to write (.pth)")
    p.add_argument("--size", type=int, default=64, help="training resolution in px (default 64)")
    p.add_argument("--limit", type=int, help="use a seeded random subset of this many images")
    p.add_argument("--batch-size", type=int, help="default: simclr 128, autoencoder and jigsaw 16")
    p.add_argument("--lr", type=float, help="AdamW peak learning rate (default: simclr 2e-3, autoencoder and jigsaw 5e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.5, help="simclr: NT-Xent temperature (default 0.5)")
    p.add_argument(
        "--permutations",
        type=int,
        default=10,
        help="jigsaw: size of the permutation set (default 10: it beat 100 on every probe here, docs/ssl_study.md)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU is shared)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    args = p.parse_args(argv)
    for name, value in DEFAULTS[args.method].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.lr > 0:
        p.error("--lr must be positive")
    for name in ("epochs", "size", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.size % 16:
        p.error("--size must be a multiple of 16 (the backbone downsamples 16x)")
    if args.permutations < 2:
        p.error("--permutations must be >= 2")
    if args.limit is not None and args.limit < 2:
        p.error("--limit must be >= 2")
    return args


def pretrain(args: argparse.Namespace, log=print) -> dict:
    """Train, save the checkpoint at ``args.out`` and return it."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    files = image_files(args.data, args.limit, args.seed)
    images = load_images(files, side=args.size * 9 // 8)  # a margin for the random crops, as 72 -> 64
    options = {"simclr": {"temperature": args.temperature}, "jigsaw": {"num_permutations": args.permutations}}
    device = resolve_device(args.device)
    log(
        f"{args.method} on {device}: {len(files)} images from {args.data} decoded at {images.shape[-1]} px in {time.perf_counter() - t0:.1f} s"
    )
    model = METHODS[args.method](args.size, **options.get(args.method, {})).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batch = min(args.batch_size, len(images))
    steps_per_epoch = len(images) // batch  # drop the ragged last batch: BatchNorm and NT-Xent want full ones
    total = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    order_rng = torch.Generator().manual_seed(args.seed)
    losses = []
    for epoch in range(args.epochs):
        t = time.perf_counter()
        order = torch.randperm(len(images), generator=order_rng)
        running = 0.0
        for step in range(steps_per_epoch):
            loss = model.loss(images[order[step * batch : (step + 1) * batch]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        losses.append(running / steps_per_epoch)
        log(f"{args.method}: epoch {epoch + 1}/{args.epochs} loss {losses[-1]:.4f} ({time.perf_counter() - t:.1f} s)")
    checkpoint = {
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "method": args.method,
        "args": {k: v for k, v in vars(args).items()},
        "losses": losses,
        "images": len(files),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.method == "jigsaw":
        checkpoint["permutations"] = model.permutations.cpu().clone()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)  # a killed run leaves no half-written checkpoint under the final name
    log(
        f"{args.method}: loss {losses[0]:.4f} (epoch 1) -> {losses[-1]:.4f} (epoch {args.epochs}); "
        f"saved {out} ({checkpoint['seconds']:.0f} s)"
    )
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    pretrain(parse_args(argv), log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
