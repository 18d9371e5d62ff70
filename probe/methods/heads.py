"""Batched linear heads: every (lr, wd) head of a sweep trained in one computation.

All H heads share the input features, so their weights are kept side by side as one (D, H·C)
matrix: a minibatch costs one GEMM forward (B×D @ D×H·C) and one GEMM for the weight gradient,
whatever H is. ``LinearHeads.weight`` shows the same memory as (H, D, C). Gradients and the
optimizer steps (SGD with momentum, AdamW) are written out by hand on these tensors, with the
per-head learning rate and weight decay as per-column vectors, so head h follows exactly the
update torch.optim would apply to a lone nn.Linear with that lr and wd (tests check this).

Nothing in the training loop copies between host and device or synchronizes: the minibatch
order of every epoch is drawn up front and moved to the device once (augmented views held in host
memory are the exception: one upload of the epoch's chosen views, :mod:`.view_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from featstore.errors import UsageError

from ..protocol import Protocol
from . import topk

BN_EPS = 1e-5  # torch.nn.BatchNorm1d's default, so "standardize" is BatchNorm without affine
_EVAL_ELEMENTS = 1 << 24  # logits elements per evaluation chunk (64 MiB in float32)


def epoch_orders(num_rows: int, epochs: int, seed: int) -> NDArray[np.int64]:
    """(epochs, num_rows) minibatch order over all rows of a split, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_rows, generator=g) for _ in range(epochs)]).numpy()


def view_choice(num_rows: int, epochs: int, views: int, seed: int) -> NDArray[np.int64]:
    """(epochs, num_rows): which of its K augmented views each row of a split trains on in each epoch
    (``probe fit --augment``), drawn over the whole split from the seed alone, as the minibatch
    orders are: every store with K views trains a row on the same view index."""
    rng = np.random.default_rng([seed, 25, views])  # its own stream, apart from the orders' (25: the issue)
    return rng.integers(0, views, size=(epochs, num_rows), dtype=np.int64)


def restrict_orders(orders: NDArray[np.int64], rows: NDArray[np.int64]) -> NDArray[np.int64]:
    """The orders of ``orders`` kept to ``rows`` (indices into the full split), renumbered 0..len(rows)-1.

    Drawing the order over the full split and then dropping unused rows keeps the order of the
    rows two stores share identical even when one of them has invalid rows the other lacks.
    """
    position = np.full(orders.shape[1], -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    mapped: NDArray[np.int64] = position[orders]
    return mapped[mapped >= 0].reshape(orders.shape[0], len(rows))


def standardize_stats(x: torch.Tensor | Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/sqrt(var + eps) of ``x`` (biased variance, as BatchNorm), as float32; ``x`` is a
    matrix, or an iterable of its row blocks (augmented views: :meth:`ViewRows.blocks`).

    Each chunk's mean and centered variance (two passes, float32) are merged in float64 (Chan
    et al.); chunks of ~8 MB keep the centered temporary in cache, which one big var_mean over
    the whole matrix does not (benchmarks/RESULTS.md, "Moved from docstrings").
    """
    if isinstance(x, torch.Tensor):
        step = max(1, (1 << 21) // max(x.shape[1], 1))
        blocks: Iterable[torch.Tensor] = [x[i : i + step] for i in range(0, x.shape[0], step)]
    else:
        blocks = x
    count = 0
    mean = m2 = torch.zeros(0)
    for block in blocks:
        if count == 0:
            mean = torch.zeros(block.shape[1], dtype=torch.float64, device=block.device)
            m2 = torch.zeros_like(mean)
        chunk = block.float()
        k = chunk.shape[0]
        mean_c = chunk.mean(0)
        var_c = (chunk - mean_c).square_().mean(0)
        delta = mean_c.double() - mean
        total = count + k
        mean += delta * (k / total)
        m2 += var_c.double() * k + delta * delta * (count * k / total)
        count = total
    if count == 0:
        raise ValueError("standardize statistics of no rows")
    return mean.float(), torch.rsqrt((m2 / count).float() + BN_EPS)


def prepare(
    x: torch.Tensor, method: str, dtype: torch.dtype, stats: tuple[torch.Tensor, torch.Tensor] | None = None, chunk_rows: int = 1 << 16
) -> torch.Tensor:
    """Normalize ``x`` (any float dtype, already on its device) into a new ``dtype`` tensor, in chunks."""
    if method not in ("none", "l2", "standardize"):
        raise UsageError(f"unknown normalization {method!r}", "use none, l2 or standardize")
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for i in range(0, x.shape[0], chunk_rows):
        chunk = x[i : i + chunk_rows].float()
        dst = out[i : i + chunk_rows]
        if method == "standardize":
            assert stats is not None, "standardize needs standardize_stats' (mean, 1/std)"
            mean, inv_std = stats
            if dst.dtype == chunk.dtype:  # write in place: no temporary the size of the chunk
                torch.sub(chunk, mean, out=dst).mul_(inv_std)
                continue
            chunk = (chunk - mean).mul_(inv_std)
        elif method == "l2":
            chunk = chunk / chunk.norm(dim=1, keepdim=True).clamp_min(1e-12)
        dst.copy_(chunk)
    return out


def grid_rates(lrs: Sequence[float], wds: Sequence[float], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A batched grid's per-head learning rates and weight decays as (H,) tensors on ``device``,
    checked to be 1-D and of one length (the linear and the attentive heads)."""
    lr_t = torch.as_tensor(lrs, dtype=torch.float64)
    wd_t = torch.as_tensor(wds, dtype=torch.float64)
    if lr_t.shape != wd_t.shape or lr_t.ndim != 1:
        raise ValueError("lrs and wds must be 1-D and of the same length")
    return lr_t.to(device, dtype), wd_t.to(device, dtype)


def adamw_moments_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step_size: torch.Tensor,
    betas: tuple[float, float],
    bc2_sqrt: float,
    eps: float,
) -> None:
    """torch.optim.AdamW's update of ``p`` from its gradient ``g`` (after the decoupled decay, which
    the caller applies): the moments ``m`` and ``v`` updated in place; ``step_size`` = lr / (1 − β₁ᵗ),
    per head, broadcast against ``p``; ``bc2_sqrt`` = √(1 − β₂ᵗ). The linear and the attentive heads' step."""
    m.lerp_(g, 1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    p.addcdiv_(m * step_size, (v.sqrt() / bc2_sqrt).add_(eps), value=-1.0)


class LinearHeads:
    """H linear classifiers D → C over the same features, stored as one (D, H·C) weight matrix."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        lrs: Sequence[float],
        wds: Sequence[float],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.lrs, self.wds = grid_rates(lrs, wds, self.device, dtype)
        self.dim, self.num_classes, self.num_heads = int(dim), int(num_classes), len(self.lrs)
        hc = self.num_heads * self.num_classes
        # zero init: the problem is convex, and every head (and a lone reference head) starts identical
        # master weights and optimizer state in ``dtype`` (float32; float64 only for exactness tests)
        self.w = torch.zeros(self.dim, hc, device=self.device, dtype=dtype)
        self.b = torch.zeros(hc, device=self.device, dtype=dtype)
        self._lr_cols = self.lrs.repeat_interleave(self.num_classes)
        self._wd_cols = self.wds.repeat_interleave(self.num_classes)
        self._minus_one = torch.full((1, 1, 1), -1.0, device=self.device, dtype=dtype)
        self._state: dict[str, torch.Tensor] = {}
        self._step = 0

    @property
    def weight(self) -> torch.Tensor:
        """(H, D, C) view of the weights."""
        return self.w.view(self.dim, self.num_heads, self.num_classes).permute(1, 0, 2)

    @property
    def bias(self) -> torch.Tensor:
        """(H, C) view of the biases."""
        return self.b.view(self.num_heads, self.num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, C) logits of every head, in the master dtype (float32)."""
        if x.dtype == self.w.dtype:
            out = torch.addmm(self.b, x, self.w)
        else:
            out = torch.mm(x, self.w.to(x.dtype)).to(self.w.dtype).add_(self.b)
        return out.view(x.shape[0], self.num_heads, self.num_classes)

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weight and bias gradients of every head's mean cross-entropy on (x, y), and the (H,) loss sums."""
        b = x.shape[0]
        logp = torch.log_softmax(self.logits(x), dim=-1)
        target = y.view(b, 1, 1).expand(b, self.num_heads, 1)
        loss_sum = -logp.gather(2, target).sum(dim=(0, 2))
        g = logp.exp_()
        g.scatter_add_(2, target, self._minus_one.expand(b, self.num_heads, 1))  # softmax - one_hot
        g = g.view(b, -1).div_(b)
        if x.dtype == self.w.dtype:
            gw = torch.mm(x.t(), g)
        else:
            gw = torch.mm(x.t(), g.to(x.dtype)).to(self.w.dtype)
        return gw, g.sum(0), loss_sum

    def step(self, gw: torch.Tensor, gb: torch.Tensor, protocol: Protocol, factor: float) -> None:
        """One optimizer step for every head; ``factor`` is the schedule's multiplier of the base LR."""
        lr = self._lr_cols * factor
        if protocol.optimizer == "sgd":
            # torch.optim.SGD semantics: coupled L2 on the weights (not the bias), then momentum
            if protocol.wd_grid != (0.0,):
                gw = gw.addcmul(self.w, self._wd_cols)
            if protocol.momentum > 0:
                if not self._state:
                    self._state = {"mw": torch.zeros_like(self.w), "mb": torch.zeros_like(self.b)}
                gw = self._state["mw"].mul_(protocol.momentum).add_(gw)
                gb = self._state["mb"].mul_(protocol.momentum).add_(gb)
            self.w.addcmul_(gw, lr, value=-1.0)
            self.b.addcmul_(gb, lr, value=-1.0)
        else:
            # torch.optim.AdamW semantics: decoupled decay of the weights, bias-corrected moments
            if not self._state:
                self._state = {k: torch.zeros_like(t) for k, t in (("mw", self.w), ("vw", self.w), ("mb", self.b), ("vb", self.b))}
            self._step += 1
            beta1, beta2 = protocol.betas
            bc1 = 1 - beta1**self._step
            bc2_sqrt = math.sqrt(1 - beta2**self._step)
            if protocol.wd_grid != (0.0,):
                self.w.mul_(1 - lr * self._wd_cols)
            step_size = lr / bc1
            for p, g, m, v in ((self.w, gw, self._state["mw"], self._state["vw"]), (self.b, gb, self._state["mb"], self._state["vb"])):
                adamw_moments_step(p, g, m, v, step_size, protocol.betas, bc2_sqrt, protocol.eps)

    def finite(self) -> torch.Tensor:
        """(H,) bool: the heads whose weights and biases are all finite (False = diverged)."""
        w_ok = torch.isfinite(self.w).view(self.dim, self.num_heads, self.num_classes).all(dim=2).all(dim=0)
        b_ok = torch.isfinite(self.bias).all(dim=1)
        return w_ok & b_ok


def schedule_factor(protocol: Protocol, step: int, total: int) -> float:
    if protocol.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    return 1.0


def train(
    x: torch.Tensor | Callable[[int], torch.Tensor], y: torch.Tensor, heads: LinearHeads, protocol: Protocol, orders: torch.Tensor
) -> torch.Tensor:
    """Train every head on (x, y) for ``protocol.epochs`` epochs; the (H,) mean cross-entropy of
    each head over the last epoch.

    ``orders`` is the (epochs, N) minibatch order, already on the device; every head sees the
    same minibatches in the same order (the last minibatch of an epoch may be smaller). ``x`` is
    the (N, D) inputs on the device, or a function of the epoch giving that epoch's (augmented
    views: each row's chosen view, gathered once per epoch).
    """
    n = y.shape[0]
    if orders.shape != (protocol.epochs, n):
        raise ValueError(f"orders has shape {tuple(orders.shape)}, expected {(protocol.epochs, n)}")
    bs = protocol.batch_size
    per_epoch = math.ceil(n / bs)
    total = protocol.epochs * per_epoch
    t = 0
    loss = torch.zeros(heads.num_heads, device=heads.w.device, dtype=heads.w.dtype)
    for epoch in range(protocol.epochs):
        inputs = x(epoch) if callable(x) else x
        if inputs.shape[0] != n:
            raise ValueError(f"epoch {epoch}: {inputs.shape[0]} input rows for {n} labels")
        order = orders[epoch]
        loss.zero_()
        for s in range(per_epoch):
            idx = order[s * bs : (s + 1) * bs]
            gw, gb, loss_sum = heads.gradients(inputs.index_select(0, idx), y.index_select(0, idx))
            loss += loss_sum
            heads.step(gw, gb, protocol, schedule_factor(protocol, t, total))
            t += 1
        del inputs  # the next epoch's gather replaces it, not beside it
    return loss / n


def _top_classes(heads: LinearHeads, x: torch.Tensor, k: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, (B, H, k) indices of the k best classes, best first) per chunk of rows of ``x``.

    One ``topk`` serves top-1 (column 0) and top-5 (:mod:`probe.topk` scores both), so the
    accuracy :func:`evaluate` reports and the per-image predictions of :func:`predict` agree
    image by image, ties included.
    """
    chunk = max(1, _EVAL_ELEMENTS // (heads.num_heads * heads.num_classes))
    for i in range(0, x.shape[0], chunk):
        yield i, heads.logits(x[i : i + chunk]).topk(k, dim=-1).indices


def _percent(correct1: torch.Tensor, correct5: torch.Tensor, n: int, num_classes: int) -> dict[str, NDArray[np.float64]]:
    """Per-head hit counts, counted on the device, as :func:`probe.topk.percent`'s percentages."""
    return topk.percent(correct1.cpu().numpy(), correct5.cpu().numpy(), n, num_classes)


def evaluate(heads: LinearHeads, x: torch.Tensor, y: torch.Tensor) -> dict[str, NDArray[np.float64]]:
    """Per-head top-1 and (with >= 5 classes) top-5 accuracy in percent, as (H,) float64 arrays."""
    correct1 = torch.zeros(heads.num_heads, dtype=torch.int64, device=x.device)
    correct5 = torch.zeros_like(correct1)
    for i, top in _top_classes(heads, x, min(5, heads.num_classes)):
        c1, c5 = topk.hits(top, y[i : i + top.shape[0]])
        correct1 += c1
        correct5 += c5
    return _percent(correct1, correct5, x.shape[0], heads.num_classes)


def accuracy(top: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, NDArray[np.float64]]:
    """:func:`evaluate`'s numbers from :func:`predict`'s output (rows already ranked: no second pass)."""
    return _percent(*topk.hits(top, y), top.shape[0], num_classes)


@torch.no_grad()
def predict(heads: LinearHeads, x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(N, H, min(k, C)) int64: every head's k best classes per row, best first (column 0 = top-1,
    the prediction :func:`evaluate` scores), on the device of ``x``."""
    k = min(k, heads.num_classes)
    out = torch.empty(x.shape[0], heads.num_heads, k, dtype=torch.int64, device=x.device)
    for i, top in _top_classes(heads, x, k):
        out[i : i + top.shape[0]] = top
    return out
