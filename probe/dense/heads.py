"""Every (lr, wd) dense head of a sweep as one batched object, trained at once on cached patch tokens.

The heads share their input, so, as :class:`probe.methods.heads.LinearHeads` (which this extends and
whose optimizer step it reuses: SGD with momentum or AdamW, per-head lr and wd as column vectors),
their 1×1 weights sit side by side in one (C_in, G·K) matrix: a minibatch costs one GEMM over its
tokens whatever G is. Gradients come from autograd; each head's loss depends on its own columns only,
so the gradient of the summed loss is each head's own gradient.

- depth, ``bins`` (DINOv2's linear head, dinov2/hub/depthers.py + BNHead): the input is the patch
  token ⊕ the image's CLS token (where the store has one), standardized with train statistics (the
  eval-mode BatchNorm); 256 outputs, ReLU + 0.1 normalised over bins ("linear" norm), the expected
  value over uniform bins [min_depth, max_depth] is the depth, upsampled bilinearly to the target.
  The CLS term is computed once per image, not once per token (the same product, factored).
- depth, ``linear``: one output per token, the log depth (a log-linear regression head).
- seg: the patch token → K class logits, upsampled bilinearly, cross-entropy ignoring 255.

Depth is trained with DINOv2's scale-invariant log loss (SigLoss: sqrt(Var g + 0.15 (E g)²) with
g = log(pred + eps) − log(gt + eps) over the batch's valid pixels).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..methods.heads import LinearHeads
from ..protocol import Protocol
from . import bins as bins_decode

SIG_LAMBDA = 0.15  # DINOv2's SigLoss: the weight of the squared mean log error
SIG_EPS = 1e-3  # SigLoss's eps ("avoid grad explode")
BIN_EPS = bins_decode.BIN_EPS
IGNORE = 255


@dataclass(frozen=True)
class DenseSpec:
    """What a dense head is: task ("depth"/"seg"), head ("bins"/"linear"/"seg"), outputs per token,
    the depth range of the bins, and the resolution the loss is computed at."""

    task: str
    head: str
    outputs: int  # 256 bins, 1 log depth, or K classes
    min_depth: float = 1e-3
    max_depth: float = 10.0
    loss_size: tuple[int, int] = (64, 64)
    log_depth_mean: float | None = None  # the linear head's initial output: the train pixels' mean log depth

    def to_dict(self) -> dict[str, object]:
        return {"task": self.task, "head": self.head, "outputs": self.outputs, "min_depth": self.min_depth,
                "max_depth": self.max_depth, "loss_size": list(self.loss_size), "log_depth_mean": self.log_depth_mean}  # fmt: skip


class DenseHeads(LinearHeads):
    """G dense heads over patch tokens (B, h, w, C) and optionally CLS tokens (B, C_cls)."""

    def __init__(
        self,
        spec: DenseSpec,
        channels: int,
        cls_channels: int,
        lrs: Sequence[float],
        wds: Sequence[float],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels + cls_channels, spec.outputs, lrs, wds, device, dtype)
        self.spec = spec
        # the dtype of the token GEMM and its weight gradient (precision.py); the master weights stay ``dtype``.
        # Not for the log-linear head: one output per head is memory-bound, bf16 would only cost precision
        self.matmul_dtype = dtype if spec.head == "linear" else (matmul_dtype or dtype)
        self.channels, self.cls_channels = channels, cls_channels
        if spec.head == "bins":
            # zero weights and a bias of 1 give equal bin probabilities (every head starts at the middle
            # of the range) with the ReLUs open: at 0 their gradient would be 0 and nothing would learn
            self.b.fill_(1.0)
            self.bins = torch.linspace(spec.min_depth, spec.max_depth, spec.outputs, device=self.device, dtype=dtype)
            self.workspace = bins_decode.Workspace()
        elif spec.head == "linear":
            # start at the train pixels' geometric mean depth (the bins head starts mid-range): SigLoss's
            # pull on the mean log error is weak (λ = 0.15), so a far start costs many steps
            start = spec.log_depth_mean if spec.log_depth_mean is not None else 0.5 * (math.log(spec.min_depth) + math.log(spec.max_depth))
            self.b.fill_(float(start))

    def token_outputs(self, patches: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        """(B, h, w, G, K) raw outputs of every head (bins, log depth or logits last: contiguous)."""
        b, h, w, c = patches.shape
        g, k = self.num_heads, self.num_classes
        if self.matmul_dtype != self.w.dtype:
            # mixed precision: the cast of the weights is in the graph, so autograd's weight gradient is
            # the same low-precision GEMM (tokensᵀ × output gradient), then cast back to the master dtype
            low = torch.mm(patches.reshape(-1, c).to(self.matmul_dtype), self.w[:c].to(self.matmul_dtype))
            out = low.to(self.w.dtype).view(b, h * w, g * k)
        else:
            out = torch.mm(patches.reshape(-1, c), self.w[:c]).view(b, h * w, g * k)
        if cls is not None and self.cls_channels:
            out = out + (torch.mm(cls, self.w[c:]) + self.b)[:, None, :]  # the CLS term once per image
        else:
            out = out + self.b
        return out.view(b, h, w, g, k)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Depth heads: (B, G, h, w) metres; seg: (B, G, K, h, w) logits; from (B, h, w, G, K)."""
        if self.spec.head == "bins":
            p = F.relu(raw) + BIN_EPS
            depth = torch.matmul(p, self.bins) / p.sum(dim=-1)  # the expected bin under the normalised weights
            return depth.permute(0, 3, 1, 2)
        if self.spec.head == "linear":
            return raw[..., 0].exp().permute(0, 3, 1, 2)
        return raw.permute(0, 3, 4, 1, 2)

    def predict(self, patches: torch.Tensor, cls: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """Depth (B, G, H, W) or class logits (B, G, K, H, W) at ``size``, bilinear (align_corners=False)."""
        if self.spec.head == "bins" and not torch.is_grad_enabled():
            return upsample(self._bins_forward(patches, cls, keep=False)[0], size)
        return upsample(self.decode(self.token_outputs(patches, cls)), size)

    def _bins_forward(
        self, patches: torch.Tensor, cls: torch.Tensor | None, keep: bool = True
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The bins head's depth (B, G, h, w) without autograd (bins.py), and what its backward needs:
        the tokens and the logits in the matmul dtype, the per-image term, the (T, G) depths and Z."""
        b, h, w, c = patches.shape
        x = patches.reshape(-1, c).to(self.matmul_dtype)
        low = self.workspace.get("logits", (x.shape[0], self.w.shape[1]), self.matmul_dtype, x.device)
        torch.mm(x, self.w[:c].to(self.matmul_dtype), out=low)
        if cls is not None and self.cls_channels:
            term = torch.addmm(self.b, cls, self.w[c:])  # the CLS term once per image, not once per token
        else:
            term = self.b.expand(b, -1)
        depth, z, open_ = bins_decode.forward(low, term, self.bins, h * w, keep, self.workspace)
        return depth.view(b, h, w, self.num_heads).permute(0, 3, 1, 2), (x, open_, term, depth, z)

    def _bins_gradients(
        self,
        saved: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor],
        cls: torch.Tensor | None,
        grad: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias gradients of :meth:`_bins_forward` given a (B, G, h, w) gradient at its depths."""
        x, open_, term, depth, z = saved
        assert open_ is not None
        c = x.shape[1]
        glow, sums = bins_decode.backward(
            open_, term.shape[0], self.bins, depth, z, grad.permute(0, 2, 3, 1).reshape(-1, self.num_heads), x.dtype, self.workspace
        )
        gw = torch.zeros_like(self.w)
        gw[:c] = torch.mm(x.t(), glow)  # the weight-gradient GEMM, in the matmul dtype (cast on the copy)
        if cls is not None and self.cls_channels:
            gw[c:] = torch.mm(cls.t(), sums)
        return gw, sums.sum(dim=0)

    def losses(self, patches: torch.Tensor, cls: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """(G,) loss of every head on a minibatch; ``target`` (B, H, W) at the loss resolution."""
        pred = self.predict(patches, cls, (target.shape[-2], target.shape[-1]))
        if self.spec.task == "depth":
            return sig_loss(pred, target)
        b, g, k, h, w = pred.shape
        labels = target.long()[:, None].expand(b, g, h, w).reshape(b * g, h, w)
        ce = F.cross_entropy(pred.reshape(b * g, k, h, w), labels, ignore_index=IGNORE, reduction="none").view(b, g, h, w)
        valid = (target != IGNORE)[:, None].to(ce.dtype)
        return (ce * valid).sum(dim=(0, 2, 3)) / valid.sum().clamp_min(1)

    def train_step(
        self, patches: torch.Tensor, cls: torch.Tensor | None, target: torch.Tensor, protocol: Protocol, factor: float
    ) -> torch.Tensor:
        """One optimizer step of every head on a minibatch; the (G,) losses before it."""
        self.w.requires_grad_(True)
        self.b.requires_grad_(True)
        try:
            if self.spec.task == "depth":
                loss, gw, gb = self._depth_gradients(patches, cls, target)
            else:
                loss, gw, gb = self._seg_gradients(patches, cls, target)
        finally:
            self.w.requires_grad_(False)
            self.b.requires_grad_(False)
        with torch.no_grad():
            self.step(gw, gb, protocol, factor)
        return loss.detach()

    def _depth_gradients(
        self, patches: torch.Tensor, cls: torch.Tensor | None, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SigLoss of every head and its gradient, the same numbers as autograd through :meth:`losses`:
        the per-pixel part (upsampling, logs, SigLoss) in closed form, which costs a few passes over the
        (B, G, H, W) predictions instead of autograd's gathers and scatters of the valid pixels; autograd
        only for the token-resolution decode (the bins' normalisation or the exp), given that gradient."""
        if self.spec.head == "bins":
            with torch.no_grad():
                depth, saved = self._bins_forward(patches, cls)  # its backward is by hand (bins.py)
        else:
            depth = self.decode(self.token_outputs(patches, cls))  # (B, G, h, w), in the autograd graph
        size = (int(target.shape[-2]), int(target.shape[-1]))
        with torch.no_grad():
            # the per-pixel work in each map's transposed layout (W, H): the upsampling is then two plain
            # GEMMs each way, without broadcast copies of the interpolation matrices
            loss, grad = sig_loss_and_grad(upsample_transposed(depth.detach(), size), target.transpose(1, 2).contiguous())
            grad = upsample_transposed_adjoint(grad, (depth.shape[-2], depth.shape[-1]))
            # a diverged head learns nothing more (at token resolution: 16× fewer values than the loss's)
            grad = torch.where(torch.isfinite(loss)[None, :, None, None], torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
        if self.spec.head == "bins":
            with torch.no_grad():
                gw, gb = self._bins_gradients(saved, cls, grad)
        else:
            gw, gb = torch.autograd.grad(depth, [self.w, self.b], grad_outputs=grad)
        return loss, gw, gb

    def _seg_gradients(
        self, patches: torch.Tensor, cls: torch.Tensor | None, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy of every head (mean over the batch's labelled pixels, 255 ignored) and its gradient,
        the same numbers as autograd through :meth:`losses`: per image, the upsampled logits' log-softmax,
        softmax − one-hot on the labelled pixels, and the upsampling's adjoint back to tokens, in closed
        form (autograd would keep the (B, G, K, H, W) logits and a chain of their copies); autograd only
        for the token GEMM, given that gradient."""
        raw = self.token_outputs(patches, cls)  # (B, h, w, G, K), in the autograd graph
        b, h, w, g, k = raw.shape
        size = (int(target.shape[-2]), int(target.shape[-1]))
        # the bilinear upsampling as two GEMMs on the grid dims, classes last (contiguous): the log-softmax
        # then runs along memory and the adjoint lands in raw's own layout, with no transposed copies
        uh = _interpolation_matrix(h, size[0], raw.device, raw.dtype)
        uw = _interpolation_matrix(w, size[1], raw.device, raw.dtype)
        with torch.no_grad():
            labels = target.long()
            valid = labels != IGNORE
            n = max(int(valid.sum()), 1)
            safe = torch.where(valid, labels, 0)
            total = torch.zeros(g, dtype=torch.float64, device=raw.device)
            grad = torch.empty(raw.shape, dtype=raw.dtype, device=raw.device)
            for i in range(b):  # one image's (H, W, G, K) logits at a time: a few MiB
                across = torch.matmul(uw, raw[i].detach().reshape(h, w, g * k))  # (h, W, G·K)
                up = torch.mm(uh, across.reshape(h, -1)).view(size[0], size[1], g, k)
                logp = torch.log_softmax(up, dim=-1)
                index = safe[i][:, :, None, None].expand(size[0], size[1], g, 1)
                mask = valid[i].to(logp.dtype)[:, :, None]
                total -= (logp.gather(3, index)[..., 0] * mask).sum(dim=(0, 1), dtype=torch.float64)
                p = logp.exp_().scatter_add_(3, index, torch.full(index.shape, -1.0, dtype=logp.dtype, device=logp.device))
                p.mul_(mask.div_(n)[..., None])  # softmax − one-hot, on labelled pixels, over the batch's count
                back = torch.mm(uh.t(), p.view(size[0], -1)).view(h, size[1], g * k)  # the adjoint, in reverse order
                grad[i] = torch.matmul(uw.t(), back).view(h, w, g, k)
            loss = (total / n).to(raw.dtype)
            # a diverged head learns nothing more
            grad = torch.where(torch.isfinite(loss)[:, None], torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
        gw, gb = torch.autograd.grad(raw, [self.w, self.b], grad_outputs=grad)
        return loss, gw, gb


def sig_loss_and_grad(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G,) :func:`sig_loss` of (B, G, H, W) predictions and its gradient with respect to them; ``pred``
    is overwritten (it becomes the gradient: a few in-place passes over the largest tensor of a step).

    With g = log(pred + eps) − log(gt + eps) on the n valid pixels (0 elsewhere), L = sqrt(Var g + λ (E g)²)
    and dL/dg_i = ((g_i − E g) / (n − 1) + λ E g / n) / L (the unbiased variance's own mean term cancels)."""
    valid = target > 0
    n = int(valid.sum())
    heads = pred.shape[1]
    if n < 2:
        return pred.new_zeros(heads), pred.zero_()
    mask = valid.to(pred.dtype)[:, None]  # (B, 1, H, W)
    log_gt = torch.log(torch.where(valid, target, 1.0 - SIG_EPS) + SIG_EPS)[:, None]  # 0 where there is no depth
    q = pred.clamp_min_(0).add_(SIG_EPS).masked_fill_(~valid[:, None], 1.0)  # pred + eps, and 1 (log 0) where there is no depth
    g = torch.log(q).sub_(log_gt)  # 0 where there is no depth
    s1 = g.sum(dim=(0, 2, 3), dtype=torch.float64)
    s2 = torch.einsum("bghw,bghw->g", g, g).double()
    mean = s1 / n
    var = (s2 - n * mean * mean).clamp_min(0) / (n - 1)
    loss = torch.sqrt(var + SIG_LAMBDA * mean * mean)
    scale = (1.0 / (n - 1) / loss).to(pred.dtype)
    shift = ((SIG_LAMBDA / n - 1.0 / (n - 1)) * mean / loss).to(pred.dtype)
    grad = g.mul_(scale[None, :, None, None]).addcmul_(mask, shift[None, :, None, None]).div_(q)
    return loss.to(pred.dtype), grad


def sig_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(G,) SigLoss of (B, G, H, W) predictions against (B, H, W) depth over pixels with depth > 0."""
    valid = target > 0
    if int(valid.sum()) < 2:
        return pred.sum(dim=(0, 2, 3)) * 0.0  # nothing to learn from this batch
    g = torch.log(pred.transpose(0, 1)[:, valid].clamp_min(0) + SIG_EPS) - torch.log(target[valid] + SIG_EPS)  # (G, valid pixels)
    var, mean = torch.var_mean(g, dim=1)  # unbiased, as torch.var in DINOv2's SigLoss
    return torch.sqrt(var + SIG_LAMBDA * mean**2)


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in): 1-D linear interpolation as F.interpolate(mode="linear", align_corners=False) does it
    (cached: a training step would otherwise rebuild it)."""
    eye = torch.eye(n_in, device=device, dtype=dtype)[:, None, :]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of the last two dims (align_corners=False) as two small GEMMs: the same
    numbers as F.interpolate(mode="bilinear"), whose backward on CPUs is a slow scatter."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    uh = _interpolation_matrix(h, size[0], x.device, x.dtype)
    uw = _interpolation_matrix(w, size[1], x.device, x.dtype)
    return torch.matmul(torch.matmul(uh, x), uw.T)


def upsample_transpose(grad: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The adjoint of :func:`upsample` to ``size``: the gradient at the input of a gradient at its output."""
    h, w = grad.shape[-2:]
    if (h, w) == tuple(size):
        return grad
    uh = _interpolation_matrix(size[0], h, grad.device, grad.dtype)
    uw = _interpolation_matrix(size[1], w, grad.device, grad.dtype)
    return torch.matmul(torch.matmul(uh.T, grad), uw)


def upsample_transposed(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``upsample(x, size).transpose(-1, -2)``, contiguous, for (B, G, h, w) ``x``: X Uwᵀ as one GEMM,
    then (Uh (X Uwᵀ))ᵀ = (X Uwᵀ)ᵀ Uhᵀ as another (the transpose between them copies the small
    intermediate only)."""
    b, g, h, w = x.shape
    uh = _interpolation_matrix(h, size[0], x.device, x.dtype)
    uw = _interpolation_matrix(w, size[1], x.device, x.dtype)
    a = torch.mm(x.reshape(-1, w), uw.T).view(b * g, h, size[1])
    return torch.mm(a.transpose(1, 2).reshape(-1, h), uh.T).view(b, g, size[1], size[0])


def upsample_transposed_adjoint(grad: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The gradient at the (B, G, h, w) input of :func:`upsample_transposed` from one at its (B, G, W, H) output."""
    b, g, big_w, big_h = grad.shape
    uh = _interpolation_matrix(size[0], big_h, grad.device, grad.dtype)
    uw = _interpolation_matrix(size[1], big_w, grad.device, grad.dtype)
    a = torch.mm(grad.reshape(-1, big_h), uh).view(b * g, big_w, size[0])  # (Uhᵀ G)ᵀ per map
    return torch.mm(a.transpose(1, 2).reshape(-1, big_w), uw).view(b, g, size[0], size[1])
