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

import numpy as np

from featstore.errors import UsageError

from .. import intervals as I
from ..comparison import Comparison, compare, fmt_interval, fmt_p
from ..multiple_testing import holm
from ..protocol import Protocol
from ..results import markdown_cells, table_csv
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
    """``protocol (lr_grid 0.01 vs 1e-05…0.1 (13); epochs 30 vs 10)``: what keeps runs apart, only
    the fields that differ, shortened."""
    differing = [name for name, get in GROUP_FIELDS.items() if len({get(run) for run in runs}) > 1]
    details = []
    for name in differing:
        if name == "protocol hash":
            fields = _protocol_fields_differing(runs)
            details.append(fields or "hashes " + ", ".join(f"{run.name} {run.protocol_hash}" for run in runs))
        else:
            details.append(f"{name}: " + ", ".join(f"{run.name} {GROUP_FIELDS[name](run)}" for run in runs))
    words = [name.replace("protocol hash", "protocol") for name in differing]
    return f"{' and '.join(words)} ({'; '.join(details)})"


def _protocol_fields_differing(runs: list[Run]) -> str:
    """``epochs 30 vs 10; lr_grid 0.01 vs 1e-05…0.1 (13)`` — the protocol fields behind different hashes, as far as recorded."""
    protocols = _with_defaults([run.record.get("protocol") or {} for run in runs])
    return "; ".join(f"{k} " + " vs ".join(dict.fromkeys(_short(p.get(k)) for p in protocols)) for k in _differing_fields(protocols))


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


def table_rows(groups: list[Group], *, per_seed: bool = False) -> list[dict]:
    """The leaderboard: per group and per method (× shots), every store ranked by top-1, best
    first, with its interval and its difference to the group's reference. By default a store's
    seeds are one row (mean ± std over seeds, the seed-mean interval and difference); with
    ``per_seed`` every seed is its own row (ranked within its seed). ``p``: the row's paired test
    (McNemar's for one seed, the sign-flip test of the seed-mean difference over seeds), ``p_holm``:
    the p-values of a group adjusted together (Holm), beside the raw ones."""
    out = []
    for gi, g in enumerate(groups, start=1):
        rows = _seed_rows(gi, g)
        if not per_seed:
            rows = _over_seeds(g, rows)
        for r in rows:
            r.setdefault("p", r["mcnemar_p"])
        for r, adjusted in zip(rows, holm([r["p"] for r in rows])):
            r["p_holm"] = adjusted
        blocks: dict[tuple, list[dict]] = {}  # ranked within a method × shots (× seed): never across methods
        for r in rows:
            blocks.setdefault((r["method"], r["shots"]) + ((r["seed"],) if per_seed else ()), []).append(r)
        for block in blocks.values():
            block.sort(key=lambda r: -(r["top1"] if r["top1"] is not None else -math.inf))
            # competition ranking: equal top-1 share a rank (1, 1, 3), whatever order the stores came in
            tops = [r["top1"] for r in block if r["top1"] is not None]
            out += [
                {"rank": 1 + sum(t > r["top1"] for t in tops) if r["top1"] is not None else i, **r} for i, r in enumerate(block, start=1)
            ]
    return out


def _seed_rows(gi: int, g: Group) -> list[dict]:
    """One row per selected head (store × view × method × shots × seed) of a group."""
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
                "method": e.key.method, "shots": e.key.shots, "seed": e.key.seed, "n_seeds": 1, "seeds": str(e.key.seed),
                "selected": setting(e.row), "lr": e.row.get("lr"), "n": n,
                "top1": top1, "top1_std": None, "ci95_low": c.ci95[0] if c else None, "ci95_high": c.ci95[1] if c else None,
                "wilson95_low": wilson[0], "wilson95_high": wilson[1],
                "reference": g.comparison.reference if g.comparison else None,
                "delta": c.delta if c else None, "delta_std": None, "delta_ci95_low": c.delta_ci95[0] if c and c.delta_ci95 else None,
                "delta_ci95_high": c.delta_ci95[1] if c and c.delta_ci95 else None,
                "n01": c.n01 if c else None, "n10": c.n10 if c else None, "mcnemar_p": c.mcnemar_p if c else None,
                "report_split": e.row.get("report_split"), "protocol_hash": g.runs[0].protocol_hash, "run": str(e.run.folder),
            }
        )  # fmt: skip
    return items


def _over_seeds(g: Group, rows: list[dict]) -> list[dict]:
    """A store × view × method × shots over its seeds: top-1 mean ± sample std, the bootstrap
    interval of the seed-mean (when the seeds scored the same images), the seed-mean difference
    with its paired interval; a single seed's row as it is. McNemar is a per-seed test: several
    seeds' rows carry none (``--per-seed`` shows them)."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["label"], r["view"], r["method"], r["shots"]), []).append(r)
    preds = {e.key: e.predictions for e in g.entries}
    summaries = {(s.label, s.view, s.method, s.shots): s for s in (g.comparison.seeds if g.comparison else [])}
    out = []
    for key, rs in by.items():
        if len(rs) == 1:
            out.append(rs[0])
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        tops = [r["top1"] for r in rs if r["top1"] is not None]
        mean, std = I.mean_std(tops) if tops else (None, None)
        merged = {**rs[0], "seed": None, "n_seeds": len(rs), "seeds": " ".join(str(r["seed"]) for r in rs), "top1": mean, "top1_std": std}
        picks: dict[str, int] = {}
        for r in rs:
            picks[r["selected"]] = picks.get(r["selected"], 0) + 1
        merged["selected"] = "; ".join(f"{k} ×{n}" for k, n in picks.items())
        if len({r.get("lr") for r in rs}) > 1:
            merged["lr"] = None  # the seeds chose different learning rates ("selected" lists them), not seed 0's
        merged.update(ci95_low=None, ci95_high=None, wilson95_low=None, wilson95_high=None, n01=None, n10=None, mcnemar_p=None)
        merged.update(delta=None, delta_std=None, delta_ci95_low=None, delta_ci95_high=None)
        ps = [preds.get(ConfigKey(key[0], key[1], key[2], key[3], r["seed"])) for r in rs]
        if all(p is not None for p in ps) and all(np.array_equal(p.paths, ps[0].paths) for p in ps):  # type: ignore[union-attr]
            low, high = I.seed_mean_interval([p.correct for p in ps])  # type: ignore[union-attr]
            merged["ci95_low"], merged["ci95_high"] = (low, high) if np.isfinite([low, high]).all() else (None, None)
        s = summaries.get(key)
        if s is not None and s.delta_mean is not None:
            merged["delta"], merged["delta_std"], merged["p"] = s.delta_mean, s.delta_std, s.p_sign
            if s.delta_mean_ci95 is not None:
                merged["delta_ci95_low"], merged["delta_ci95_high"] = s.delta_mean_ci95
        out.append(merged)
    return out


CSV_COLUMNS = [
    "group", "rank", "label", "encoder", "view", "method", "shots", "seed", "n_seeds", "seeds", "selected", "lr", "n",
    "top1", "top1_std", "ci95_low", "ci95_high", "wilson95_low", "wilson95_high", "reference", "delta", "delta_std",
    "delta_ci95_low", "delta_ci95_high", "n01", "n10", "mcnemar_p", "p", "p_holm", "report_split", "protocol_hash", "run",
]  # fmt: skip


def csv_text(rows: list[dict]) -> str:
    """leaderboard.csv: one line per :func:`table_rows` row."""
    return table_csv.csv_text(CSV_COLUMNS, rows)


TEXT_COLUMNS = {1, 2, 3, 4}  # label, encoder, view, method: words (left-aligned in report.html); the rest are numbers
SELECTED_COLUMN = 7  # "lr 0.1 (refit) ×2; lr 0.01 ×1": each seed's pick, one a line in report.html


def table_head(reference: str | None, per_seed: bool = False, fixed: bool = False) -> list[str]:
    """The leaderboard table's column titles (leaderboard.md and report.html); ``fixed``: a
    protocol that selects nothing (its settings are given, not selected)."""
    top1 = "top-1 [95% CI]" if per_seed else "top-1 (± std over seeds) [95% CI]"
    return ["rank", "label", "encoder", "view", "method", "shots", "seed" if per_seed else "seeds", "setting (fixed)" if fixed else "selected", "n", top1,
            "Wilson 95%", f"Δ vs {reference or 'reference'} [95% CI]", "n01 / n10", "paired p", "Holm p"]  # fmt: skip


def top1_cell(r: dict) -> str:
    """``93.41 [92.60, 94.10]``; several seeds ``93.41 ± 0.12 (3) [92.60, 94.10]``."""
    ci = (r["ci95_low"], r["ci95_high"]) if r["ci95_low"] is not None else None
    if r.get("n_seeds", 1) > 1 and r["top1"] is not None:
        tail = "" if ci is None else " " + fmt_interval(r["top1"], ci).split(" ", 1)[1]
        return f"{r['top1']:.1f} ± {r['top1_std']:.1f} ({r['n_seeds']}){tail}"
    return fmt_interval(r["top1"], ci)


def table_cells(r: dict, reference: str | None, per_seed: bool = False) -> list[str]:
    """One :func:`table_rows` row as the table's text cells, as both renderers show them."""
    ci = (r["ci95_low"], r["ci95_high"]) if r["ci95_low"] is not None else None
    wilson = "—" if r["wilson95_low"] is None or math.isnan(r["wilson95_low"]) else f"[{r['wilson95_low']:.1f}, {r['wilson95_high']:.1f}]"
    if r["label"] == reference:
        delta, disc = "reference", "—"
    elif r["delta"] is None:
        delta, disc = "— (no predictions)" if ci is None else "—", "—"
    else:
        delta = fmt_interval(r["delta"], (r["delta_ci95_low"], r["delta_ci95_high"]), signed=True)
        delta += f" (± {r['delta_std']:.1f})" if r.get("delta_std") is not None else ""
        disc = f"{r['n01']} / {r['n10']}" if r["n01"] is not None else "—"
    seed = str(r["seed"]) if per_seed else r.get("seeds") or str(r["seed"])
    return [str(r["rank"]), r["label"], str(r["encoder"] or "—"), r["view"], r["method"], r["shots"] or "all", seed, r["selected"], str(r["n"]),
            top1_cell(r), wilson, delta, disc, fmt_p(r.get("p")), fmt_p(r.get("p_holm"))]  # fmt: skip


def markdown(groups: list[Group], rows: list[dict], per_seed: bool = False) -> str:
    """One markdown table per group (one group unless --allow-mixed)."""
    out = []
    if len(groups) > 1:
        out.append(
            f"{len(groups)} groups, ranked separately (--allow-mixed): the results differ in {differences([r for g in groups for r in g.runs])}.\n"
        )
    names = titles(groups)
    for gi, g in enumerate(groups, start=1):
        out.append(f"### {'group ' + str(gi) + ': ' if len(groups) > 1 else ''}{names[gi - 1]}\n")
        ref = g.comparison.reference if g.comparison else None
        head = table_head(ref, per_seed, not selects(g.runs[0]))
        lines = [markdown_cells.row(head), "|" + "|".join("---" for _ in head) + "|"]
        mine = [r for r in rows if r["group"] == gi]
        for r in mine:
            lines.append(markdown_cells.row(table_cells(r, ref, per_seed)))
        out.append("\n".join(lines) + "\n\n" + notes(g, mine, per_seed) + "\n")
    return "\n".join(out)


def notes(g: Group, rows: list[dict], per_seed: bool = False) -> str:
    """What the numbers of a group's table are (the markdown, report.html and the paper tables share it)."""
    text = (
        f"top-1 in percent on the {g.fields['report split']} split, ranked within each method; 95% CI: percentile bootstrap over "
        f"images ({I.N_RESAMPLES} resamples, seed {I.BOOTSTRAP_SEED}); Wilson: score interval; Δ: paired bootstrap on the same images; "
        "paired p: McNemar's exact two-sided test"
    )
    if any(r.get("n_seeds", 1) > 1 for r in rows):
        text += (
            "; several seeds: mean ± sample std over seeds (n), the CI, Δ and p of the seed-mean over the same images "
            "(p: exact sign-flip test of the seed-averaged per-image difference, McNemar's for one seed; --per-seed shows every seed)"
        )
    tests = sum(r.get("p") is not None for r in rows)
    if tests > 1:
        text += f"; Holm p: the {tests} p-values of this table adjusted together (family-wise error)"
    return text + f". {fixed_or_sweep(g.runs[0])}, protocol {g.runs[0].protocol_hash}, {g.fields['dataset']}."


def _short(value) -> str:
    """A protocol value in a few characters: ``0.01``; a grid ``1e-05…0.1 (13)``."""
    if isinstance(value, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value:
            return (
                f"{value[0]:g}"
                if len(value) == 1
                else f"{min(value):g}…{max(value):g} ({len(value)})"
                if len(value) > 3
                else ",".join(f"{v:g}" for v in value)
            )
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return "—" if value is None else str(value)


def fixed_or_sweep(run: Run) -> str:
    """``fixed lr 0.01`` or ``LR sweep 1e-05…0.1 (13)`` (with the other methods: ``…; knn, logreg``):
    the name of a run's protocol that a reader recognises, where the hash says nothing."""
    protocol = run.record.get("protocol") or {}
    grid = protocol.get("lr_grid") or sorted({r["lr"] for r in run.rows if r.get("lr") is not None})
    methods = [m for m in protocol.get("methods") or ["linear"] if m != "linear"]
    if not grid:
        name = "no linear probe"
    elif len(grid) == 1:
        name = f"fixed lr {grid[0]:g}"
    else:
        name = f"LR sweep {min(grid):g}…{max(grid):g} ({len(grid)})"
    return name + (f"; {', '.join(methods)}" if methods else "")


def selects(run: Run) -> bool:
    """Whether a run's protocol chooses anything: an LR or weight-decay grid, several k, several C.
    A fixed-LR run (``probe fit --lr``) selects nothing, and says so."""
    protocol = run.record.get("protocol") or {}
    methods = protocol.get("methods") or ["linear"]
    lrs = protocol.get("lr_grid") or sorted({r["lr"] for r in run.rows if r.get("lr") is not None})
    grids = {"linear": len(lrs) * len(protocol.get("wd_grid") or [0]), "knn": len(protocol.get("knn_k") or [0, 0]), "logreg": len(protocol.get("logreg_C") or [0, 0])}  # fmt: skip
    return any(grids.get(m, 2) > 1 for m in methods)


def titles(groups: list[Group]) -> list[str]:
    """Each group's heading: its protocol's name, and what else tells it from the other groups
    (the protocol fields that differ, shortened; the dataset; the report split)."""
    names = [fixed_or_sweep(g.runs[0]) for g in groups]
    if len(groups) == 1:
        g = groups[0]
        return [f"{names[0]}; {g.fields['dataset']}; report split {g.fields['report split']}"]
    protocols = [g.runs[0].record.get("protocol") or {} for g in groups]
    out = []
    for i, g in enumerate(groups):
        parts = [names[i]]
        if names.count(names[i]) > 1:  # the same name for different protocols: what differs in them
            keys = [k for k in _differing_fields(protocols) if k != "lr_grid"]
            parts += [f"{k} {_short(_with_defaults([protocols[i]])[0].get(k))}" for k in keys]
        for field_name in ("dataset", "report split"):
            if len({h.fields[field_name] for h in groups}) > 1:
                parts.append(f"{field_name} {g.fields[field_name]}" if field_name == "report split" else g.fields[field_name])
        out.append("; ".join(parts))
    return out


# fields a record leaves out at their default (one method, one seed, every row, no drawn test): filled in to compare
_LEFT_OUT_AT_DEFAULT = ("methods", "seeds", "shots", "test_fraction")


def _with_defaults(protocols: list[dict]) -> list[dict]:
    from dataclasses import asdict

    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(Protocol()).items() if k in _LEFT_OUT_AT_DEFAULT}
    return [{**defaults, "seeds": [p.get("seed", 0)], **p} for p in protocols]  # a single seed: the `seed` field


def _differing_fields(protocols: list[dict]) -> list[str]:
    """The protocol fields whose values differ; a field that acts in some runs only (the k-NN
    settings where one run has no k-NN) is not a difference: ``methods`` already says it."""
    full = _with_defaults(protocols)
    shared = set.intersection(*(set(p) for p in full)) if full else set()
    return sorted(k for k in shared if len({json.dumps(q.get(k), sort_keys=True) for q in full}) > 1)
