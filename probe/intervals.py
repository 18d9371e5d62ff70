"""Uncertainty of accuracies and of differences between encoders, from per-image correctness.

Pure functions on numpy vectors (``correct``: one bool per image). Percent in, percent out is
avoided: inputs are 0/1 per image, outputs are percentages (the unit every table uses).

- :func:`bootstrap_interval`: percentile bootstrap over images (``scipy.stats.bootstrap``).
- :func:`wilson_interval`: Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``).
- :func:`paired_difference`: the difference of two encoders on the same images, with a paired
  bootstrap interval (each resample draws images, both encoders are scored on the same draw).
- :func:`mcnemar`: McNemar's exact test on the discordant images (two-sided binomial p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000  # percentile endpoints of a 95% interval are stable to ~0.1 pt at n≈4k with 2k resamples
BOOTSTRAP_SEED = 0
_BATCH_ELEMENTS = 1 << 22  # resampled elements per batch: bounds memory whatever the split size


def _as_matrix(correct) -> np.ndarray:
    a = np.asarray(correct)
    if a.ndim not in (1, 2):
        raise ValueError(f"correct must be 1-D (images) or 2-D (heads × images), got shape {a.shape}")
    return a


def _mean(sample: np.ndarray, axis: int) -> np.ndarray:
    # integer sum then one division: exact, and several times faster than a float64 mean of int8
    return sample.sum(axis=axis, dtype=np.int32) / sample.shape[axis]


def bootstrap_interval(
    values, *, per: int = 1, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE
) -> np.ndarray:
    """Percentile bootstrap interval of the mean of ``values / per`` over images, in percent.

    ``values``: (N,) per-image integer scores (1/0 correct, -1/0/1 paired differences, or with
    ``per`` = S the number of S seeds that got the image right), or (H, N) for H heads scored on
    the same N images; every row is resampled with the same image draws. Returns (2,) or
    (H, 2) [low, high]; NaN when N < 2. Resamples are drawn as
    ``numpy.random.default_rng(seed).integers(0, N, (n_resamples, N))``, in batches.
    """
    from scipy.stats import bootstrap

    x = _as_matrix(values)
    if x.dtype.kind not in "biu" or (x.size and (x.min() < -per or x.max() > per)) or not 1 <= per <= 127:
        raise ValueError("values must be per-image integers in [-per, per] (0/1 correct, -1/0/1 paired differences, counts over seeds)")
    x = x.astype(np.int8)  # one byte per gathered element: the resampling is memory-bound
    n = x.shape[-1]
    if n < 2:
        return np.full(x.shape[:-1] + (2,), np.nan)
    if np.all(x == x[..., :1]):
        # a constant sample: every resample has the same mean (scipy would warn about degeneracy)
        const = x[..., 0].astype(np.float64) * 100.0 / per
        return np.stack([const, const], axis=-1)
    rows = int(np.prod(x.shape[:-1], dtype=np.int64)) or 1
    batch = max(1, _BATCH_ELEMENTS // (n * rows))
    res = bootstrap(
        (x,),
        _mean,
        n_resamples=n_resamples,
        batch=batch,
        vectorized=True,
        axis=-1,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return np.stack([np.asarray(ci.low), np.asarray(ci.high)], axis=-1) * 100.0 / per


def wilson_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of ``correct`` successes in ``total`` trials, in percent (NaN when total is 0)."""
    from scipy.stats import binomtest

    if total <= 0:
        return (math.nan, math.nan)
    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low) * 100.0, float(ci.high) * 100.0)


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs of a store against the reference on the same images, and the exact test."""

    n01: int  # images the reference gets wrong and the store gets right (the store's gains)
    n10: int  # images the reference gets right and the store gets wrong (the store's losses)
    p: float  # two-sided exact binomial p of n01 among n01 + n10 under 1/2; 1.0 with no discordant image


def mcnemar(correct, correct_reference) -> McNemar:
    """McNemar's exact test of ``correct`` (a store) against ``correct_reference`` on the same images."""
    from scipy.stats import binomtest

    a, r = np.asarray(correct, bool), np.asarray(correct_reference, bool)
    if a.shape != r.shape or a.ndim != 1:
        raise ValueError(f"paired vectors must be 1-D of one length, got {a.shape} and {r.shape}")
    n01 = int(np.count_nonzero(a & ~r))
    n10 = int(np.count_nonzero(~a & r))
    p = 1.0 if n01 + n10 == 0 else float(binomtest(n01, n01 + n10, 0.5).pvalue)
    return McNemar(n01, n10, p)


@dataclass(frozen=True)
class Difference:
    """Accuracy of a store minus the reference's on the same images, in percentage points."""

    n: int
    top1: float
    top1_reference: float
    delta: float
    ci95: tuple[float, float]  # paired percentile bootstrap
    test: McNemar


def paired_difference(
    correct, correct_reference, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE
) -> Difference:
    """The difference (store − reference) with its paired bootstrap interval and McNemar's test.

    Bootstrapping the per-image difference (−1, 0 or 1) draws each image once for both
    encoders: the interval accounts for their correlation, which an unpaired one ignores.
    """
    a, r = np.asarray(correct, bool), np.asarray(correct_reference, bool)
    test = mcnemar(a, r)
    n = len(a)
    if n == 0:
        return Difference(0, math.nan, math.nan, math.nan, (math.nan, math.nan), test)
    d = a.astype(np.int8) - r.astype(np.int8)
    low, high = bootstrap_interval(d, n_resamples=n_resamples, seed=seed, confidence=confidence)
    top1, ref = a.mean() * 100.0, r.mean() * 100.0
    return Difference(n, float(top1), float(ref), float(d.mean() * 100.0), (float(low), float(high)), test)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of per-seed numbers."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan)
    return (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)


@dataclass(frozen=True)
class ClassDifference:
    """One class: its images, each encoder's accuracy on them, and the difference (points)."""

    target: int
    n: int
    top1: float
    top1_reference: float | None  # None for the reference's own classes (nothing to compare with)
    delta: float | None


def per_class_accuracy(target, correct) -> dict[int, tuple[int, float]]:
    """{class: (images, top-1 %)} for every class present in ``target``, in class order."""
    t, c = np.asarray(target), np.asarray(correct, bool)
    classes, inverse, counts = np.unique(t, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse, weights=c, minlength=len(classes))
    return {int(k): (int(n), float(h * 100.0 / n)) for k, n, h in zip(classes, counts, hits)}


def per_class_difference(target, correct, correct_reference) -> list[ClassDifference]:
    """Per-class accuracy of a store and of the reference on the same images, largest gain first
    (ties: class index)."""
    ours = per_class_accuracy(target, correct)
    ref = per_class_accuracy(target, correct_reference)
    out = [(k, n, acc, ref[k][1], acc - ref[k][1]) for k, (n, acc) in ours.items()]
    return [ClassDifference(*d) for d in sorted(out, key=lambda d: (-d[4], d[0]))]


def seed_mean_interval(
    scores_by_seed, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Bootstrap interval of a per-image score averaged over S seeds scored on the same N images
    (``scores_by_seed``: (S, N) of 0/1 correct, giving the seed-mean accuracy, or of -1/0/1 paired
    differences, giving the seed-mean difference): the images are resampled, each image counting
    the sum of its S scores (the spread between seeds is reported beside it as their std)."""
    s = np.asarray(scores_by_seed)
    low, high = bootstrap_interval(s.sum(axis=0, dtype=np.int16), per=s.shape[0], n_resamples=n_resamples, seed=seed, confidence=confidence)
    return (float(low), float(high))


def seed_mean_sign_test(differences_by_seed) -> float:
    """Exact two-sided sign-flip (randomization) test of a seed-averaged paired difference.

    ``differences_by_seed``: (S, N) per-image differences (-1/0/1: store right and reference
    wrong = 1) of S seeds on the same N images. Under the null hypothesis the two encoders are
    exchangeable on every image, so each image's summed difference k_i (−S…S) is as likely
    +|k_i| as −|k_i|, all seeds' signs flipping together. The statistic T = Σ k_i is then a sum
    of independent ±|k_i|; its exact distribution is the convolution, over each size m = 1…S,
    of m·(2·Binomial(c_m, ½) − c_m) where c_m counts the images with |k_i| = m. Returns
    P(|T| ≥ |t|) under it. With one seed it is McNemar's exact test (a binomial test of n01
    among n01 + n10), which the tests check.
    """
    from scipy.stats import binom

    d = np.asarray(differences_by_seed)
    if d.ndim == 1:
        d = d[None]
    k = np.abs(d.sum(axis=0, dtype=np.int64))
    t = int(d.sum(dtype=np.int64))
    seeds = d.shape[0]
    # the pmf of T on the integers -M…M, M = Σ|k_i|, index = value + M
    total = int(k.sum())
    if total == 0:
        return 1.0
    pmf = np.ones(1)  # the empty sum: 0 with probability 1
    for m in range(1, seeds + 1):
        c = int(np.count_nonzero(k == m))
        if c == 0:
            continue
        part = np.zeros(2 * m * c + 1)
        part[:: 2 * m] = binom.pmf(np.arange(c + 1), c, 0.5)  # m·(2j − c) for j = 0…c, shifted by m·c
        pmf = np.convolve(pmf, part)
    values = np.arange(len(pmf)) - total
    tail = pmf[np.abs(values) >= abs(t) - 1e-9].sum()
    return float(min(1.0, tail))
