"""Is encoder A better than B? Every selected head against a reference, on the same images.

Reads per-image predictions only (:mod:`probe.predictions`). For each head: its top-1 with a
bootstrap and a Wilson 95% interval; against the reference's head of the same method, shots
and seed (same view where the reference has it, else the reference's first view: a CNN's
``pool`` is compared with a ViT's ``cls``): the difference on the images both hold, its paired
bootstrap interval and McNemar's exact test; with several seeds, the difference per seed and
its mean ± std; per class, each encoder's accuracy and the difference, largest gain first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from featstore.errors import UsageError

from . import intervals as I
from .multiple_testing import holm
from .results import markdown_cells
from .results.predictions import ConfigKey, Predictions, align


@dataclass
class Row:
    """One selected head; the delta fields compare it with the reference (None for the reference itself)."""

    label: str
    view: str
    method: str
    shots: str
    seed: int
    n: int
    top1: float
    ci95: tuple[float, float]  # percentile bootstrap over the head's images
    wilson95: tuple[float, float]
    is_reference: bool = False
    reference_view: str | None = None
    n_paired: int | None = None  # images both hold (the delta's images)
    delta: float | None = None
    delta_ci95: tuple[float, float] | None = None
    n01: int | None = None
    n10: int | None = None
    mcnemar_p: float | None = None
    mcnemar_p_holm: float | None = None  # adjusted together with every other row's test (Holm)

    @property
    def key(self) -> ConfigKey:
        return ConfigKey(self.label, self.view, self.method, self.shots, self.seed)


@dataclass
class SeedSummary:
    """A store × view × method × shots over its seeds."""

    label: str
    view: str
    method: str
    shots: str
    seeds: list[int]
    top1_mean: float
    top1_std: float
    delta_per_seed: list[float | None]
    delta_mean: float | None
    delta_std: float | None
    # paired bootstrap over images of the seed-mean difference (seeds scored on the same images)
    delta_mean_ci95: tuple[float, float] | None = None
    # exact sign-flip test of the seed-averaged per-image difference (McNemar's for one seed); same images only
    p_sign: float | None = None


@dataclass
class ClassReport:
    """Per-class accuracy of one head and of the reference on the same images, largest gain first."""

    label: str
    view: str
    method: str
    shots: str
    seed: int
    reference_view: str | None
    classes: list[I.ClassDifference]


@dataclass
class Comparison:
    """What :func:`probe.compare` returns: every head against the reference store's, on the same images.

    Attributes
    ----------
    reference : str
        The reference store's label.
    rows : list of Row
        One per head: top-1 with its bootstrap and Wilson 95% intervals and, for all but the
        reference, the paired difference (``delta``, ``delta_ci95``, ``n_paired``) and McNemar's
        exact test (``n01``, ``n10``, ``mcnemar_p``).
    seeds : list of SeedSummary
        Per store × view × method × shots with several seeds: mean ± std and the per-seed deltas.
    per_class : list of ClassReport
        Per head, each class's accuracy and its difference to the reference, largest gain first.
    class_names : list of str or None
    n_resamples, bootstrap_seed : int
        The bootstrap's settings.
    """

    reference: str
    rows: list[Row]
    seeds: list[SeedSummary] = field(default_factory=list)
    per_class: list[ClassReport] = field(default_factory=list)
    class_names: list[str] | None = None
    n_resamples: int = I.N_RESAMPLES
    bootstrap_seed: int = I.BOOTSTRAP_SEED

    def class_name(self, target: int) -> str:
        names = self.class_names or []
        return names[target] if 0 <= target < len(names) else str(target)

    def to_json(self) -> dict:
        """The ``probe compare --json`` document (see docs/probe.md, "Comparing encoders")."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["ci95"], d["wilson95"] = list(r.ci95), list(r.wilson95)
            d["delta_ci95"] = list(r.delta_ci95) if r.delta_ci95 is not None else None
            rows.append(d)
        per_class: dict[str, list] = {}
        for c in self.per_class:
            per_class.setdefault(c.label, []).append(
                {
                    "view": c.view,
                    "method": c.method,
                    "shots": c.shots,
                    "seed": c.seed,
                    "reference_view": c.reference_view,
                    "classes": [
                        {
                            "class": d.target,
                            "name": self.class_name(d.target),
                            "n": d.n,
                            "top1": d.top1,
                            "top1_reference": d.top1_reference,
                            "delta": d.delta,
                        }
                        for d in c.classes
                    ],
                }
            )
        return _no_nan(
            {
                "reference": self.reference,
                "interval": f"95% percentile bootstrap over images, {self.n_resamples} resamples, seed {self.bootstrap_seed}; wilson95: Wilson score",
                "rows": rows,
                "seeds": [asdict(s) for s in self.seeds],
                "per_class": per_class,
            }
        )


def _no_nan(value):
    """NaN (an interval of fewer than 2 images) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def _reference_for(p: Predictions, candidates: list[Predictions]) -> Predictions | None:
    same = [q for q in candidates if (q.method, q.shots, q.seed) == (p.method, p.shots, p.seed)]
    return next((q for q in same if q.view == p.view), same[0] if same else None)


def compare(
    predictions: list[Predictions],
    reference: str | None = None,
    *,
    class_names: list[str] | None = None,
    n_resamples: int = I.N_RESAMPLES,
    bootstrap_seed: int = I.BOOTSTRAP_SEED,
) -> Comparison:
    """Compare every head in ``predictions`` with the reference label's (default: the first label)."""
    if not predictions:
        raise UsageError("no predictions to compare", "run probe fit (it writes predictions.csv) first")
    labels = list(dict.fromkeys(p.label for p in predictions))
    reference = labels[0] if reference is None else reference
    if reference not in labels:
        raise UsageError(f"no store labelled {reference!r} in these results", f"--reference is one of: {', '.join(labels)}")
    keys = [p.key for p in predictions]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise UsageError(
            f"two prediction sets for label {dup[0]!r} view {dup[1]!r} method {dup[2]!r} shots {dup[3]!r} seed {dup[4]}",
            "give each store its own label",
        )
    refs = [p for p in predictions if p.label == reference]
    stats = dict(n_resamples=n_resamples, seed=bootstrap_seed)

    rows, per_class, paired, aligned = [], [], {}, {}
    for p in predictions:
        correct = p.correct
        ci_low, ci_high = (float(v) for v in I.bootstrap_interval(correct, **stats))
        row = Row(
            p.label,
            p.view,
            p.method,
            p.shots,
            p.seed,
            len(correct),
            float(correct.mean() * 100.0) if len(correct) else math.nan,
            (ci_low, ci_high),
            I.wilson_interval(int(correct.sum()), len(correct)),
            is_reference=p.label == reference,
        )
        q = None if row.is_reference else _reference_for(p, refs)
        pairs = align(p, q) if q is not None else None
        if q is not None and pairs is not None and len(pairs[0]) == 0:  # no image in common: no Δ, no test (nor a p of 1 in Holm's family)
            row.reference_view, row.n_paired = q.view, 0
            q = None
        if q is not None and pairs is not None:
            ia, ib = pairs
            diff = I.paired_difference(correct[ia], q.correct[ib], **stats)
            row.reference_view, row.n_paired = q.view, diff.n
            row.delta, row.delta_ci95 = diff.delta, diff.ci95
            row.n01, row.n10, row.mcnemar_p = diff.test.n01, diff.test.n10, diff.test.p
            paired[p.key] = diff.delta
            aligned[p.key] = (p.paths[ia], correct[ia].astype(np.int8) - q.correct[ib].astype(np.int8))
            classes = I.per_class_difference(p.target[ia], correct[ia], q.correct[ib])
        else:
            classes = [I.ClassDifference(k, n, acc, None, None) for k, (n, acc) in I.per_class_accuracy(p.target, correct).items()]
        per_class.append(ClassReport(p.label, p.view, p.method, p.shots, p.seed, q.view if q else None, classes))
        rows.append(row)

    for r, adjusted in zip(rows, holm([r.mcnemar_p for r in rows])):
        r.mcnemar_p_holm = adjusted
    seeds = []
    by_config: dict[tuple, list[Row]] = {}
    for r in rows:
        by_config.setdefault(r.key[:4], []).append(r)  # every seed of a configuration
    for (label, view, method, shots), rs in by_config.items():
        if len(rs) < 2:
            continue
        deltas = [paired.get(r.key) for r in rs]
        known = [d for d in deltas if d is not None]
        top_mean, top_std = I.mean_std([r.top1 for r in rs])
        d_mean, d_std = I.mean_std(known) if known else (None, None)
        diffs = [d for d in (aligned.get(r.key) for r in rs) if d is not None]
        ci = p_sign = None
        if len(diffs) == len(rs) and all(np.array_equal(d[0], diffs[0][0]) for d in diffs):
            ci = I.seed_mean_interval([d[1] for d in diffs], **stats)
            p_sign = I.seed_mean_sign_test([d[1] for d in diffs])
        seeds.append(SeedSummary(label, view, method, shots, [r.seed for r in rs], top_mean, top_std, deltas, d_mean, d_std, ci, p_sign))
    return Comparison(reference, rows, seeds, per_class, class_names, n_resamples, bootstrap_seed)


# ---------------------------------------------------------------- reading


def fmt_interval(value: float, ci, digits: int = 1, signed: bool = False) -> str:
    """``83.4 [82.6, 84.1]`` (``+0.4 [-0.3, +1.1]`` when signed); ``—`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if ci is None or any(v is None or math.isnan(v) for v in ci):
        return f.format(value)
    return f"{f.format(value)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def markdown(comparison: Comparison, max_classes: int = 10) -> str:
    """The comparison as markdown: one table of heads, the seed summaries, and per-class gains/losses."""
    rows = comparison.rows
    multi_seed = len({r.seed for r in rows}) > 1
    tests = sum(r.mcnemar_p is not None for r in rows)
    head = (
        ["label", "view", "method", "shots"]
        + (["seed"] if multi_seed else [])
        + ["n", "top-1 [95% CI]", f"Δ vs {comparison.reference} [95% CI]", "n01 / n10", "McNemar p"]
        + (["Holm p"] if tests > 1 else [])
    )
    lines = [markdown_cells.row(head), "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = (
            [r.label, r.view, r.method, r.shots or "all"] + ([str(r.seed)] if multi_seed else []) + [str(r.n), fmt_interval(r.top1, r.ci95)]
        )
        if r.is_reference:
            cells += ["reference", "—", "—"]
        elif r.delta is None and r.n_paired == 0:
            cells += [f"— (no image in common with {comparison.reference})", "—", "—"]
        elif r.delta is None:
            cells += [f"— (no {comparison.reference} head of this method/shots/seed)", "—", "—"]
        else:
            vs = f" vs {r.reference_view}" if r.reference_view != r.view else ""
            paired = f" on {r.n_paired}" if r.n_paired != r.n else ""
            cells += [fmt_interval(r.delta, r.delta_ci95, signed=True) + vs + paired, f"{r.n01} / {r.n10}", fmt_p(r.mcnemar_p)]
        cells += [fmt_p(r.mcnemar_p_holm)] if tests > 1 else []
        lines.append(markdown_cells.row(cells))
    out = "\n".join(lines) + "\n"
    out += (
        f"\ntop-1 in percent, 95% percentile bootstrap over images ({comparison.n_resamples} resamples, seed {comparison.bootstrap_seed}); "
        "Δ = store − reference on the same images, paired bootstrap; n01 = images only the store gets right, n10 = only the reference; "
        "McNemar exact two-sided p"
        + (f"; Holm p: the {tests} McNemar p-values adjusted together (family-wise error)" if tests > 1 else "")
        + ".\n"
    )
    if comparison.seeds:
        out += "\n| label | view | method | shots | seeds | top-1 mean ± std | Δ per seed | Δ mean ± std | Δ mean [95% CI] | sign-flip p |\n|---|---|---|---|---|---|---|---|---|---|\n"
        for s in comparison.seeds:
            per = ", ".join("—" if d is None else f"{d:+.1f}" for d in s.delta_per_seed)
            dm = "—" if s.delta_mean is None else f"{s.delta_mean:+.2f} ± {s.delta_std:.2f}"
            dci = (
                fmt_interval(s.delta_mean, s.delta_mean_ci95, digits=2, signed=True)
                if s.delta_mean_ci95 and s.delta_mean is not None
                else "—"
            )
            sp = "—" if s.delta_mean is None else fmt_p(s.p_sign)
            out += (
                markdown_cells.row(
                    [s.label, s.view, s.method, s.shots or "all", len(s.seeds), f"{s.top1_mean:.2f} ± {s.top1_std:.2f}", per, dm, dci, sp]
                )
                + "\n"
            )
        out += (
            "\nΔ mean [95% CI]: paired bootstrap over the images of the seed-averaged per-image difference; sign-flip p: exact "
            "two-sided test of that difference, each image's seeds flipped together (McNemar's test for one seed).\n"
        )
    for c in comparison.per_class:
        if c.reference_view is None:
            continue
        shown = c.classes if len(c.classes) <= 2 * max_classes else c.classes[:max_classes] + c.classes[-max_classes:]
        # several per-class tables of one store differ only in method, shots or seed: the title names them
        probe_of = f"{c.method}" + (f", {c.shots}-shot" if c.shots else "") + (f", seed {c.seed}" if multi_seed else "")
        title = f"\nper class, {probe_of}: {c.label} [{c.view}] vs {comparison.reference} [{c.reference_view}]"
        title += (
            f" ({max_classes} largest gains and losses of {len(c.classes)}; --json for all)" if len(shown) < len(c.classes) else ""
        ) + ":\n"
        out += title + "\n| class | n | top-1 | reference top-1 | Δ |\n|---|---|---|---|---|\n"
        for d in shown:
            out += (
                markdown_cells.row([comparison.class_name(d.target), d.n, f"{d.top1:.1f}", f"{d.top1_reference:.1f}", f"{d.delta:+.1f}"])
                + "\n"
            )
    return out
