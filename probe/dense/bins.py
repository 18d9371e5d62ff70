"""DINOv2's bins decode and its gradient by hand, a block of tokens at a time, for every head of a sweep.

The bins head's logits are the largest tensor of a dense step: (B·h·w tokens, G heads × 256 bins),
13.6 M values for 16 images of 16×16 tokens and 13 heads. Through autograd its decode (ReLU + 0.1,
the normalisation, the expected bin) and backward are a dozen full passes over them in memory, which
cost more than the GEMM that made them (benchmarks/RESULTS.md, #24). Here the GEMM's output is read
once, a block of tokens at a time (under a MiB: it stays in cache while every operation runs on it),
and the gradient is written once, straight in the dtype of the weight-gradient GEMM.

With r_k = relu(l_k), p_k = r_k + ε, Z = Σ_k p_k = Σ_k r_k + Kε and depth D = Σ_k p_k c_k / Z
= (Σ_k r_k c_k + ε Σ_k c_k) / Z (c: the bin centres): both sums are one small GEMM of r against
[1, c]; and ∂D/∂l_k = 1[l_k > 0] (c_k − D) / Z.
"""

from __future__ import annotations

import math

import torch

BIN_EPS = 0.1  # DINOv2's "linear" normalisation over bins: relu(logit) + 0.1
BLOCK_BYTES = 1 << 19  # a block's float32 logits: small enough to stay in a core's cache between operations


class Workspace:
    """The step's (tokens × heads·bins) arrays, kept from one step to the next: the logits, the ReLU
    mask and the logits' gradient are tens of MB each, which the C library maps fresh for every
    allocation (they are above its mmap threshold), and a fresh mapping costs a page fault on the first
    write of every 4 KiB: ~20 ms of a ~110 ms step (16 images × 256 tokens × 13 heads × 256 bins).
    A buffer grows to the largest shape asked for; a smaller batch uses its front."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def _blocks(images: int, tokens: int, width: int) -> list[tuple[int, slice]]:
    """(image, rows) blocks of at most BLOCK_BYTES of float32 logits, never across two images."""
    step = max(1, min(tokens, BLOCK_BYTES // (4 * width)))
    return [(i, slice(i * tokens + s, i * tokens + min(s + step, tokens))) for i in range(images) for s in range(0, tokens, step)]


def forward(
    low: torch.Tensor, image_term: torch.Tensor, bins: torch.Tensor, tokens: int, keep: bool = True, workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Depth (T, G) and Z (T, G) of every token and head, and (``keep``: for the backward) where the
    ReLUs are open: (T, G·K), 1 or 0.

    ``low``: (T = B·tokens, G·K) logits without their per-image term (the token GEMM's output, in its
    dtype); ``image_term``: (B, G·K), the CLS term plus the bias; ``bins``: (K,) bin centres.
    (Operation choices are measured: on CPUs a float mask multiplies 5× faster than a bool one, and
    a sum and a matrix-vector product beat one GEMM against [1, c].)"""
    images, width = image_term.shape
    k = bins.numel()
    heads = width // k
    z = torch.empty(images * tokens * heads, dtype=image_term.dtype, device=image_term.device)
    n = torch.empty_like(z)
    open_ = None
    if keep:
        open_ = (workspace or Workspace()).get("open", tuple(low.shape), image_term.dtype, low.device)
    for i, rows in _blocks(images, tokens, width):
        r = torch.add(low[rows], image_term[i]).clamp_min_(0)  # float32, a new tensor: ``low`` is only read
        if open_ is not None:
            torch.sign(r, out=open_[rows])
        per_bin = r.view(-1, k)
        at = slice(rows.start * heads, rows.stop * heads)
        torch.sum(per_bin, dim=1, out=z[at])
        torch.mv(per_bin, bins, out=n[at])
    z = z.view(-1, heads).add_(k * BIN_EPS)
    depth = n.view(-1, heads).add_(BIN_EPS * float(bins.sum())).div_(z)
    return depth, z, open_


def backward(
    open_: torch.Tensor,
    images: int,
    bins: torch.Tensor,
    depth: torch.Tensor,
    z: torch.Tensor,
    grad: torch.Tensor,
    dtype: torch.dtype,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient at the logits of a (T, G) gradient at the depths: (T, G·K) in ``dtype`` (the input of
    the weight-gradient GEMM), and its per-image sums (B, G·K) float32 (the gradient of the per-image
    term: the bias and the CLS weights)."""
    t, width = open_.shape
    tokens = t // images
    scale = grad / z  # (T, G)
    # (c_k − D) · grad / Z as one product per block: [scale, −D·scale] (T·G, 2) times [c; 1] (2, K)
    coef = torch.stack([scale.reshape(-1), (depth * scale).neg_().reshape(-1)], dim=1)
    basis = torch.stack([bins, torch.ones_like(bins)])
    heads = depth.shape[1]
    out = (workspace or Workspace()).get("gradient", tuple(open_.shape), dtype, open_.device)
    sums = torch.zeros(images, width, dtype=grad.dtype, device=grad.device)
    for i, rows in _blocks(images, tokens, width):
        g = torch.mm(coef[rows.start * heads : rows.stop * heads], basis).view(-1, width)
        g.mul_(open_[rows])  # 0 where the ReLU closed (a NaN logit gives NaN: its head diverged and stays so)
        sums[i] += g.sum(dim=0)
        out[rows] = g
    return out, sums
