"""Multinomial L2-regularised logistic regression by full-batch L-BFGS, on the device.

The objective is scikit-learn's (``LogisticRegression(C=…)``, lbfgs, multinomial): for weights
W (D × K) and an unpenalised intercept b,

    C · Σᵢ CE(xᵢ W + b, yᵢ) + ½ ‖W‖²

solved here in its scaled form ``mean CE + ‖W‖² / (2 C n)`` (the same minimiser; scikit-learn
scales it the same way, so ``tol`` means the same: the largest gradient component of the scaled
objective, scipy's ``pgtol``). The whole C grid is one warm-started path: C ascending (largest
regularisation first), each solve starting from the previous solution, and L-BFGS is
preconditioned with the features' second-moment matrix (:class:`GramPreconditioner`).

Each function evaluation is one pass over the rows in chunks: logits GEMM, softmax, gradient
GEMM on the same chunk while it is still in cache. Features should be standardised first
(``probe.heads.standardize_stats`` / ``prepare``): the grid then means the same for every encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from featstore.errors import UsageError

from .protocol import DEFAULT_LOGREG_MAX_ITER as DEFAULT_MAX_ITER
from .protocol import DEFAULT_LOGREG_TOL as DEFAULT_TOL
from .protocol import check_logreg as check_settings  # one check for Protocol and fit_path

HISTORY = 10  # L-BFGS memory (curvature pairs), scipy's default m
_CHUNK_ELEMENTS = 1 << 22  # feature elements per chunk of rows (16 MiB in float32)


@dataclass
class LogregPath:
    """The solution at every C of a path, in C order."""

    Cs: tuple[float, ...]
    weight: torch.Tensor  # (len(Cs), D, K)
    bias: torch.Tensor  # (len(Cs), K)
    n_iter: list[int]  # L-BFGS iterations of each solve (warm-started from the previous C)
    objective: list[float]  # scikit-learn's objective C·ΣCE + ½‖W‖² at each solution
    converged: list[bool]  # stopped before the iteration cap (gradient tolerance or no more progress)
    grad_max: list[float]  # largest gradient component of the scaled objective at each solution

    def predict(self, x: torch.Tensor, index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(top1 (P, N), top5 (P, N, min(5, K))) class indices for every C (or only ``index``)."""
        picks = range(len(self.Cs)) if index is None else [index]
        k = self.weight.shape[2]
        n5 = min(5, k)
        top1 = np.empty((len(picks), x.shape[0]), np.int64)
        top5 = np.empty((len(picks), x.shape[0], n5), np.int64)
        step = max(1, _CHUNK_ELEMENTS // max(x.shape[1], k))
        with torch.no_grad():
            for j, p in enumerate(picks):
                w, b = self.weight[p], self.bias[p]
                for i in range(0, x.shape[0], step):
                    logits = torch.addmm(b, x[i : i + step].to(w.dtype), w)
                    best = logits.topk(n5, dim=1, sorted=True).indices.cpu().numpy()
                    top5[j, i : i + step] = best
                    top1[j, i : i + step] = best[:, 0]
        return top1, top5


def loss_and_gradient(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of (x, y) under (W, b) and its gradients (dW, db): one pass over x.

    The softmax runs on the transposed (K × rows) logits: along a contiguous dimension of only
    K = 10 classes torch's CPU softmax is ~15× slower than across rows. The weight gradient is
    accumulated as (K × D) = G·X, the faster GEMM layout for a narrow K.
    """
    n, d = x.shape
    k = w.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(d, k))
    gw_t = torch.zeros(k, d, dtype=w.dtype, device=w.device)
    gb = torch.zeros_like(b)
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for i in range(0, n, step):
        xc, yc = x[i : i + step], y[i : i + step]
        logp = torch.log_softmax(torch.addmm(b, xc, w).t().contiguous(), dim=0)
        target = yc[None, :]
        total -= logp.gather(0, target).sum(dtype=torch.float64)
        g = logp.exp_().scatter_add_(0, target, _minus_ones(len(yc), g_like=logp))  # softmax − one-hot
        gw_t.addmm_(g, xc)
        gb += g.sum(1)
    return float(total) / n, gw_t.t().div_(n), gb.div_(n)


def _minus_ones(m: int, g_like: torch.Tensor) -> torch.Tensor:
    return torch.full((1, m), -1.0, dtype=g_like.dtype, device=g_like.device)


class _Objective:
    """mean CE + (λ/2)‖W‖² over a flat (D + 1) × K parameter (weights, then the intercept row), λ = 1/(C·n).

    The data pass of the last point is kept: the solution at one C is the start of the next, where
    only the penalty differs.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.d = x, y, x.shape[1]
        self.lam = 0.0
        self._last: tuple[torch.Tensor, tuple] | None = None

    def data(self, p: torch.Tensor):
        if self._last is not None and self._last[0] is p:
            return self._last[1]
        ce, gw, gb = loss_and_gradient(self.x, self.y, p[: self.d], p[self.d])
        self._last = (p, (ce, gw, gb))
        return ce, gw, gb

    def __call__(self, p: torch.Tensor) -> tuple[float, torch.Tensor]:
        ce, gw, gb = self.data(p)
        w = p[: self.d]
        f = ce + 0.5 * self.lam * float(w.double().square().sum())
        return f, torch.cat([gw + self.lam * w, gb[None]], 0)


class GramPreconditioner:
    """P ≈ (Hessian)⁻¹ on the weight rows: (S + λ·I)⁻¹ with S = XᵀX / n, the identity on the
    intercept row. The cross-entropy Hessian is E[x xᵀ ⊗ (diag p − p pᵀ)]; its x xᵀ factor carries
    the features' correlations, which is what slows plain L-BFGS on real encoder features. The
    class factor is left to L-BFGS's scalar step (γ = s·y / y·Py); weighting S by 1 rather than
    by 1/K was measured to need fewer passes (68 vs 96 on the benchmark's 13-C path; 107 without
    a preconditioner). One eigendecomposition of S (D × D) per training set; applying P is two
    D × D × K products.
    """

    def __init__(self, x: torch.Tensor):
        n = x.shape[0]
        gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        step = max(1, _CHUNK_ELEMENTS // x.shape[1])
        for i in range(0, n, step):
            xc = x[i : i + step]
            gram += (xc.t() @ xc).double()
        values, vectors = torch.linalg.eigh(gram / n)
        self.values = values.clamp_min(0).to(x.dtype)[:, None]
        self.vectors = vectors.to(x.dtype)
        self.lam = 0.0
        self.d = x.shape[1]

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        out = q.clone()
        w = q[: self.d]
        out[: self.d] = self.vectors @ ((self.vectors.t() @ w) / (self.values + self.lam))
        return out


class Memory:
    """L-BFGS curvature pairs (s, y). (Carrying them from one C to the next, with y corrected
    exactly for the penalty change, was measured: more iterations than a fresh memory, 130 vs 99
    on the benchmark's path, so every solve starts fresh.)"""

    def __init__(self, size: int = HISTORY, precondition=None):
        self.size = size
        self.precondition = precondition
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / s·y)

    def add(self, s: torch.Tensor, y: torch.Tensor) -> None:
        sy = float((s * y).sum())
        if sy > 1e-10 * float((y * y).sum()):  # too little curvature: keep H positive definite
            self.pairs.append((s, y, 1.0 / sy))
            del self.pairs[: -self.size]

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """−H·g by the two-loop recursion, H0 = γ·P (P the preconditioner, or I), γ = s·y / y·Py
        of the newest pair."""
        q = g.neg()
        alphas = []
        for s, y, r in reversed(self.pairs):
            a = r * float((s * q).sum())
            alphas.append(a)
            q.add_(y, alpha=-a)
        p = self.precondition or (lambda v: v)
        if self.pairs:
            _, y, r = self.pairs[-1]
            q = p(q).mul_(1.0 / (r * float((y * p(y)).sum())))
        elif self.precondition is not None:
            q = p(q)
        for (s, y, r), a in zip(self.pairs, reversed(alphas)):
            q.add_(s, alpha=a - r * float((y * q).sum()))
        return q


def lbfgs(fg, theta: torch.Tensor, *, tol: float, max_iter: int, precondition=None) -> tuple[torch.Tensor, int, float]:
    """Minimise a smooth convex function from ``theta``; returns (solution, iterations, max |gradient|).

    ``fg(theta) -> (f, gradient)``. L-BFGS two-loop recursion with an Armijo backtracking line
    search (step 1 first, then quadratic interpolation); it stops when the largest gradient
    component is <= ``tol`` (scipy's pgtol), after ``max_iter`` iterations, or when the line search
    finds no decrease, or an iteration lowers f by less than 1 ulp of its value (the objective is
    as low as the dtype's arithmetic can tell: scipy's ``ftol`` rule). ``precondition(v)``
    applies an approximate inverse Hessian (the initial H0 up to L-BFGS's scalar).
    """
    memory = Memory(precondition=precondition)
    f, g = fg(theta)
    ftol = torch.finfo(theta.dtype).eps
    g_max = float(g.abs().max())
    if g_max <= tol:
        return theta, 0, g_max
    it = 0
    while it < max_iter:
        it += 1
        q = memory.direction(g)
        slope = float((g * q).sum())
        if not slope < 0:  # not a descent direction (rounding): restart from steepest descent
            memory.pairs.clear()
            q, slope = g.neg(), -float((g * g).sum())
        t = 1.0 if memory.pairs else min(1.0, 1.0 / float(g.abs().sum()))  # first step as torch's LBFGS
        for _ in range(30):
            cand = theta + t * q
            f_new, g_new = fg(cand)
            if f_new <= f + 1e-4 * t * slope:
                break
            # minimiser of the quadratic through f, slope and f_new, kept within [0.1 t, 0.5 t]
            t_q = -slope * t * t / (2.0 * (f_new - f - slope * t))
            t = min(max(t_q, 0.1 * t), 0.5 * t) if math.isfinite(t_q) else 0.5 * t
        else:
            break  # no decrease found: as converged as float arithmetic allows
        memory.add(cand - theta, g_new - g)
        stalled = (f - f_new) <= ftol * max(abs(f), abs(f_new), 1.0)
        theta, f, g = cand, f_new, g_new
        g_max = float(g.abs().max())
        if g_max <= tol or stalled:
            break
    return theta, it, g_max


def fit_path(
    x: torch.Tensor,
    y: torch.Tensor,
    Cs,
    num_classes: int,
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LogregPath:
    """Solve the objective at every C (ascending), each solve warm-started from the previous
    one's solution (whose data pass is reused: only the penalty differs), or from the linear
    extrapolation of the last two solutions when that is lower.

    ``x`` (n × D, float32) and ``y`` (n, int64) on one device. ``init`` = (W, b) starts the first
    solve there instead of at zero (a refit from a path solution).
    """
    Cs = check_settings(Cs, tol, max_iter)
    n, d = x.shape
    if n == 0:
        raise UsageError("logistic regression needs at least one training row")
    objective = _Objective(x, y.to(x.device, torch.int64))
    precondition = GramPreconditioner(x)
    theta = torch.zeros(d + 1, num_classes, dtype=x.dtype, device=x.device)
    if init is not None:
        theta[:d].copy_(init[0])
        theta[d].copy_(init[1])
    weights, biases, iters, objectives, grads = [], [], [], [], []
    for i, C in enumerate(Cs):
        objective.lam = precondition.lam = 1.0 / (C * n)
        start = theta
        if i >= 2:
            # the path is smooth in log C: extrapolate the last two solutions linearly and start
            # there if the objective agrees (44 instead of 64 iterations on the benchmark's path)
            step = math.log(C / Cs[i - 1]) / math.log(Cs[i - 1] / Cs[i - 2])
            guess = theta + step * (theta - previous)
            here = objective(theta)[0]  # theta's data pass is the kept one: no pass over x
            if objective(guess)[0] < here:  # (then the guess's pass is kept for the solve's start)
                start = guess
        previous = theta
        theta, n_iter, g_max = lbfgs(objective, start, tol=tol, max_iter=max_iter, precondition=precondition)
        loss, _ = objective(theta)  # the kept data pass: no extra pass over x
        weights.append(theta[:d].clone())
        biases.append(theta[d].clone())
        iters.append(n_iter)
        objectives.append(loss * C * n)  # back to scikit-learn's scale: C·ΣCE + ½‖W‖²
        grads.append(g_max)
    converged = [i < max_iter for i in iters]
    return LogregPath(Cs, torch.stack(weights), torch.stack(biases), iters, objectives, converged, grads)


def sklearn_objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, C: float) -> float:
    """C·ΣCE + ½‖W‖² in float64 (for comparing a solution with scikit-learn's)."""
    logits = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-C * logp[np.arange(len(y)), y].sum() + 0.5 * np.square(w.astype(np.float64)).sum())
