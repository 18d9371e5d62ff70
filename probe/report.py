"""Outputs of a probe run: results.csv, protocol.json, predictions.csv (per-image predictions of the
selected heads), accuracy_vs_lr.png and a markdown summary (with intervals and, for 2+ stores, the
difference to the first store).

A results folder is never silently overwritten: a folder that is not empty is refused unless
``overwrite`` (and even then only when it holds a previous probe run). Everything is rendered
into a temp folder beside it first and moved into place only after all files were written, so a
failed run leaves the previous results untouched and no partial file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featstore import __version__
from featstore.errors import UsageError

from .compare import Comparison, compare, fmt_interval, fmt_p
from .fit import COLUMNS
from .intervals import N_RESAMPLES, seed_mean_interval
from .predictions import PREDICTIONS, ConfigKey
from .predictions import of_rows as predictions_of
from .predictions import write as write_predictions
from .protocol import Protocol
from .runs import PROTOCOL, RESULTS
from .summary import mean_std, selected_by_entry, summarize, summary_csv

# the columns that name one probe (one line in the plot, one row in the table)
PROBE_KEY = ("label", "view")

PLOT, SUMMARY = "accuracy_vs_lr.png", "summary.csv"  # results.csv and protocol.json: probe.runs (their reader)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-2 and value != 0 else repr(round(value, 6))
    return str(value)


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in COLUMNS])
    return buf.getvalue()


def protocol_json(protocol: Protocol, run: dict | None = None) -> str:
    import torch

    record = {
        "protocol_hash": protocol.hash,
        "protocol": protocol.to_dict(),
        "run": {
            **(run or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "featstore_version": __version__,
            "torch_version": torch.__version__,
        },
    }
    return json.dumps(record, indent=2) + "\n"


_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")  # no "*": the selected head's star


def line_styles(keys, colours: int = 10) -> dict[tuple, tuple[int, str, str]]:
    """(store label, view, extra) of each line, in order → (colour index, line style, marker);
    ``extra`` is what else tells lines apart (weight decay, few-shot size). One view and no
    extras: a colour per line. Otherwise one colour per store, because the eye pairs a store's
    lines by colour; then a line style per view (or per extra, with one view) and a marker per
    extra and per fifth view onwards. Past ``colours`` lines or stores the palette repeats, so
    those get the next markers: no two lines look alike (up to the eight markers)."""
    keys = list(dict.fromkeys(keys))
    labels = list(dict.fromkeys(k[0] for k in keys))
    views = list(dict.fromkeys(k[1] for k in keys))
    extras = list(dict.fromkeys(k[2] for k in keys))
    n_styles = len(_STYLES)
    out = {}
    for i, k in enumerate(keys):
        v, e = views.index(k[1]), extras.index(k[2])
        if len(views) == 1 and len(extras) == 1:
            colour, style, marker, markers_used = i, 0, 0, 1
        elif len(views) == 1:
            colour, style, marker, markers_used = labels.index(k[0]), e % n_styles, e // n_styles, -(-len(extras) // n_styles)
        else:
            colour, style = labels.index(k[0]), v % n_styles
            marker, markers_used = v // n_styles * len(extras) + e, -(-len(views) // n_styles) * len(extras)
        marker += colour // colours * markers_used  # the palette's second round: the next markers
        out[k] = (colour, _STYLES[style], _MARKERS[marker % len(_MARKERS)])
    return out


LEGEND_INSIDE = 6
LEGEND_STRIP = 3.0  # inches for a legend of "label [view] — ★ lr 0.03162" lines


def place_legends(fig, axes, lines: int) -> tuple[float, float, float, float]:
    """A legend on every panel while it is short; past LEGEND_INSIDE lines one legend in a strip
    added to the right of the figure, where it hides no curve. Returns the rectangle the panels
    keep (for ``tight_layout``)."""
    if lines <= 1:
        return (0, 0, 1, 1)
    if lines <= LEGEND_INSIDE:
        for ax in axes:
            ax.legend(fontsize=8, loc="best")
        return (0, 0, 1, 1)
    handles, labels = axes[-1].get_legend_handles_labels()
    width = fig.get_figwidth()
    fig.set_figwidth(width + LEGEND_STRIP)
    fig.legend(handles, labels, fontsize=8, loc="center right", frameon=False)
    return (0, 0, width / (width + LEGEND_STRIP), 1)


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by probe (label × view), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in PROBE_KEY), []).append(r)
    return groups


def _name(key: tuple, with_view: bool) -> str:
    label, view = key[0], key[1]
    return f"{label} [{view}]" if with_view else label


def _selection_words(row: dict, protocol: Protocol | None) -> str:
    if row["select_split"] != "holdout":
        return row["select_split"]
    what = "train" if row["train_split"] == "train" else repr(row["train_split"])
    return f"{protocol.val_fraction * 100:g}% {what} holdout" if protocol else f"{what} holdout"


def _chosen_on_report(row: dict) -> bool:
    """--select-on report: the row's LR, k or C was chosen on the split it reports."""
    return row["report_split"] is not None and row["select_split"] == row["report_split"]


def plot_title(rows: list[dict], protocol: Protocol | None = None) -> str:
    """Dataset, view(s) and protocol: what a reader needs to know which numbers these are."""
    r0 = rows[0]
    groups = _groups(rows)
    datasets = " / ".join(dict.fromkeys(str(r["dataset"] or "unknown dataset") for r in rows))
    views = list(dict.fromkeys(k[1] for k in groups))
    if len(views) == 1:
        view_text = f"view {views[0]}"
    elif len({k[0] for k in groups}) == len(groups):  # one view per store: say which
        view_text = "views " + ", ".join(f"{k[0]}: {k[1]}" for k in groups)
    else:
        view_text = "views " + ", ".join(views)
    return (f"{datasets} — linear probe, {view_text}\n{r0['optimizer']}, {r0['epochs']} epochs, batch {r0['batch_size']}, "
            f"normalize {r0['normalize']}, seed {r0['seed']}, select on {r0['select_on']} — protocol {r0['protocol_hash']}")  # fmt: skip


def plot_panels(rows: list[dict], protocol: Protocol | None = None) -> list[tuple[str, str]]:
    """(column, title) of each panel: only what exists. No reported panel when nothing is
    reported; one panel, titled max over the reported split, when the LR was chosen on it."""
    on_report = all(_chosen_on_report(r) for r in rows)
    select_splits = " / ".join(dict.fromkeys(_selection_words(r, protocol) for r in rows))
    report_splits = " / ".join(dict.fromkeys(str(r["report_split"]) for r in rows if r["report_split"] is not None))
    if on_report:
        return [("report_top1_pct", f"{report_splits} top-1: max over the reported split (the LR is chosen on it)")]
    panels = [("select_top1_pct", f"selection: {select_splits} top-1; ★ = selected head")]
    if any(r["report_top1_pct"] is not None for r in rows):
        panels.append(("report_top1_pct", f"reported: {report_splits} top-1 of every head; ★ = the selected head"))
    return panels


def plot_rows(rows: list[dict]) -> list[dict]:
    """The rows the LR plot shows: the linear heads of the first seed and training-set size."""
    linear = [r for r in rows if r.get("method", "linear") == "linear"]
    if not linear:
        return []
    first = (linear[0]["seed"], linear[0].get("shots"))
    return [r for r in linear if (r["seed"], r.get("shots")) == first]


def is_battery(rows: list[dict]) -> bool:
    """More than today's single linear sweep: other methods, several seeds or few-shot sizes."""
    return any(r.get("method", "linear") != "linear" or r.get("shots") is not None for r in rows) or len({r["seed"] for r in rows}) > 1


def plot(rows: list[dict], path: Path, protocol: Protocol | None = None) -> None:
    """Write :func:`figure` of :func:`plot_rows` as a PNG."""
    shown = plot_rows(rows)
    note = None
    if is_battery(rows):
        seeds = list(dict.fromkeys(r["seed"] for r in rows))
        size = "every training row" if shown[0].get("shots") is None else f"{shown[0]['shots']} per class"
        note = f"the linear probe of seed {shown[0]['seed']}" + (f" (of {len(seeds)})" if len(seeds) > 1 else "") + f", {size}; all methods, seeds and sizes: summary.csv"
    fig = figure(shown, protocol, note)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def figure(rows: list[dict], protocol: Protocol | None = None, note: str | None = None):
    """Selection-split and reported-split top-1 against LR (log axis), one line per store (× view
    × wd), the selected head starred, its LR written beside the star (one line) or in the legend
    (several lines); the panels are
    :func:`plot_panels`, the title :func:`plot_title`, the legends :func:`place_legends`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    with_view = len({k[1] for k in groups}) > 1
    panels = plot_panels(rows, protocol)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels) + 0.8, 4.8), sharey=True, squeeze=False)
    axes = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = 0
    lr_span = [r["lr"] for r in rows]
    mixed = {col: len({r["report_split" if col.startswith("report") else "select_split"] for r in rows}) > 1 for col, _ in panels}
    # one line: the selected LR is written at its star; several: in the legend, beside the line's
    # name (labels at the stars collide as soon as two stores select the same or a near LR)
    several = sum(len({r["wd"] for r in rs}) for rs in groups.values()) > 1
    styles = line_styles(((k[0], k[1], r["wd"]) for k, rs in groups.items() for r in rs), len(colors))
    for key, rs in groups.items():
        wds = sorted({r["wd"] for r in rs})
        sel = next(r for r in rs if r["selected"])
        color = colors[styles[(key[0], key[1], sel["wd"])][0] % len(colors)]  # the store's (or line's) colour
        for wd in wds:
            line = sorted((r for r in rs if r["wd"] == wd), key=lambda r: r["lr"])
            name = _name(key, with_view) + (f" wd={wd:g}" if len(wds) > 1 else "")
            name += f" — ★ lr {sel['lr']:g}" if several and wd == sel["wd"] else ""
            lines += 1
            for ax, (col, _) in zip(axes, panels):
                pts = [(r["lr"], r[col]) for r in line if r[col] is not None]
                # stores of different layouts (--allow-different-data): say each line's split
                split = line[0]["report_split" if col.startswith("report") else "select_split"]
                if pts:
                    _, style, marker = styles[(key[0], key[1], wd)]
                    ax.plot(*zip(*pts), style, marker=marker, ms=3, color=color, label=name + (f" ({split})" if mixed[col] else ""))
        for ax, (col, _) in zip(axes, panels):
            if sel[col] is None:
                continue
            ax.plot(sel["lr"], sel[col], "*", ms=14, color=color, markeredgecolor="black", zorder=5)
            if several:
                continue
            # the selected head tops its selection curve: inside the grid the space below the star is
            # free, at an end of the grid the space beside it (towards the axes' inside)
            end = "right" if sel["lr"] == max(lr_span) else "left" if sel["lr"] == min(lr_span) else None
            offset = (0, -17) if end is None else (-11 if end == "right" else 11, 0)
            ax.annotate(f"lr {sel['lr']:g}", (sel["lr"], sel[col]), textcoords="offset points", xytext=offset, ha=end or "center",
                        va="top" if end is None else "center", fontsize=8, color=color, fontweight="bold", zorder=6,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    panel_rect = place_legends(fig, axes, lines)
    # wrap the title to the figure's width (about 12 characters an inch at this size): never clipped
    width = int(fig.get_figwidth() * 12)
    title = plot_title(rows, protocol) + (f"\n{note}" if note else "")
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=10)
    fig.tight_layout(rect=panel_rect)
    return fig


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
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    reported_as = {(r["store"], r["view"]): r["reported_as"] for r in rows}
    for e in entries:
        cells = [labels[e["store"]], encoders[e["store"]] or "—"] + ([e["view"]] if multi_view else [])
        cells += [e["method"], _shots_words(e["shots"]), e["selected"], mean_std(e, "top1")]
        cells += [mean_std(e, "top5")] if has_top5 else []
        cells += [reported_as[(e["store"], e["view"])]]
        if versus:
            cells += _versus_entry_cells(versus, labels[e["store"]], e)
        lines.append("| " + " | ".join(cells) + " |")
    r0 = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    notes = f"protocol {r0['protocol_hash']}: methods {', '.join(dict.fromkeys(r['method'] for r in rows))}; seeds {', '.join(map(str, seeds))}"
    notes += "; mean ± sample std (n seeds) of the selected configuration's reported accuracy" if len(seeds) > 1 else ""
    notes += "; lr, k and C chosen on the selection split, never on the reported split"
    if any(r["method"] == "logreg" and r.get("refit") for r in rows):
        notes += "; logreg (refit): the selected C refit on train + selection rows, then reported once"
    if any(_chosen_on_report(r) for r in rows):
        notes += "; --select-on report: every reported number is the max over the reported split, optimistic"
    return "\n".join(lines) + "\n\n" + notes + "\n"


def markdown_table(rows: list[dict], protocol: Protocol | None = None, digest: Digest | None = None) -> str:
    """Per store × view: the fixed-LR result (one head) or the selected LR, its selection and
    reported top-1, what the reported number is (``reported_as``), and the best-of-sweep head on
    the reported split, labelled as such. A battery run (methods, seeds, shots) gets
    :func:`battery_table` instead. ``digest``: the rows' :func:`digest_of`, computed here when not given."""
    if is_battery(rows):
        return battery_table(rows, protocol, digest)
    groups = _groups(rows)
    multi_view = len({k[1] for k in groups}) > 1
    one_head = all(len(rs) == 1 for rs in groups.values())
    multi_wd = any(len({r["wd"] for r in rs}) > 1 for rs in groups.values())
    on_report = all(_chosen_on_report(r) for r in rows)
    has_top5 = any(r["report_top5_pct"] is not None or r["select_top5_pct"] is not None for r in rows)
    show_wd = multi_wd or (one_head and rows[0]["wd"])
    head = ["label", "encoder"] + (["view"] if multi_view else [])
    head += ["lr (fixed)"] if one_head else ["selected lr"]
    head += ["wd"] if show_wd else []
    head += ["selection top-1 (split)", "reported top-1"] + (["reported top-5"] if has_top5 else []) + ["reported on"]
    best_column = not one_head and not on_report
    head += ["best-of-sweep on the reported split: top-1 (lr)"] if best_column else []
    versus = (digest or digest_of(rows)).versus
    if versus:
        head += [f"Δ vs {versus.reference} [95% CI]", "McNemar p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for key, rs in groups.items():
        sel = next(r for r in rs if r["selected"])
        cells = [sel["label"], sel["encoder"] or "—"] + ([sel["view"]] if multi_view else [])
        cells += [f"{sel['lr']:g}"]
        cells += [f"{sel['wd']:g}"] if show_wd else []
        reported = fmt_interval(sel["report_top1_pct"], (sel.get("ci95_low"), sel.get("ci95_high")), digits=2) if sel["report_top1_pct"] is not None else "—"
        cells += [f"{_pct(sel['select_top1_pct'])} ({_selection_words(sel, protocol)})", reported]
        cells += [_pct(sel["report_top5_pct"])] if has_top5 else []
        cells += [sel["reported_as"]]
        if best_column:
            best = next((r for r in rs if r["best_report"]), None)
            cells += [f"{_pct(best['report_top1_pct'])} ({best['lr']:g})" if best else "— (nothing reported)"]
        if versus:
            cells += _versus_cells(versus, ConfigKey.of_row(sel))
        lines.append("| " + " | ".join(cells) + " |")
    r0 = rows[0]
    notes = f"protocol {r0['protocol_hash']}: {r0['optimizer']}, {r0['epochs']} epochs, batch {r0['batch_size']}, normalize {r0['normalize']}, seed {r0['seed']}, select on {r0['select_on']}"
    if any(r.get("ci95_low") is not None for r in rows):
        notes += f"; [95% CI]: percentile bootstrap over the reported images ({N_RESAMPLES} resamples)"
    if versus:
        notes += f"; Δ: top-1 minus {versus.reference}'s on the same images, paired bootstrap interval, McNemar exact test (probe compare for per-class detail)"
    if on_report:
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
    return [f"{fmt_interval(s.delta_mean, s.delta_mean_ci95, digits=2, signed=True)} (± {s.delta_std:.2f} over {len(s.seeds)} seeds)", "per seed: probe compare"]


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


_OURS = (RESULTS, PROTOCOL, PLOT, SUMMARY, PREDICTIONS)


def check_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that would lose results: a file, a folder holding anything (unless
    ``overwrite``), or, even with ``overwrite``, a folder that is not a previous probe run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file", "pass a folder (it is created if missing)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise UsageError(f"--out {str(out)!r} already holds {', '.join(held[:3])}{'…' if len(held) > 3 else ''}",
                         "pass a new --out folder, or --overwrite to replace a previous run")  # fmt: skip
    if held and not any(name in _OURS for name in held):
        raise UsageError(f"--out {str(out)!r} holds files that are not probe results ({', '.join(held[:3])})", "pass a new or empty --out folder")
    return out


def new_run_folder(parent: str | os.PathLike) -> Path:
    """A fresh ``parent/run-YYYYMMDD-HHMMSS[-N]`` path (not created): the default results folder."""
    base = Path(parent) / time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_outputs(
    rows: list[dict], protocol: Protocol, out: str | os.PathLike, run: dict | None = None, overwrite: bool = False, digest: Digest | None = None
) -> dict[str, Path]:
    """Write results.csv, summary.csv, protocol.json, predictions.csv and (with linear rows)
    accuracy_vs_lr.png as the folder ``out``, all or nothing. ``digest``: the rows'
    :func:`digest_of` when the caller holds it (summary.csv is its ``summary``)."""
    out = Path(os.path.abspath(check_out(out, overwrite)))  # absolute: "." has no name to build beside
    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    try:
        (build / RESULTS).write_text(csv_text(rows))
        (build / PROTOCOL).write_text(protocol_json(protocol, run))
        (build / SUMMARY).write_text(summary_csv(digest.summary if digest else summary(rows)))
        write_predictions(predictions_of(rows), build / PREDICTIONS)
        written = [SUMMARY, PROTOCOL, PREDICTIONS, RESULTS]
        if plot_rows(rows):
            plot(rows, build / PLOT, protocol)
            written.insert(0, PLOT)
        if out.exists():
            # an empty folder, or a previous run with --overwrite (checked above): its files are
            # replaced one by one, results.csv last (its presence means the run finished); the
            # folder itself (owner, permissions, a mount point) and other files stay; a plot
            # of a previous run that this run has none of is removed, not left to mislead
            for name in written:
                os.replace(build / name, out / name)
            if PLOT not in written:
                (out / PLOT).unlink(missing_ok=True)
        else:
            os.replace(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return {name: out / name for name in written}
