"""Across seeds: per store × view × method × shots, the selected configuration's reported
accuracy as mean ± standard deviation (n seeds), and which settings were selected.

The standard deviation is the sample one (ddof = 1, numpy), the spread papers report for
few-shot evaluations over seeds; with a single seed it is left empty.
"""

from __future__ import annotations

import numpy as np

from .. import methods
from .table_csv import csv_text

SUMMARY_COLUMNS = [
    "label", "store", "view", "method", "shots", "n_seeds", "seeds", "report_split",
    "report_top1_mean", "report_top1_std", "ci95_low", "ci95_high", "report_top5_mean", "report_top5_std", "selected", "protocol_hash",
]  # fmt: skip


def setting(row: dict) -> str:
    """The selected configuration of a row in a few characters (its method's
    :meth:`~probe.methods.method.Method.setting`): ``lr 0.01``, ``k 20``, ``C 0.1 (refit)``."""
    return methods.of_row(row).setting(row)


def selected_by_entry(rows: list[dict]) -> dict[tuple, list[dict]]:
    """The selected rows (in row order) of each store × view × method × shots, first-seen order:
    the rows behind one summary entry (its key: the entry's store, view, method, shots)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("selected"):
            key = (r["store"], r["view"], r.get("method") or methods.UNNAMED, r.get("shots"))
            groups.setdefault(key, []).append(r)
    return groups


def summarize(rows: list[dict], reported, groups: dict[tuple, list[dict]] | None = None) -> list[dict]:
    """One summary per store × view × method × shots (first-seen order) over the selected rows.

    ``reported(row, "top1"|"top5")`` gives a selected row's accuracy on the reported split
    (None when absent), so this module needs no knowledge of the CSV's split columns.
    ``groups``: the rows' :func:`selected_by_entry` when the caller holds it.
    """
    groups = selected_by_entry(rows) if groups is None else groups
    out = []
    for (store, view, method, shots), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        entry = {
            "label": rs[0].get("label"),  # --store LABEL=…: what tables and papers call the store
            "store": store,
            "view": view,
            "method": method,
            "shots": shots,
            "n_seeds": len(rs),
            "seeds": " ".join(str(r["seed"]) for r in rs),
            "report_split": rs[0].get("report_split"),
            "protocol_hash": rs[0].get("protocol_hash"),
        }
        for metric in ("top1", "top5"):
            found = [reported(r, metric) for r in rs]
            values = np.array([v for v in found if v is not None], dtype=float)
            entry[f"report_{metric}_mean"] = round(float(values.mean()), 4) if len(values) else None
            entry[f"report_{metric}_std"] = round(float(values.std(ddof=1)), 4) if len(values) > 1 else None
        picks: dict[str, int] = {}
        for r in rs:
            picks[setting(r)] = picks.get(setting(r), 0) + 1
        entry["selected"] = "; ".join(s if n == 1 and len(rs) == 1 else f"{s} ×{n}" for s, n in picks.items())
        out.append(entry)
    return out


def summary_csv(summary: list[dict]) -> str:
    return csv_text(SUMMARY_COLUMNS, summary)


def mean_std(entry: dict, metric: str = "top1") -> str:
    """``93.41 ± 0.12 (5)``, or ``93.41`` for a single seed, or ``—``; top-1 with its 95% interval
    when the entry has one (``93.41 [92.60, 94.10]``)."""
    mean = entry.get(f"report_{metric}_mean")
    if mean is None:
        return "—"
    ci = f" [{entry['ci95_low']:.2f}, {entry['ci95_high']:.2f}]" if metric == "top1" and entry.get("ci95_low") is not None else ""
    if entry["n_seeds"] == 1:
        return f"{mean:.2f}{ci}"
    return f"{mean:.2f} ± {entry[f'report_{metric}_std']:.2f} ({entry['n_seeds']}){ci}"
