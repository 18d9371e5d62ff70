"""Plot the per-epoch pretraining loss of pretrain.py checkpoints, one panel per method.

    python examples/ssl_study/plot_losses.py ssl-study/checkpoints/*.pth --out pretrain_loss.png

The losses are on different scales (NT-Xent, pixel MSE, permutation cross-entropy), hence one
panel each; the dashed line is the loss of chance where there is one (uniform over the 2N-1
candidates for NT-Xent, over the permutations for jigsaw).
"""

from __future__ import annotations

import argparse
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


def chance_loss(checkpoint: dict) -> float | None:
    args = checkpoint["args"]
    if checkpoint["method"] == "simclr":
        return math.log(2 * min(args["batch_size"], checkpoint["images"]) - 1)
    if checkpoint["method"] == "jigsaw":
        return math.log(len(checkpoint["permutations"]))
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    loaded = [torch.load(path, map_location="cpu", weights_only=True) for path in args.checkpoints]
    fig, axes = plt.subplots(1, len(loaded), figsize=(4 * len(loaded), 3.2), squeeze=False)
    for ax, ckpt in zip(axes[0], loaded):
        losses = ckpt["losses"]
        ax.plot(range(1, len(losses) + 1), losses, marker="o", ms=3)
        chance = chance_loss(ckpt)
        if chance is not None:
            ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
            ax.legend(frameon=False)
        task = f", {len(ckpt['permutations'])} permutations" if ckpt["method"] == "jigsaw" else ""
        ax.set_title(f"{ckpt['method']}\n{ckpt['images']} images{task}, {ckpt['seconds']:.0f} s", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
