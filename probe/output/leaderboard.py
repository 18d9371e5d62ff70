"""``probe report``: results folders of several runs gathered into one leaderboard.

Results are ranked together only when they share the protocol hash, the dataset (manifest
sha256) and the report split; otherwise they are refused, naming the field that differs, or with
``allow_mixed`` put in separate, labelled groups (never ranked against each other).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from featstore.errors import UsageError

from .. import intervals as I
from ..comparison import Comparison, compare, fmt_interval, fmt_p
from ..results import table_csv
from ..results.predictions import ConfigKey, Predictions
from ..results.runs import Run, load, reported_n, reported_top1, row_label
from ..results.summary import setting

LEADERBOARD_MD, LEADERBOARD_CSV, REPORT_HTML = "leaderboard.md", "leaderboard.csv", "report.html"


def _dataset_id(run: Run) -> str:
    sha = run.manifest_sha256
    return f"manifest {sha[:12]}" if sha else f"dataset {run.dataset.get('name')!r} (no manifest recorded)"


# the fields a comparison must share, how each reads for a run
GROUP_FIELDS = {
    "protocol hash": lambda run: run.protocol_hash,
    "dataset": _dataset_id,
    "report split": lambda run: ", ".join(run.report_splits),
}


@dataclass
class Entry:
    """One selected head of one run, under the label it has in the leaderboard."""

    run: Run
    label: str
    row: dict  # the selected results.csv row
    predictions: Predictions | None

    @property
    def key(self) -> ConfigKey:
        return ConfigKey.of_row(self.row, self.label)


@dataclass
class Group:
    fields: dict[str, str]
    runs: list[Run]
    entries: list[Entry] = field(default_factory=list)
    comparison: Comparison | None = None  # over the entries that have predictions

    @property
    def title(self) -> str:
        return "; ".join(f"{k} {v}" for k, v in self.fields.items())


def _entries(runs: list[Run]) -> list[Entry]:
    """Every selected head of ``runs``; a label used by several runs gets its run's folder name in front."""
    owners: dict[str, set] = {}
    for run in runs:
        for r in run.selected:
            owners.setdefault(row_label(r), set()).add(id(run))
    entries = []
    for run in runs:

        def rename(label: str, run: Run = run) -> str:
            return f"{run.name}/{label}" if len(owners.get(label, ())) > 1 else label

        # matched by store path (in both files whatever the labels), view, method, shots, seed
        preds = {ConfigKey.make(p.store, p.view, p.method, p.shots, p.seed): p for p in run.predictions or []}
        for r in run.selected:
            label = rename(row_label(r))
            p = preds.get(ConfigKey.of_row(r, str(r["store"])))
            if p is not None:
                p = Predictions(label, p.store, p.view, p.method, p.shots, p.seed, p.paths, p.target, p.pred, p.top5)
            entries.append(Entry(run, label, r, p))
    return entries


def differences(runs: list[Run]) -> str:
    """``protocol hash (protocol hash: a 31bd…, b 6fdf…; epochs 30 vs 10)``: what keeps runs apart."""
    differing = [name for name, get in GROUP_FIELDS.items() if len({get(run) for run in runs}) > 1]
    detail = "; ".join(f"{name}: " + ", ".join(f"{run.name} {GROUP_FIELDS[name](run)}" for run in runs) for name in differing)
    if "protocol hash" in differing:
        detail += _protocol_fields_differing(runs)
    return f"{' and '.join(differing)} ({detail})"


def _protocol_fields_differing(runs: list[Run]) -> str:
    """``; epochs 30 vs 10`` — the protocol fields behind different hashes, as far as recorded."""
    protocols = [run.record.get("protocol") or {} for run in runs]
    names = sorted({k for p in protocols for k in p if len({json.dumps(q.get(k), sort_keys=True) for q in protocols}) > 1})
    return "".join(f"; {k} " + " vs ".join(json.dumps(p.get(k)) for p in protocols) for k in names)


def gather(folders: list[str | os.PathLike], *, allow_mixed: bool = False, reference: str | None = None) -> list[Group]:
    """Load the results folders, check they form one comparison (or group them), compare each group."""
    if not folders:
        raise UsageError("no results folder given", "pass one or more --out folders of probe fit")
    seen = set()
    runs = []
    for f in folders:
        key = os.path.realpath(f)
        if key in seen:
            raise UsageError(f"results folder {str(f)!r} given twice", "pass each folder once")
        seen.add(key)
        runs.append(load(f))
    groups: dict[tuple, Group] = {}
    for run in runs:
        values = {name: get(run) for name, get in GROUP_FIELDS.items()}
        groups.setdefault(tuple(values.values()), Group(values, [])).runs.append(run)
    if len(groups) > 1 and not allow_mixed:
        raise UsageError(
            f"these results differ in {differences(runs)}",
            "compare results of one protocol, dataset and report split, or pass --allow-mixed to report them as separate groups",
        )
    out = list(groups.values())
    for g in out:
        g.entries = _entries(g.runs)
        with_preds = [e.predictions for e in g.entries if e.predictions is not None]
        if with_preds:
            labels = [p.label for p in with_preds]
            ref = reference if reference in labels else None
            if reference is not None and ref is None and len(out) == 1:
                raise UsageError(
                    f"no store labelled {reference!r} in these results", f"--reference is one of: {', '.join(dict.fromkeys(labels))}"
                )
            g.comparison = compare(with_preds, ref, class_names=g.runs[0].class_names)
    return out


def table_rows(groups: list[Group]) -> list[dict]:
    """The leaderboard: per group, every selected head, best top-1 first, with its interval and its
    difference to the group's reference."""
    out = []
    for gi, g in enumerate(groups, start=1):
        rows = {r.key: r for r in (g.comparison.rows if g.comparison else [])}
        items = []
        for e in g.entries:
            c = rows.get(e.key)
            top1 = c.top1 if c else reported_top1(e.row)
            n = c.n if c else reported_n(e.row)
            wilson = c.wilson95 if c else (I.wilson_interval(round(top1 * n / 100), n) if top1 is not None and n else (math.nan, math.nan))
            items.append(
                {
                    "group": gi, "label": e.label, "encoder": e.row.get("encoder"), "view": e.row["view"],
                    "method": e.key.method, "shots": e.key.shots, "seed": e.key.seed, "selected": setting(e.row), "lr": e.row.get("lr"), "n": n,
                    "top1": top1, "ci95_low": c.ci95[0] if c else None, "ci95_high": c.ci95[1] if c else None,
                    "wilson95_low": wilson[0], "wilson95_high": wilson[1],
                    "reference": g.comparison.reference if g.comparison else None,
                    "delta": c.delta if c else None, "delta_ci95_low": c.delta_ci95[0] if c and c.delta_ci95 else None,
                    "delta_ci95_high": c.delta_ci95[1] if c and c.delta_ci95 else None,
                    "n01": c.n01 if c else None, "n10": c.n10 if c else None, "mcnemar_p": c.mcnemar_p if c else None,
                    "report_split": e.row.get("report_split"), "protocol_hash": g.runs[0].protocol_hash, "run": str(e.run.folder),
                }
            )  # fmt: skip
        items.sort(key=lambda r: -(r["top1"] if r["top1"] is not None else -math.inf))
        for rank, r in enumerate(items, start=1):
            out.append({"rank": rank, **r})
    return out


CSV_COLUMNS = [
    "group", "rank", "label", "encoder", "view", "method", "shots", "seed", "selected", "lr", "n", "top1", "ci95_low", "ci95_high",
    "wilson95_low", "wilson95_high", "reference", "delta", "delta_ci95_low", "delta_ci95_high", "n01", "n10", "mcnemar_p",
    "report_split", "protocol_hash", "run",
]  # fmt: skip


def csv_text(rows: list[dict]) -> str:
    """leaderboard.csv: one line per :func:`table_rows` row."""
    return table_csv.csv_text(CSV_COLUMNS, rows)


TEXT_COLUMNS = {1, 2, 3, 4}  # label, encoder, view, method: words (left-aligned in report.html); the rest are numbers


def table_head(reference: str | None) -> list[str]:
    """The leaderboard table's column titles (leaderboard.md and report.html)."""
    return ["rank", "label", "encoder", "view", "method", "shots", "seed", "selected", "n", "top-1 [95% CI]", "Wilson 95%",
            f"Δ vs {reference or 'reference'} [95% CI]", "n01 / n10", "McNemar p"]  # fmt: skip


def table_cells(r: dict, reference: str | None) -> list[str]:
    """One :func:`table_rows` row as the table's text cells, as both renderers show them."""
    ci = (r["ci95_low"], r["ci95_high"]) if r["ci95_low"] is not None else None
    wilson = "—" if r["wilson95_low"] is None or math.isnan(r["wilson95_low"]) else f"[{r['wilson95_low']:.1f}, {r['wilson95_high']:.1f}]"
    if r["label"] == reference:
        delta, disc = "reference", "—"
    elif r["delta"] is None:
        delta, disc = "— (no predictions)" if ci is None else "—", "—"
    else:
        delta, disc = fmt_interval(r["delta"], (r["delta_ci95_low"], r["delta_ci95_high"]), signed=True), f"{r['n01']} / {r['n10']}"
    return [str(r["rank"]), r["label"], str(r["encoder"] or "—"), r["view"], r["method"], r["shots"] or "all", str(r["seed"]), r["selected"], str(r["n"]),
            fmt_interval(r["top1"], ci), wilson, delta, disc, fmt_p(r["mcnemar_p"])]  # fmt: skip


def markdown(groups: list[Group], rows: list[dict]) -> str:
    """One markdown table per group (one group unless --allow-mixed)."""
    out = []
    if len(groups) > 1:
        out.append(
            f"{len(groups)} groups, ranked separately (--allow-mixed): the results differ in {differences([r for g in groups for r in g.runs])}.\n"
        )
    for gi, g in enumerate(groups, start=1):
        if len(groups) > 1:
            out.append(f"### group {gi}: {g.title}\n")
        ref = g.comparison.reference if g.comparison else None
        head = table_head(ref)
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in (r for r in rows if r["group"] == gi):
            lines.append("| " + " | ".join(table_cells(r, ref)) + " |")
        splits = g.fields["report split"]
        out.append(
            "\n".join(lines) + f"\n\ntop-1 in percent on the {splits} split; 95% CI: percentile bootstrap over images "
            f"({I.N_RESAMPLES} resamples, seed {I.BOOTSTRAP_SEED}); Wilson: score interval; Δ: paired bootstrap on the same images; "
            f"McNemar: exact two-sided. Protocol {g.runs[0].protocol_hash}, {g.fields['dataset']}.\n"
        )
    return "\n".join(out)
