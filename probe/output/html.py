"""``report.html``: one self-contained page (figures embedded as base64 PNG) per leaderboard.

Per group: the leaderboard table, accuracy vs LR of every store overlaid, a forest plot of each
encoder's accuracy with its 95% interval, per-class difference bars against the reference, and
the protocol record.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

from ..comparison import fmt_interval, fmt_p
from ..results.predictions import ConfigKey
from ..results.rows import chosen_on_selection, sweep_rows
from ..results.runs import reported_top1, row_label, selection_top1
from .leaderboard import (
    SELECTED_COLUMN,
    TEXT_COLUMNS,
    differences,
    fixed_or_sweep,
    notes,
    selects,
    table_cells,
    table_head,
    table_rows,
    titles,
)
from .plots import line_styles, place_legends

_MAX_CLASS_BARS = 40  # more classes than this: the 20 largest gains and the 20 largest losses


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lr_figure(group) -> str | None:
    """Selection-split and report-split top-1 against LR, one line per store × view, selected starred."""
    plt = _pyplot()
    lines = []
    first_seed: dict[tuple, int] = {}  # one curve per store × view × shots: its first seed (the seeds overlap)
    for e in group.entries:
        if e.key.method != "linear" or first_seed.setdefault((e.label, e.key.view, e.key.shots), e.key.seed) != e.key.seed:
            continue
        key = ConfigKey.of_row(e.row, row_label(e.row))  # under the run's own label (e.label may be renamed)
        rows = [r for r in e.run.rows if ConfigKey.of_row(r, row_label(r)) == key and r.get("lr") is not None]
        if len({r["lr"] for r in rows}) > 1:
            lines.append((e, sorted(rows, key=lambda r: r["lr"])))  # a refit row (its star's ◆) is drawn apart
    if not lines:
        return None
    split = group.fields["report split"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = line_styles(((e.label, e.row["view"], e.key.shots) for e, _ in lines), len(colors))
    for e, rows in lines:
        color_index, style, marker = styles[(e.label, e.row["view"], e.key.shots)]
        color = colors[color_index % len(colors)]
        name = f"{e.label} [{e.row['view']}]" + (f" {e.key.shots}-shot" if e.key.shots else "")
        chosen = chosen_on_selection(rows, e.row)  # e.row itself, or the sweep head it refits
        for ax, get in ((axes[0], selection_top1), (axes[1], reported_top1)):
            pts = [(r["lr"], get(r)) for r in sweep_rows(rows) if get(r) is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, ms=3, color=color, label=name)
            if get(chosen) is not None:
                ax.plot(e.row["lr"], get(chosen), "*", ms=14, color=color, markeredgecolor="black", zorder=5)
            if chosen is not e.row and get(e.row) is not None:  # the reported refit (train + holdout)
                ax.plot(e.row["lr"], get(e.row), "D", ms=7, color=color, markeredgecolor="black", zorder=6)
    selection = {r.get("select_split") or r.get("val_split") for r in group.entries[0].run.selected} - {None}
    axes[0].set_title(f"selection split ({', '.join(sorted(selection)) or 'val'})")
    axes[1].set_title(f"report split ({split})")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    refit = any(e.row.get("refit") for e, _ in lines)
    fig.suptitle(
        "accuracy vs learning rate (★ = selected on the selection split"
        + ("; ◆ = its refit on train + holdout, reported)" if refit else ")")
    )
    fig.tight_layout(rect=place_legends(fig, axes, max(len(lines), 2)))  # a legend even for one line, as the caption names it
    return _png(fig)


def _probe_name(r: dict, methods: bool, seeds: bool) -> str:
    words = (
        [r["view"]]
        + ([r["method"]] if methods else [])
        + ([f"{r['shots']}-shot" if r["shots"] else "all"] if r.get("several_shots") else [])
    )
    return f"{r['label']} [{' '.join(words)}]" + (f" seed {r['seed']}" if seeds and r.get("seed") is not None else "")


def forest_figure(group, rows: list[dict]) -> str | None:
    """:func:`forest` as an embedded PNG; None when no row has a top-1."""
    fig = forest(group, rows)
    return None if fig is None else _png(fig)


def forest(group, rows: list[dict]):
    """Two panels on one row per store: its own top-1 with its 95% interval (bootstrap; Wilson
    where no predictions exist), and beside it the paired difference to the reference on the
    same images with its paired bootstrap interval (the number that says whether a store is
    better). Rows over seeds show the seed-mean and its interval."""
    plt = _pyplot()
    items = [r for r in rows if r["top1"] is not None]
    if not items:
        return None
    methods = len({i["method"] for i in items}) > 1
    shots = len({i["shots"] for i in items}) > 1
    seeds = len({i.get("seed") for i in items}) > 1
    items = [{**r, "several_shots": shots} for r in items]
    paired = any(r["delta"] is not None for r in items)
    ref = group.comparison.reference if group.comparison else None
    height = 0.42 * len(items) + 1.5
    if paired:
        fig, (ax, dx) = plt.subplots(1, 2, figsize=(13, height), sharey=True, gridspec_kw={"width_ratios": [1, 1], "wspace": 0.55})
    else:
        fig, ax = plt.subplots(figsize=(9, height))
        dx = None
    ref_values = []
    for y, r in enumerate(reversed(items)):
        boot = r["ci95_low"] is not None
        lo, hi = (r["ci95_low"], r["ci95_high"]) if boot else (r["wilson95_low"], r["wilson95_high"])
        is_ref = r["label"] == r["reference"]
        color = "black" if is_ref else "tab:blue"
        if lo is not None and not math.isnan(lo):
            ax.errorbar(r["top1"], y, xerr=[[r["top1"] - lo], [hi - r["top1"]]], fmt="s" if is_ref else "o", color=color, capsize=4, ms=6)
        else:
            ax.plot(r["top1"], y, "o", color=color)
        ref_values += [r["top1"]] if is_ref else []
        spread = f" ± {r['top1_std']:.1f}" if r.get("top1_std") is not None else ""
        text = fmt_interval(r["top1"], (lo, hi)) + spread + ("" if boot else " (Wilson)")
        ax.annotate(text, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
        if dx is None:
            continue
        if is_ref:
            dx.plot(0, y, "s", color="black", ms=6)
            dx.annotate("reference", (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
        elif r["delta"] is not None:
            dlo, dhi = r["delta_ci95_low"], r["delta_ci95_high"]
            clear = dlo is not None and (dlo > 0 or dhi < 0)
            dcolor = ("tab:green" if r["delta"] > 0 else "tab:red") if clear else "tab:gray"
            if dlo is not None:
                dx.errorbar(r["delta"], y, xerr=[[r["delta"] - dlo], [dhi - r["delta"]]], fmt="o", color=dcolor, capsize=4, ms=6)
            else:
                dx.plot(r["delta"], y, "o", color=dcolor)
            p = f", p {fmt_p(r['p'])}" if r.get("p") is not None else ""
            dx.annotate(
                fmt_interval(r["delta"], (dlo, dhi), signed=True) + p,
                (1.01, y),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=8,
            )
    if len(ref_values) == 1:  # several reference rows (methods, seeds): their squares mark them
        ax.axvline(ref_values[0], color="gray", ls="--", lw=1)  # no legend: it would cover a row; the caption says it
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([_probe_name(r, methods, seeds) for r in reversed(items)])
    over = " (mean over seeds)" if any(r.get("n_seeds", 1) > 1 for r in items) else ""
    ax.set_xlabel(f"top-1 on {group.fields['report split']} (%){over}, 95% interval")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("each store's accuracy" + (f" (squares: the reference, {ref})" if len(ref_values) > 1 else ""), fontsize=10)
    if dx is not None:
        dx.axvline(0, color="black", lw=0.8)
        dx.set_xlabel(f"Δ top-1 vs {ref} (points){over}, paired 95% interval")
        dx.grid(axis="x", alpha=0.3)
        dx.set_title(f"paired difference to {ref} on the same images", fontsize=10)
    return fig


def class_figure(group, report) -> str:
    """Per-class difference (store − reference, points), largest gain on top."""
    plt = _pyplot()
    comp = group.comparison
    classes = report.classes
    if len(classes) > _MAX_CLASS_BARS:
        half = _MAX_CLASS_BARS // 2
        classes = classes[:half] + classes[-half:]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(classes) + 1.5))
    ys = list(range(len(classes)))[::-1]
    deltas = [d.delta for d in classes]
    ax.barh(ys, deltas, color=["tab:green" if d > 0 else "tab:red" if d < 0 else "gray" for d in deltas])
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{comp.class_name(d.target)} ({d.top1_reference:.0f}→{d.top1:.0f}, n={d.n})" for d in classes], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"Δ top-1 vs {comp.reference} [{report.reference_view}] (points)")
    shown = "" if len(classes) == len(report.classes) else f" — {len(classes)} largest gains and losses of {len(report.classes)}"
    # the probe always named: beside a k-NN panel, an unnamed linear one reads as "the" result
    what = f"{report.label} [{report.view} {report.method}" + (f" {report.shots}-shot" if report.shots else "") + "]"
    ax.set_title(f"per class: {what} vs {comp.reference}{shown}")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
div.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.8em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.4em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; vertical-align: bottom; }
td.text { text-align: left; white-space: normal; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 1em; font-size: 0.85em; white-space: pre-wrap; overflow-wrap: anywhere; }
.note { color: #555; font-size: 0.9em; }
"""


def _figure(fig_id: str, png: str, caption: str) -> str:
    return (
        f'<figure id="{fig_id}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _breakable(text: str) -> str:
    """``text`` escaped, with line-break opportunities after path separators: an encoder such as
    ``/long/path/encoder.py:build`` wraps there instead of widening the table past the page."""
    return html.escape(text).replace("/", "/<wbr>").replace(":", ":<wbr>")


def _cell(column: int, text: str) -> str:
    if column in TEXT_COLUMNS:
        return f"<td class=text>{_breakable(text)}</td>"
    if column == SELECTED_COLUMN:  # several seeds' picks, one a line, not one line wider than the page
        return "<td>" + "<br>".join(html.escape(pick) for pick in text.split("; ")) + "</td>"
    return f"<td>{html.escape(text)}</td>"


def _table(group_rows: list[dict], reference: str | None, per_seed: bool = False, fixed: bool = False) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table_head(reference, per_seed, fixed)) + "</tr>"]
    for r in group_rows:
        cells = table_cells(r, reference, per_seed)
        out.append("<tr>" + "".join(_cell(i, c) for i, c in enumerate(cells)) + "</tr>")
    # headers and labels wrap, numbers never: the table fits the page's width (a scroll bar only as a last resort)
    return '<div class="table">' + "\n".join(out) + "</table></div>"


def _protocol(group) -> str:
    runs = [
        {
            "folder": str(run.folder),
            "protocol_hash": run.protocol_hash,
            **{k: v for k, v in (run.record.get("run") or {}).items() if k != "dataset"},
        }
        for run in group.runs
    ]
    dataset = {k: v for k, v in group.runs[0].dataset.items() if k != "class_names"}
    record = {
        "protocol_hash": group.runs[0].protocol_hash,
        "protocol": group.runs[0].record.get("protocol"),
        "dataset": dataset,
        "runs": runs,
    }
    return f"<pre>{html.escape(_compact_json(record))}</pre>"


def _compact_json(value, indent: int = 0) -> str:
    """Indented JSON with lists of plain values on one line (an LR grid reads as one line)."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {_compact_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(pad + _compact_json(v, indent + 1) for v in value) + "\n" + "  " * indent + "]"
    return json.dumps(value, default=str)


def render(groups, rows: list[dict], per_seed: bool = False) -> str:
    body = ["<h1>featstore probe report</h1>"]
    if len(groups) > 1:
        mixed = html.escape(differences([r for g in groups for r in g.runs]))
        body.append(
            f'<p class="note">{len(groups)} groups (--allow-mixed): the results differ in {mixed}. '
            "Each group is ranked on its own; results of different groups are not comparable.</p>"
        )
    names = titles(groups)
    plotted = table_rows(groups) if per_seed else rows  # the plots average the seeds, whatever the table shows
    for gi, g in enumerate(groups, start=1):
        ref = g.comparison.reference if g.comparison else None
        fixed = not selects(g.runs[0])
        body.append(f"<h2>{'group ' + str(gi) + ': ' if len(groups) > 1 else ''}{html.escape(names[gi - 1])}</h2>")
        mine = [r for r in rows if r["group"] == gi]
        body.append(_table(mine, ref, per_seed, fixed))
        body.append(
            f'<p class="note">{html.escape(notes(g, mine, per_seed))} n01: images only the store gets right, n10: only the reference.</p>'
        )
        lr = None if fixed else lr_figure(g)
        if lr:
            body.append(
                _figure(
                    f"g{gi}-lr",
                    lr,
                    "Accuracy vs learning rate of the linear probe, every store overlaid (first seed); the star is the LR selected on the selection split.",
                )
            )
        elif fixed:
            body.append(
                f'<p class="note">{html.escape(fixed_or_sweep(g.runs[0]))}: one configuration per method, nothing is selected; '
                "the figure below shows each store's accuracy with its interval.</p>"
            )
        else:
            body.append('<p class="note">No LR sweep of the linear probe in these results.</p>')
        shown = [r for r in plotted if r["group"] == gi]
        forest = forest_figure(g, shown)
        if forest:
            one_reference = sum(r["label"] == r.get("reference") for r in shown) == 1
            # the dashed line is drawn for a single reference row only (forest_figure): said only when drawn
            own = (
                "each store's top-1 with its 95% interval ("
                + ("squares and the dashed line" if one_reference else "squares")
                + ": the reference)"
            )
            paired = (
                f"Left: {own}. Right: its paired difference to the reference on the same images, with the paired bootstrap "
                "95% interval (green/red: the interval excludes 0)."
                if any(r["delta"] is not None for r in shown)
                else own[0].upper() + own[1:] + "."
            )
            body.append(_figure(f"g{gi}-forest", forest, paired + " Several seeds: their mean."))
        if g.comparison:
            first_seed: dict[tuple, int] = {}  # one chart per store × view × method × shots: its first seed
            for c in g.comparison.per_class:
                first_seed.setdefault((c.label, c.view, c.method, c.shots), c.seed)
            charted = any(c.reference_view is not None for c in g.comparison.per_class)  # a single store has nothing to chart
            if charted:
                body.append("<h3>Per class, against the reference</h3>")
            if charted and len({c.seed for c in g.comparison.per_class}) > 1:
                body.append(
                    '<p class="note">With several seeds, the charts show each configuration\'s first seed; probe compare --json has every seed.</p>'
                )
            for i, c in enumerate(g.comparison.per_class):
                if c.reference_view is not None and first_seed[(c.label, c.view, c.method, c.shots)] == c.seed:
                    body.append(
                        _figure(
                            f"g{gi}-class-{i}",
                            class_figure(g, c),
                            f"Per-class top-1 difference, {c.label} [{c.view}] {c.method}{' ' + c.shots + '-shot' if c.shots else ''}{' seed ' + str(c.seed) if len(first_seed) < len(g.comparison.per_class) else ''} − {ref} [{c.reference_view}]; labels: reference→store accuracy.",
                        )
                    )
        else:
            body.append(
                '<p class="note">No per-image predictions in these results: intervals are Wilson intervals, no paired difference.</p>'
            )
        body.append("<h3>Protocol</h3>" + _protocol(g))
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>featstore probe report</title><style>{_CSS}</style></head>\n<body>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )
