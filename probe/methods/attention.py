"""Batched attentive heads: every (lr, wd) head of a sweep, each a cross-attention pooler over
patch tokens with a linear classifier, trained in one computation.

One head (V-JEPA's ``AttentiveClassifier`` with its ``CrossAttentionBlock`` cut after the
attention residual, as issue #25 specifies; docs/probe.md "Attentive probe"):

    x̂_t  = LN(x_t)                   per-token LayerNorm, affine γ₁, β₁ (x_t: a raw patch token)
    o_q  = W_o · MHA(q_q; γ₁⊙x̂+β₁) + b_o   H heads, q/k/v/out projections with bias
    r_q  = LN₂(q_q + o_q)              residual onto the learned query q_q, LayerNorm γ₂, β₂
    y    = W_c · mean_q r_q + b_c      several queries (--queries) are averaged

computed exactly, but without projecting any token. With one query head h's score of token t is
``q'_hᵀ (W_k,h (γ₁⊙x̂_t+β₁) + b_k,h) / √d``; the terms without ``x̂_t`` are the same for every
token and cancel in the softmax, so the score is ``u_hᵀ x̂_t`` with the effective query
``u_h = γ₁ ⊙ W_k,hᵀ q'_h / √d``: one GEMM of the normalized tokens against G·Q·H vectors (G grid
heads). The key bias therefore has no effect on any output and is not kept. The values: because
the attention weights sum to one, ``Σ_t a_t (W_v,h (γ₁⊙x̂_t+β₁) + b_v,h) = W_v,h (γ₁ ⊙ Σ_t a_t x̂_t
+ β₁) + b_v,h``: the normalized tokens are pooled first (one batched GEMM) and projected after,
per image. A token costs O(G·Q·H·D) instead of the O(D²) per head of a projection
(tests/test_attentive.py checks both against torch.nn.MultiheadAttention).

Every parameter has a leading grid dimension; gradients come from autograd through the batched
einsums, and the optimizer steps (AdamW, or SGD with momentum) are written out on these tensors
with per-head learning rates and weight decays, so head g follows exactly the update torch.optim
would apply to that head alone (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from .heads import adamw_moments_step, grid_rates

LN_EPS = 1e-5  # torch.nn.LayerNorm's default (V-JEPA's AttentiveClassifier uses nn.LayerNorm)
INIT_STD = 0.02  # V-JEPA's init_std: truncated normal weights and query, zero biases, unit LayerNorm gains
HEAD_DIM = 64  # default attention heads: D / 64, a ViT's own head width (6 for ViT-S, 12 for B, 16 for L)

# the parameters, in order; the decayed ones are V-JEPA's: every matrix and the query, not biases or LayerNorms
NAMES = ("query", "wq", "bq", "wk", "wv", "bv", "wo", "bo", "g1", "b1", "g2", "b2", "wc", "bc")
DECAYED = frozenset({"query", "wq", "wk", "wv", "wo", "wc"})


def default_heads(dim: int) -> int:
    """D / 64 attention heads (at least one); D itself when 64 does not divide it into whole heads."""
    return dim // HEAD_DIM if dim % HEAD_DIM == 0 and dim >= HEAD_DIM else 1


def initial(dim: int, num_classes: int, queries: int, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One head's initial parameters (V-JEPA's init), drawn from ``seed`` on the CPU: every head of
    a grid, and a head trained alone, starts from these same values."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        t = torch.empty(*shape, dtype=torch.float64)
        torch.nn.init.trunc_normal_(t, std=INIT_STD, generator=g)
        return t.to(dtype)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype)

    d, c = dim, num_classes
    return {"query": normal(queries, d), "wq": normal(d, d), "bq": zeros(d), "wk": normal(d, d), "wv": normal(d, d), "bv": zeros(d),
            "wo": normal(d, d), "bo": zeros(d), "g1": ones(d), "b1": zeros(d), "g2": ones(d), "b2": zeros(d),
            "wc": normal(d, c), "bc": zeros(c)}  # fmt: skip


class AttentiveHeads:
    """G attentive classifiers over the same tokens, every parameter stored with a leading G axis.

    Matrices are (in, out): a projection is ``x @ W + b``."""

    def __init__(
        self,
        init: dict[str, torch.Tensor],
        num_heads: int,
        lrs: Sequence[float],
        wds: Sequence[float],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        token_dtype: torch.dtype | None = None,
    ):
        self.device = torch.device(device)
        self.lrs, self.wds = grid_rates(lrs, wds, self.device, dtype)
        self.num_grid = len(self.lrs)
        self.queries, self.dim = init["query"].shape
        self.num_classes = init["wc"].shape[1]
        if self.dim % num_heads:
            raise ValueError(f"{num_heads} attention heads do not divide the token width {self.dim}")
        self.num_heads = int(num_heads)
        # the dtype of the two products over every token (scores, pooling) and their gradients;
        # everything else, and the master weights, in ``dtype``
        self.token_dtype = token_dtype or dtype
        self.params = {n: init[n].to(self.device, dtype).unsqueeze(0).repeat(self.num_grid, *([1] * init[n].ndim)).requires_grad_()
                       for n in NAMES}  # fmt: skip
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        self._step = 0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw tokens (B, T, D), any float dtype → x̂ = LN(x) without affine (computed in the
        weights' dtype), in the token dtype: what :meth:`logits` takes with ``normalized=True``."""
        return F.layer_norm(x.to(self.params["wq"].dtype), (self.dim,), eps=LN_EPS).to(self.token_dtype)

    def logits(self, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """(B, G, C) logits of every head for raw tokens ``x`` (B, T, D), or for tokens already
        through :meth:`normalize` (``normalized``)."""
        p = self.params
        G, Q, H, D = self.num_grid, self.queries, self.num_heads, self.dim
        dh = D // H
        tok = self.token_dtype
        xh = x if normalized else self.normalize(x)  # (B, T, D): no affine, γ₁ and β₁ are folded below
        b = xh.shape[0]
        qp = (torch.einsum("gqd,gde->gqe", p["query"], p["wq"]) + p["bq"].unsqueeze(1)).view(G, Q, H, dh)
        u = torch.einsum("gdhe,gqhe->gqhd", p["wk"].view(G, D, H, dh), qp) * (dh**-0.5)
        u = (u * p["g1"].view(G, 1, 1, D)).reshape(G * Q * H, D)  # the effective queries
        scores = torch.mm(xh.reshape(-1, D), u.t().to(tok)).view(b, -1, G * Q * H)  # (B, T, GQH)
        attn = torch.softmax(scores.to(u.dtype), dim=1).transpose(1, 2)  # (B, GQH, T)
        pooled = torch.bmm(attn.to(tok), xh).view(b, G, Q, H, D)  # Σ_t a_t x̂_t, in the token dtype
        # W_v,h (γ₁ ⊙ pooled + β₁) + b_v,h with γ₁ folded into W_v and β₁ into b_v (per head, not per image)
        wv = (p["wv"] * p["g1"].unsqueeze(2)).view(G, D, H, dh)
        bv = torch.einsum("gd,gde->ge", p["b1"], p["wv"]) + p["bv"]
        # the per-image projections in the token dtype too (what bf16 autocast does to V-JEPA's linear layers)
        v = torch.einsum("bgqhd,gdhe->bgqhe", pooled, wv.to(tok)).reshape(b, G, Q, D).to(u.dtype) + bv.view(1, G, 1, D)
        o = torch.einsum("bgqd,gde->bgqe", v.to(tok), p["wo"].to(tok)).to(u.dtype) + p["bo"].view(1, G, 1, D)
        r = F.layer_norm(o + p["query"].unsqueeze(0), (D,), eps=LN_EPS) * p["g2"].view(1, G, 1, D) + p["b2"].view(1, G, 1, D)
        return torch.einsum("bgd,gdc->bgc", r.mean(2), p["wc"]) + p["bc"].unsqueeze(0)

    def loss(self, x: torch.Tensor, y: torch.Tensor, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum over heads of each head's mean cross-entropy (what is differentiated: head g's
        gradient is its own loss's), and the (G,) per-head loss sums over the batch, detached."""
        logits = self.logits(x, normalized)
        per_row = F.cross_entropy(logits.transpose(1, 2), y.view(-1, 1).expand(-1, self.num_grid), reduction="none")  # (B, G)
        return per_row.mean(0).sum(), per_row.detach().sum(0)

    @torch.no_grad()
    def step(self, optimizer: str, factor: float, *, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999),
             eps: float = 1e-8) -> None:  # fmt: skip
        """One optimizer step of every head from the parameters' ``.grad`` (then cleared); ``factor``
        is the schedule's multiplier of the base LRs. AdamW: torch.optim.AdamW's update with
        decoupled decay of :data:`DECAYED`; SGD: torch.optim.SGD's, with coupled L2 on them."""
        if optimizer == "adamw":
            self._step += 1
            bc1 = 1 - betas[0] ** self._step
            bc2_sqrt = math.sqrt(1 - betas[1] ** self._step)
        for name, param in self.params.items():
            grad = param.grad
            assert grad is not None, f"{name} has no gradient"
            shape = (self.num_grid,) + (1,) * (param.ndim - 1)
            lr = (self.lrs * factor).view(shape)
            wd = self.wds.view(shape) if name in DECAYED else None
            state = self._state.setdefault(name, {})
            if optimizer == "adamw":
                if wd is not None:
                    param.mul_(1 - lr * wd)
                m = state.setdefault("m", torch.zeros_like(param))
                v = state.setdefault("v", torch.zeros_like(param))
                adamw_moments_step(param, grad, m, v, lr / bc1, betas, bc2_sqrt, eps)
            else:
                if wd is not None:
                    grad = grad.addcmul(param, wd)
                if momentum > 0:
                    buf = state.get("m")
                    buf = state.setdefault("m", grad.clone()) if buf is None else buf.mul_(momentum).add_(grad)
                    grad = buf
                param.addcmul_(grad, lr, value=-1.0)
            param.grad = None

    def finite(self) -> torch.Tensor:
        """(G,) bool: the heads whose parameters are all finite (False = diverged)."""
        ok = torch.ones(self.num_grid, dtype=torch.bool, device=self.device)
        for param in self.params.values():
            ok &= torch.isfinite(param.detach()).view(self.num_grid, -1).all(dim=1)
        return ok

    def head(self, g: int) -> dict[str, torch.Tensor]:
        """Head ``g``'s parameters, detached (the shapes of :func:`initial`)."""
        return {n: t.detach()[g] for n, t in self.params.items()}
