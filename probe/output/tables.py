"""The markdown tables ``probe fit`` prints and the per-seed summary behind summary.csv: selected
configurations with their intervals and, for 2+ stores, the paired difference to the first store."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..comparison import Comparison, compare, fmt_interval, fmt_p
from ..intervals import N_RESAMPLES, seed_mean_interval
from ..protocol import Protocol
from ..results import markdown_cells
from ..results.predictions import ConfigKey
from ..results.predictions import of_rows as predictions_of
from ..results.rows import by_probe, chosen_on_report, chosen_on_selection, is_battery, selection_words, sweep_rows
from ..results.summary import mean_std, selected_by_entry, summarize


def _pct(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _reported(row: dict, metric: str):
    return row.get(f"report_{metric}_pct")


def summary(rows: list[dict]) -> list[dict]:
    """Per store × view × method × shots over seeds (:mod:`probe.summary`), reported-split
    accuracies, with the 95% bootstrap interval of the (seed-mean) top-1 over the images. A single
    seed's interval is its selected row's ``ci95_*`` (probe.fit's, the same bootstrap): only the
    pooled intervals of several seeds are computed here."""
    groups = selected_by_entry(rows)  # once: each entry's rows are looked up, not searched for
    entries = summarize(rows, _reported, groups)
    for e in entries:
        key = (e["store"], e["view"], e["method"], e["shots"])
        chosen = [r for r in groups[key] if r.get("report_predictions") is not None]
        preds = [r["report_predictions"] for r in chosen]
        e["ci95_low"] = e["ci95_high"] = None
        if len(chosen) == 1 == e["n_seeds"]:
            e["ci95_low"], e["ci95_high"] = chosen[0].get("ci95_low"), chosen[0].get("ci95_high")
        # seeds pool only when they scored the same images (a per-seed holdout does not)
        elif preds and len(preds) == e["n_seeds"] and all(np.array_equal(p["paths"], preds[0]["paths"]) for p in preds):
            low, high = seed_mean_interval([p["pred"] == p["target"] for p in preds])
            e["ci95_low"], e["ci95_high"] = (round(low, 4), round(high, 4)) if np.isfinite([low, high]).all() else (None, None)
    return entries


@dataclass(frozen=True)
class Digest:
    """What summary.csv and the tables add to a run's rows, computed once per run (every part is a
    bootstrap over the images of each selected configuration)."""

    summary: list[dict]  # :func:`summary`
    versus: Comparison | None  # every selected head against the first store's; None with a single store


def digest_of(rows: list[dict], comparison: Comparison | None = None) -> Digest:
    """The :class:`Digest` of probe.fit's ``rows``; ``comparison``: ``compare(of_rows(rows))``
    when the caller holds it already (probe.fit does)."""
    if comparison is None:
        preds = predictions_of(rows)
        comparison = compare(preds) if len({p.label for p in preds}) > 1 else None
    versus = comparison if comparison is not None and len({r.label for r in comparison.rows}) > 1 else None
    return Digest(summary(rows), versus)


def _shots_words(shots) -> str:
    return "all" if shots is None else f"{shots}"


def battery_table(rows: list[dict], protocol: Protocol | None = None, digest: Digest | None = None) -> str:
    """Per store × view × method × shots: the selected configuration(s) and the reported
    accuracy as mean ± std (n seeds); a single seed shows the number alone. ``digest``: the
    rows' :func:`digest_of`, computed here when not given."""
    digest = digest or digest_of(rows)
    entries = digest.summary
    multi_view = len({(e["store"], e["view"]) for e in entries}) > len({e["store"] for e in entries})
    has_top5 = any(e["report_top5_mean"] is not None for e in entries)
    labels = {r["store"]: r["label"] for r in rows}
    encoders = {r["store"]: r["encoder"] for r in rows}
    head = ["label", "encoder"] + (["view"] if multi_view else []) + ["method", "shots", "selected", "reported top-1"]
    head += (["reported top-5"] if has_top5 else []) + ["reported on"]
    versus = digest.versus
    head += [f"Δ vs {versus.reference} [95% CI]", "McNemar p"] if versus else []
    lines = [markdown_cells.row(head), "|" + "|".join("---" for _ in head) + "|"]
    reported_as = {(r["store"], r["view"]): r["reported_as"] for r in rows}
    for e in entries:
        cells = [labels[e["store"]], encoders[e["store"]] or "—"] + ([e["view"]] if multi_view else [])
        cells += [e["method"], _shots_words(e["shots"]), e["selected"], mean_std(e, "top1")]
        cells += [mean_std(e, "top5")] if has_top5 else []
        cells += [reported_as[(e["store"], e["view"])]]
        if versus:
            cells += _versus_entry_cells(versus, labels[e["store"]], e)
        lines.append(markdown_cells.row(cells))
    r0 = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    notes = (
        f"protocol {r0['protocol_hash']}: methods {', '.join(dict.fromkeys(r['method'] for r in rows))}; seeds {', '.join(map(str, seeds))}"
    )
    notes += "; mean ± sample std (n seeds) of the selected configuration's reported accuracy" if len(seeds) > 1 else ""
    if any(chosen_on_report(r) for r in rows):
        notes += (
            "; lr, k and C chosen on the reported split itself (--select-on report): every reported number is the max over it, optimistic"
        )
    else:
        notes += "; lr, k and C chosen on the selection split, never on the reported split"
    if any(r.get("refit") for r in rows):
        notes += "; (refit): the selected lr, k or C fit again on train + selection rows (the holdout; logreg: val too), then reported once"
    return "\n".join(lines) + "\n\n" + notes + "\n"


def markdown_table(rows: list[dict], protocol: Protocol | None = None, digest: Digest | None = None) -> str:
    """Per store × view: the fixed-LR result (one head) or the selected LR, its selection and
    reported top-1, what the reported number is (``reported_as``), and the best-of-sweep head on
    the reported split, labelled as such. A battery run (methods, seeds, shots) gets
    :func:`battery_table` instead. ``digest``: the rows' :func:`digest_of`, computed here when not given."""
    if is_battery(rows):
        return battery_table(rows, protocol, digest)
    groups = by_probe(rows)
    multi_view = len({k[1] for k in groups}) > 1
    one_head = all(len(sweep_rows(rs)) == 1 for rs in groups.values())
    multi_wd = any(len({r["wd"] for r in rs}) > 1 for rs in groups.values())
    on_report = all(chosen_on_report(r) for r in rows)
    has_top5 = any(r["report_top5_pct"] is not None or r["select_top5_pct"] is not None for r in rows)
    show_wd = multi_wd or (one_head and rows[0]["wd"])
    head = ["label", "encoder"] + (["view"] if multi_view else [])
    head += ["lr (fixed)"] if one_head else ["selected lr"]
    head += ["wd"] if show_wd else []
    # a fixed LR selects nothing: no selection column (its split's accuracy stays in results.csv)
    head += (
        ([] if one_head else ["selection top-1 (split)"]) + ["reported top-1"] + (["reported top-5"] if has_top5 else []) + ["reported on"]
    )
    best_column = not one_head and not on_report
    head += ["best-of-sweep on the reported split: top-1 (lr)"] if best_column else []
    versus = (digest or digest_of(rows)).versus
    if versus:
        head += [f"Δ vs {versus.reference} [95% CI]", "McNemar p"]
    lines = [markdown_cells.row(head), "|" + "|".join("---" for _ in head) + "|"]
    for rs in groups.values():
        sel = next(r for r in rs if r["selected"])
        chosen = chosen_on_selection(rs, sel)  # sel itself, or the sweep's head that sel refits
        cells = [sel["label"], sel["encoder"] or "—"] + ([sel["view"]] if multi_view else [])
        cells += [f"{sel['lr']:g}" + (" (refit)" if sel.get("refit") else "")]
        cells += [f"{sel['wd']:g}"] if show_wd else []
        reported = (
            fmt_interval(sel["report_top1_pct"], (sel.get("ci95_low"), sel.get("ci95_high")), digits=2)
            if sel["report_top1_pct"] is not None
            else "—"
        )
        cells += ([] if one_head else [f"{_pct(chosen['select_top1_pct'])} ({selection_words(sel, protocol)})"]) + [reported]
        cells += [_pct(sel["report_top5_pct"])] if has_top5 else []
        cells += [sel["reported_as"]]
        if best_column:
            best = next((r for r in rs if r["best_report"]), None)
            cells += [f"{_pct(best['report_top1_pct'])} ({best['lr']:g})" if best else "— (nothing reported)"]
        if versus:
            cells += _versus_cells(versus, ConfigKey.of_row(sel))
        lines.append(markdown_cells.row(cells))
    r0 = rows[0]
    how = f"fixed lr {r0['lr']:g}, nothing selected" if one_head else f"select on {r0['select_on']}"
    notes = f"protocol {r0['protocol_hash']}: {r0['optimizer']}, {r0['epochs']} epochs, batch {r0['batch_size']}, normalize {r0['normalize']}, seed {r0['seed']}, {how}"
    trained_on = sorted({str(r["augment"]) for r in rows if r.get("augment")})
    if trained_on:
        notes += f"; linear heads trained on augmented views {', '.join(trained_on)} (one per train row per epoch), selected and reported on center crops"
    if any(r.get("ci95_low") is not None for r in rows):
        notes += f"; [95% CI]: percentile bootstrap over the reported images ({N_RESAMPLES} resamples)"
    if versus:
        notes += f"; Δ: top-1 minus {versus.reference}'s on the same images, paired bootstrap interval, McNemar exact test (probe compare for per-class detail)"
    if any(r.get("refit") for r in rows):
        notes += (  # a fixed lr selects nothing: its one head is what is trained again
            "; (refit): the fixed lr's one head trained again on every train row (train + holdout, same protocol), then reported once"
            if one_head
            else "; (refit): the selected head trained again on train + holdout (same protocol), then reported once"
        )
    if on_report and not one_head:
        notes += "; the LR was chosen on the reported split itself (--select-on report): every reported number is the max over the reported split, optimistic"
    elif not one_head:
        notes += "; selected = highest selection-split top-1 (ties → smaller lr), never looking at the reported split; best-of-sweep is picked on the reported split, for comparison with papers only"
    return "\n".join(lines) + "\n\n" + notes + "\n"


def _versus_entry_cells(versus, label: str, entry: dict) -> list[str]:
    """A summary entry's Δ: the single seed's, or the mean ± std of the per-seed Δ over seeds."""
    key = ConfigKey.make(label, entry["view"], entry["method"], entry["shots"], entry["seeds"] if entry["n_seeds"] == 1 else 0)
    if entry["n_seeds"] == 1:
        return _versus_cells(versus, key)
    s = next((s for s in versus.seeds if (s.label, s.view, s.method, s.shots) == key[:4]), None)  # every seed of the key
    if s is None or label == versus.reference:
        return ["reference" if label == versus.reference else "—", "—"]
    if s.delta_mean is None:
        return ["—", "—"]
    return [
        f"{fmt_interval(s.delta_mean, s.delta_mean_ci95, digits=2, signed=True)} (± {s.delta_std:.2f} over {len(s.seeds)} seeds)",
        "per seed: probe compare",
    ]


def _versus_cells(versus, key: ConfigKey) -> list[str]:
    row = next((c for c in versus.rows if c.key == key), None)
    if row is None:
        return ["—", "—"]
    if row.is_reference:
        return ["reference", "—"]
    if row.delta is None:
        return ["—", "—"]
    vs = f" (vs {row.reference_view})" if row.reference_view != row.view else ""
    return [fmt_interval(row.delta, row.delta_ci95, digits=2, signed=True) + vs, fmt_p(row.mcnemar_p)]
