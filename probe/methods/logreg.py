"""Multinomial L2-regularised logistic regression by full-batch L-BFGS, on the device.

The objective is scikit-learn's (``LogisticRegression(C=…)``, lbfgs, multinomial): for weights
W (D × K) and an unpenalised intercept b,

    C · Σᵢ CE(xᵢ W + b, yᵢ) + ½ ‖W‖²

solved here in its scaled form ``mean CE + ‖W‖² / (2 C n)`` (the same minimiser; scikit-learn
scales it the same way, so ``tol`` means the same: the largest gradient component of the scaled
objective, scipy's ``pgtol``). Where the rows hold two classes, scikit-learn fits its binary
model instead, and so, in effect, does this (``fit_path``: λ doubles). The whole C grid is one
warm-started path: C ascending (largest regularisation first), each solve starting from a
prediction of its solution (the tangent of the path at the first C, then the polynomial
extrapolation of the last solutions in log C).

The intercept is profiled out (:class:`BiasProfile`): every function evaluation solves for the
best intercept of its weights by Newton's method on K unknowns, so L-BFGS runs on W alone,
preconditioned with a Kronecker-factored Hessian, the features' covariance ⊗ the classes'
softmax covariance (:class:`KroneckerPreconditioner`). An evaluation is one pass over the rows in
chunks: logits GEMM, a few softmaxes over the kept logits, gradient GEMM. Features should be
standardised first (``probe.heads.standardize_stats`` / ``prepare``): the grid then means the same
for every encoder.

Measured on the benchmark's 13-C path (50,000 × 512, 10 classes; benchmarks/RESULTS.md): 16
L-BFGS iterations, 24 passes, against 44 iterations / 60 passes for the joint L-BFGS with a
Gram preconditioner that came before, and scikit-learn's 95 iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from featstore.errors import UsageError

from ..protocol import DEFAULT_LOGREG_MAX_ITER as DEFAULT_MAX_ITER
from ..protocol import DEFAULT_LOGREG_TOL as DEFAULT_TOL
from ..protocol import check_logreg as check_settings  # one check for Protocol and fit_path

HISTORY = 10  # L-BFGS memory (curvature pairs), scipy's default m
GRAM_ROWS = 8192  # rows whose covariance preconditions (KroneckerPreconditioner)
_CHUNK_ELEMENTS = 1 << 22  # feature elements per chunk of rows (16 MiB in float32)
_LOGIT_ELEMENTS = 1 << 28  # logits kept between the intercept's Newton steps up to this many (1 GiB in float32)
_BIAS_STEPS = 50  # Newton steps on the intercept per pass, at most (1–3 from a warm start)
_BIAS_MAX_STEP = 4.0  # largest change of one intercept per Newton step
_STUCK = 20  # iterations without progress that f or the gradient can tell, before a solve gives up
FULL_CLASSES = 64  # up to this many classes, the intercept's Newton and the class factor use the full K × K
_CLASS_FLOOR = 1e-3  # smallest class-factor eigenvalue in the preconditioner, × 1/K (a uniform softmax's)

Chunk = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]  # start row, rows, labels, transposed logits without the intercept
Pass = tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # mean CE, dW, db, b*, class factor
Precondition = Callable[[torch.Tensor], torch.Tensor]
# an objective: θ → (f, gradient) or (f, gradient, the largest gradient component the tolerance is about)
Objective = Callable[[torch.Tensor], tuple[float, torch.Tensor] | tuple[float, torch.Tensor, float]]


@dataclass
class LogregPath:
    """The solution at every C of a path, in C order."""

    Cs: tuple[float, ...]
    weight: torch.Tensor  # (len(Cs), D, K)
    bias: torch.Tensor  # (len(Cs), K)
    n_iter: list[int]  # L-BFGS iterations of each solve (warm-started from the previous C)
    objective: list[float]  # scikit-learn's objective C·ΣCE + ½‖W‖² at each solution
    converged: list[bool]  # grad_max <= tol (else the iteration cap, or no step lowered the objective)
    grad_max: list[float]  # largest gradient component of the scaled objective at each solution (its own pass)
    passes: int = 0  # passes over the training rows, the whole path (each one logits GEMM + gradient GEMM)

    def predict(self, x: torch.Tensor, index: int | None = None) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
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


class BiasProfile:
    """One data pass at weights W with the intercept profiled out: b*(W) = argmin_b mean CE(xW + b)
    found by Newton's method on the K intercepts (started at the last b*), then the mean
    cross-entropy and its gradient at (W, b*(W)).

    By the envelope theorem the W-gradient there is the gradient of F(W) = min_b CE(W, b), so
    L-BFGS runs on W alone and never spends an iteration on the intercept — which was, measured
    on the benchmark's path, the largest gradient component in most iterations of the joint
    solve (31 → 17 iterations, 41 → 26 passes, same preconditioner and starts). The Newton steps on b reuse the pass's logits
    (K × n, kept when that is no larger than the features or 2²⁸ elements, else recomputed per
    step), so they cost a softmax each, not a pass.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, tol: float):
        self.x, self.y, self.k = x, y, num_classes
        n, d = x.shape
        self.prior = torch.bincount(y, minlength=num_classes).to(x.dtype) / n
        self.inner_tol = 0.1 * tol  # the intercept gradient is then far below the stopping tolerance
        self.step = max(1, _CHUNK_ELEMENTS // max(d, num_classes))
        self.keep = n * num_classes <= max(_LOGIT_ELEMENTS, n * d)

    def _chunks(self, w: torch.Tensor, logits: torch.Tensor | None, fill: bool) -> Iterator[Chunk]:
        """(start row, rows, labels, transposed logits without the intercept) per chunk of rows."""
        for i in range(0, self.x.shape[0], self.step):
            xc = self.x[i : i + self.step]
            if logits is not None and not fill:
                zt = logits[:, i : i + self.step]
            else:
                zt = (xc @ w).t()
                if logits is not None:
                    logits[:, i : i + self.step] = zt
            yield i, xc, self.y[i : i + self.step], zt

    def _stats(self, chunks: Iterator[Chunk], b: torch.Tensor, probs: torch.Tensor | None) -> tuple[float, torch.Tensor, torch.Tensor]:
        """mean CE, mean p and (1/n) Σ p pᵀ at intercept b (the probabilities into ``probs``); for
        more than FULL_CLASSES classes only that matrix's diagonal, (1/n) Σ p²: the K × K sum costs
        n·K², more than the gradient GEMM's n·K·D from K ≈ D (measured at K = 1000, D = 768)."""
        n = self.x.shape[0]
        total = torch.zeros((), dtype=torch.float64, device=b.device)
        p_sum = torch.zeros_like(b)
        full = self.k <= FULL_CLASSES
        ppt = torch.zeros((self.k, self.k) if full else (self.k,), dtype=b.dtype, device=b.device)
        for i, _, yc, zt in chunks:
            # softmax along dim 0 of the (K × rows) logits: along a contiguous dimension of only
            # K = 10 classes torch's CPU softmax is ~15× slower than across rows
            logp = torch.log_softmax(zt + b[:, None], dim=0)
            total -= logp.gather(0, yc[None, :]).sum(dtype=torch.float64)
            prob = logp.exp_() if probs is None else torch.exp(logp, out=probs[:, i : i + logp.shape[1]])
            p_sum += prob.sum(1)
            if full:
                ppt.addmm_(prob, prob.t())
            else:
                ppt += prob.square().sum(1)
        return float(total) / n, p_sum / n, ppt / n

    def __call__(self, w: torch.Tensor, b: torch.Tensor) -> Pass:
        """(mean CE, dW (D × K), db (K), b*, class factor E[diag p − p pᵀ] (K × K, or its diagonal
        (K) for more than FULL_CLASSES classes)) at (W, b*(W))."""
        n, d = self.x.shape
        logits = probs = None
        if self.keep:
            logits = torch.empty(self.k, n, dtype=w.dtype, device=w.device)
            probs = torch.empty_like(logits)
        ce, p_mean, ppt = self._stats(self._chunks(w, logits, fill=True), b, probs)
        probs_at_b, t = True, 1.0
        for _ in range(_BIAS_STEPS):
            gb = p_mean - self.prior
            if float(gb.abs().max()) <= self.inner_tol:
                break
            # Newton on the K intercepts; the all-ones direction (a shift of every logit) changes
            # nothing and gets unit curvature so that it is left alone
            if ppt.dim() == 2:
                hessian = (torch.diag(p_mean) - ppt + 1.0 / self.k).double()
                hessian.diagonal().add_(1e-9)  # (classes whose p underflowed to 0 would make it singular)
                delta = torch.linalg.solve(hessian, gb.double()).to(b.dtype)
            else:  # many classes: the Hessian's diagonal (each p small, the coupling −p pᵀ weak)
                delta = gb / (p_mean - ppt + 1e-9)
            # a class whose probability is ≈ 0 (absent from the rows, or far off after a warm
            # start from other rows) has ≈ 0 curvature: its Newton step is huge and no halving
            # makes it a decrease. Steps of at most 4 in any logit walk there instead (e⁴ per step)
            delta *= min(1.0, _BIAS_MAX_STEP / float(delta.abs().max()))
            while True:  # damped: halve until the cross-entropy does not rise (rarely needed)
                cand = b - t * delta
                ce_c, p_c, ppt_c = self._stats(self._chunks(w, logits, fill=False), cand, probs)
                if ce_c <= ce or t < 1e-3:
                    break
                t *= 0.5
            if not ce_c <= ce:  # (NaN included)
                probs_at_b = False  # (``probs`` hold the rejected candidate's)
                break  # no decrease in float arithmetic: b is as good as it gets
            b, ce, p_mean, ppt, t = cand, ce_c, p_c, ppt_c, min(1.0, 2 * t)
        factor = torch.diag(p_mean) - ppt if ppt.dim() == 2 else p_mean - ppt
        gw_t = torch.zeros(self.k, d, dtype=w.dtype, device=w.device)
        gb = torch.zeros_like(b)
        for i, xc, yc, zt in self._chunks(w, logits, fill=False):
            if probs is not None and probs_at_b:
                g = probs[:, i : i + len(yc)]
            else:
                g = torch.softmax(zt + b[:, None], dim=0)
            g.scatter_add_(0, yc[None, :], _minus_ones(len(yc), g_like=g))  # softmax − one-hot
            gw_t.addmm_(g, xc)  # (K × D) = G·X: the faster GEMM layout for a narrow K
            gb += g.sum(1)
        return ce, gw_t.t().div_(n), gb.div_(n), b, factor


def _minus_ones(m: int, g_like: torch.Tensor) -> torch.Tensor:
    return torch.full((1, m), -1.0, dtype=g_like.dtype, device=g_like.device)


class _Objective:
    """F(W) = min_b mean CE(xW + b) + (λ/2)‖W‖², λ = 1/(C·n) (2/(C·n) for two classes, as
    fit_path says), over the (D × K) weights.

    The data passes of the last accepted and the last evaluated point are kept (with their b*):
    the solution at one C is the start of the next, where only the penalty differs, a rejected
    extrapolated start leaves the solution's pass in place, and the point a solve returns (its
    last accepted one) has its own pass for the reported loss, gradient and intercept.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, tol: float, bias: torch.Tensor):
        self.profile = BiasProfile(x, y, num_classes, tol)
        self.lam = 0.0
        self.bias = bias  # b* of the last accepted point: where every intercept solve starts
        self._accepted: tuple[torch.Tensor, Pass] | None = None
        self._last: tuple[torch.Tensor, Pass] | None = None
        self.passes = 0

    def data(self, w: torch.Tensor) -> Pass:
        """(mean CE, dW, db, b*, class factor) at W, from a kept pass when W is the last accepted
        or the last evaluated point."""
        for kept in (self._accepted, self._last):
            if kept is not None and kept[0] is w:
                return kept[1]
        # started from the accepted point's b*, not the last evaluated one: a rejected line-search
        # candidate's intercept can be far off, and starting there made every later candidate fail
        result = self.profile(w, self.bias)
        self.passes += 1
        self._last = (w, result)
        return result

    def accept(self, w: torch.Tensor) -> Pass:
        """Make W the point whose pass is kept and whose b* starts the next intercept solves."""
        result = self.data(w)
        self._accepted, self.bias = (w, result), result[3]
        return result

    def __call__(self, w: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        """(F, ∇F, the largest gradient component of the full objective, intercept included)."""
        ce, gw, gb, _, _ = self.data(w)
        f = ce + 0.5 * self.lam * float(w.double().square().sum())
        g = gw + self.lam * w
        return f, g, max(float(g.abs().max()), float(gb.abs().max()))


class KroneckerPreconditioner:
    """P ≈ (Hessian of F)⁻¹: (Σ ⊗ A + λ·I)⁻¹, applied to a (D × K) W-gradient as V ↦ Q [(Qᵀ V U)
    / (s aᵀ + λ)] Uᵀ.

    The cross-entropy Hessian is E[x xᵀ ⊗ (diag p − p pᵀ)] (with the intercept profiled out, x
    centred); Σ ⊗ A takes its two factors apart (as K-FAC does): Σ the features' covariance,
    whose correlations are what slows plain L-BFGS on encoder features, and A = E[diag p − p pᵀ]
    the classes' factor, exact at W = 0 (every p the same), taken from the pass at every
    accepted point. Σ comes from 8192 evenly spaced rows: a covariance estimate that good
    preconditions about as well as the full one at 1/6 of its cost (measured on the benchmark
    path: 23 passes; 22 from 16,384 rows, 25 from 4,096). One D × D eigendecomposition per
    training set, one K × K per accepted point.
    """

    def __init__(self, x: torch.Tensor, rows: int = GRAM_ROWS):
        n, d = x.shape
        # evenly spaced rows in integer arithmetic (a float32 linspace rounds past n − 1 from n ≈ 2²⁴)
        pick = torch.arange(rows, device=x.device, dtype=torch.int64) * (n - 1) // max(rows - 1, 1)
        sub = x if n <= rows else x[pick]
        m = sub.shape[0]
        gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        step = max(1, _CHUNK_ELEMENTS // d)
        for i in range(0, m, step):
            xc = sub[i : i + step]
            gram += (xc.t() @ xc).double()
            total += xc.sum(0, dtype=torch.float64)
        mean = total / m
        values, vectors = torch.linalg.eigh(gram / m - torch.outer(mean, mean))
        self.s = values.clamp_min(0).to(x.dtype)[:, None]
        self.q = vectors.to(x.dtype)
        self.lam = 0.0
        self.set_class_factor(torch.zeros(0, 0, dtype=x.dtype, device=x.device))

    def set_class_factor(self, factor: torch.Tensor) -> None:
        k = factor.shape[0]
        if factor.dim() == 1:  # a diagonal factor (many classes): no K × K eigendecomposition
            self.a = factor.clamp_min(_CLASS_FLOOR / max(k, 1)).to(self.s.dtype)[None, :]
            self.u = None
            return
        # the all-ones class direction moves no probability: unit curvature leaves it alone
        values, vectors = torch.linalg.eigh(factor.double() + 1.0 / max(k, 1))
        # floored: a class of probability ≈ 0 has ≈ 0 curvature, and an unbounded first step
        # along it (|W| in the hundreds, measured) sends the line search far from the solution
        self.a = values.clamp_min(_CLASS_FLOOR / max(k, 1)).to(self.s.dtype)[None, :]
        self.u = vectors.to(self.s.dtype)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        z = self.q.t() @ v
        if self.u is not None:
            z = z @ self.u
        z /= self.s * self.a + self.lam
        out: torch.Tensor = self.q @ (z if self.u is None else z @ self.u.t())
        return out


class Memory:
    """L-BFGS curvature pairs (s, y). (Carrying them from one C to the next, with y corrected
    exactly for the penalty change, was measured: more iterations than a fresh memory, 130 vs 99
    on the benchmark's path with the Gram preconditioner, 24 vs 23 passes with the profiled
    intercept and the Kronecker one, so every solve starts fresh.)"""

    def __init__(self, size: int = HISTORY, precondition: Precondition | None = None):
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


def lbfgs(
    fg: Objective,
    theta: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    precondition: Precondition | None = None,
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, int, float]:
    """Minimise a smooth convex function from ``theta``; returns (solution, iterations, max |gradient|),
    the gradient at the returned point: converged means it is <= ``tol``.

    ``fg(theta) -> (f, gradient)`` or ``(f, gradient, g_max)``, where ``g_max`` is the largest
    component of the gradient the tolerance is about (by default ``gradient``'s; the profiled
    objective adds the intercept's). L-BFGS two-loop recursion with a backtracking line search
    (step 1 first, then quadratic interpolation); it stops when ``g_max`` <= ``tol`` (scipy's
    pgtol), after ``max_iter`` iterations, when the line search finds no acceptable step, or
    after 20 iterations that neither lowered f beyond its rounding nor reached a new lowest
    gradient (then the gradient says how far from converged it is). A step is accepted on Armijo's rule,
    or, where f's change is within its rounding (float32 logits near a solution: f can no longer
    tell progress at a gradient above 1e-4, measured), on Hager and Zhang's approximate Wolfe
    conditions, which look at the slope instead: the solve goes on to the tolerance rather than
    stopping there. ``precondition(v)`` applies an approximate inverse Hessian (the initial H0 up
    to L-BFGS's scalar; the first step is then taken at its full length); ``after_step(theta)`` is
    called at each accepted point (to update the preconditioner there: any positive definite H0
    keeps the directions descending).
    """

    def evaluate(point: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        out = fg(point)
        return out[0], out[1], (out[2] if len(out) > 2 else float(out[1].abs().max()))

    memory = Memory(precondition=precondition)
    f, g, g_max = evaluate(theta)
    noise = 8 * torch.finfo(theta.dtype).eps  # relative rounding of f (a mean of float logits' log-softmax)
    if g_max <= tol:
        return theta, 0, g_max
    it = stuck = 0
    best = g_max
    while it < max_iter:
        it += 1
        q = memory.direction(g)
        slope = float((g * q).sum())
        if not slope < 0:  # not a descent direction (rounding): restart from steepest descent
            memory.pairs.clear()
            q, slope = g.neg(), -float((g * g).sum())
        if memory.pairs or (precondition is not None and it == 1):
            t = 1.0
        else:  # no curvature known: a first step as torch's LBFGS
            t = min(1.0, 1.0 / float(g.abs().sum()))
        for _ in range(30):
            cand = theta + t * q
            f_new, g_new, g_max_new = evaluate(cand)
            if f_new <= f + 1e-4 * t * slope:
                break
            # approximate Wolfe (Hager & Zhang 2005; δ = 0.1, σ = 0.9): f within rounding of f,
            # and the slope along q still negative but flatter, or gently positive
            slope_new = float((g_new * q).sum())
            if f_new <= f + noise * max(abs(f), 1.0) and 0.9 * slope <= slope_new <= -0.8 * slope:
                break
            # minimiser of the quadratic through f, slope and f_new, kept within [0.1 t, 0.5 t]
            t_q = -slope * t * t / (2.0 * (f_new - f - slope * t))
            t = min(max(t_q, 0.1 * t), 0.5 * t) if math.isfinite(t_q) else 0.5 * t
        else:
            break  # no acceptable step: stop where we are (the gradient there says how far off)
        memory.add(cand - theta, g_new - g)
        if after_step is not None:
            after_step(cand)
        # within f's rounding with no new lowest gradient for _STUCK iterations: float arithmetic
        # cannot get closer (a tolerance below what float32 logits resolve; measured at 1e-7)
        rounding = f - f_new <= noise * max(abs(f), 1.0)
        stuck = stuck + 1 if rounding and g_max_new >= best else 0
        best = min(best, g_max_new)
        theta, f, g, g_max = cand, f_new, g_new, g_max_new
        if g_max <= tol or stuck >= _STUCK:
            break
    return theta, it, g_max


def _tangent(w: torch.Tensor, step: float, lam: float, class_factor: torch.Tensor, precondition: KroneckerPreconditioner) -> torch.Tensor:
    """w + step · dW/d(log C) at the solution w for λ = 1/(C·n): differentiating the optimality
    condition ∇CE(W) + λW = 0 gives dW/d(log C) = λ (H + λI)⁻¹ W, with the preconditioner's
    Kronecker Hessian for H (Euler's predictor; where only one solution is known yet. On the
    benchmark path it halves the second C's iterations, 4 → 2, where the polynomial
    extrapolation of later C's does better than the tangent: 24 vs 37 passes)."""
    precondition.lam = lam
    precondition.set_class_factor(class_factor)
    return w + (step * lam) * precondition(w)


def _extrapolate(Cs: Sequence[float], i: int, solutions: list[torch.Tensor]) -> torch.Tensor:
    """The next solution predicted from the last two (linear) or three (quadratic) in log C: the
    path is smooth in log C (measured on the benchmark path: 64 iterations from the previous
    solution, 44 from the linear, then 31 → 29 from the quadratic prediction)."""
    at = math.log(Cs[i])
    t: list[float] = []
    pts: list[torch.Tensor] = []
    for c, sol in zip(reversed(Cs[:i]), reversed(solutions)):  # the newest first, at most three
        # distinct C can share a log (1e-3 and its next float): one point per log, and none at
        # the target's (the Lagrange weights would divide by zero)
        if len(t) < 3 and all(abs(math.log(c) - u) > 1e-9 for u in (at, *t)):
            t.append(math.log(c))
            pts.append(sol)
    if len(t) < 2:
        return solutions[-1].clone()
    guess = torch.zeros_like(pts[-1])
    for j, (tj, pj) in enumerate(zip(t, pts)):
        weight = math.prod((at - tm) / (tj - tm) for m, tm in enumerate(t) if m != j)  # Lagrange basis
        guess.add_(pj, alpha=weight)
    return guess


def fit_path(
    x: torch.Tensor,
    y: torch.Tensor,
    Cs: Sequence[float] | str | float,
    num_classes: int,
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LogregPath:
    """Solve the objective at every C (ascending), each solve warm-started from the previous
    one's solution (whose data pass is reused: only the penalty differs), or from the polynomial
    extrapolation of the last solutions when that is lower.

    ``x`` (n × D, float32) and ``y`` (n, int64) on one device. ``init`` = (W, b) starts the first
    solve there instead of at zero (a refit from a path solution).
    """
    Cs = check_settings(Cs, tol, max_iter)
    n, d = x.shape
    if n == 0:
        raise UsageError("logistic regression needs at least one training row")
    w = torch.zeros(d, num_classes, dtype=x.dtype, device=x.device)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    if init is not None:
        w.copy_(init[0])
        b.copy_(init[1])
    y = y.to(x.device, torch.int64)
    objective = _Objective(x, y, num_classes, tol, bias=b)
    # scikit-learn fits the labels present in the rows, and two of them as one binary model
    # (weights v, penalty ½‖v‖²); the two-column softmax with W = (−v/2, v/2) is that model with
    # penalty ¼‖v‖², so λ doubles: the same solution, objective and gradient as scikit-learn's at C
    present = int((torch.bincount(y, minlength=num_classes) > 0).sum())
    scale = 2.0 if present == 2 else 1.0
    precondition = KroneckerPreconditioner(x)
    solutions: list[torch.Tensor] = []

    def refresh(w: torch.Tensor) -> None:  # the class factor at each accepted point: its pass is a kept one (23 vs 24 passes)
        precondition.set_class_factor(objective.accept(w)[4])

    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    iters: list[int] = []
    objectives: list[float] = []
    grads: list[float] = []
    converged: list[bool] = []
    for i, C in enumerate(Cs):
        objective.lam = precondition.lam = scale / (C * n)
        start = w
        here, _, g_max = objective(w)  # w's data pass is a kept one (after the first C): no pass over x
        # predict this C's solution unless w already meets the tolerance here, or the last solve
        # did not move (an extrapolation would give w again)
        if i == 1 and g_max > tol:
            guess = _tangent(w, math.log(C / Cs[0]), scale / (Cs[0] * n), objective.data(w)[4], precondition)
        elif i >= 2 and iters[-1] > 0 and g_max > tol:
            guess = _extrapolate(Cs, i, solutions)
        else:
            guess = None
        if guess is not None and objective(guess)[0] < here:  # (the guess's pass is kept for the solve's start)
            start = guess
        precondition.lam = objective.lam
        refresh(start)
        w, n_iter, _ = lbfgs(objective, start, tol=tol, max_iter=max_iter, precondition=precondition, after_step=refresh)
        # w is the last accepted point: its pass is kept, so loss, gradient and b* are all of it
        loss, _, g_max = objective(w)
        solutions.append(w)
        weights.append(w.clone())
        biases.append(objective.data(w)[3].clone())
        iters.append(n_iter)
        objectives.append(loss * C * n)  # back to scikit-learn's scale: C·ΣCE + ½‖W‖²
        grads.append(g_max)
        converged.append(g_max <= tol)
    return LogregPath(Cs, torch.stack(weights), torch.stack(biases), iters, objectives, converged, grads, objective.passes)


def sklearn_objective(x: NDArray[np.floating], y: NDArray[np.integer], w: NDArray[np.floating], b: NDArray[np.floating], C: float) -> float:
    """scikit-learn's objective C·ΣCE + ½‖W‖² in float64 (for comparing a solution with
    scikit-learn's). Two classes are its binary model, C·Σ log(1 + e^{∓(x·v + c)}) + ½‖v‖²: ``w``
    (D × 1) is its ``coef_.T``, and a D × 2 softmax ``w`` is taken as v = w₁ − w₀, c = b₁ − b₀."""
    w, b = w.astype(np.float64), np.asarray(b, np.float64).reshape(-1)
    if w.shape[1] == 2:
        w, b = w[:, 1:] - w[:, :1], b[1:] - b[:1]
    if w.shape[1] == 1:  # binary: logits (0, x·v + c)
        w, b = np.concatenate([np.zeros_like(w), w], 1), np.concatenate([[0.0], b])
    logits = x.astype(np.float64) @ w + b
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-C * logp[np.arange(len(y)), y].sum() + 0.5 * np.square(w).sum())
