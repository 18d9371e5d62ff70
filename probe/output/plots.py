"""accuracy_vs_lr.png: every head's accuracy against its learning rate, one line per store × view,
the selected head starred; the line styles and legend placement report.html shares."""

from __future__ import annotations

import textwrap
from pathlib import Path

from ..protocol import Protocol
from ..results.rows import by_probe, chosen_on_report, chosen_on_selection, is_battery, probe_name, selection_words, sweep_rows

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


def plot_title(rows: list[dict], protocol: Protocol | None = None) -> str:
    """Dataset, view(s) and protocol: what a reader needs to know which numbers these are."""
    r0 = rows[0]
    groups = by_probe(rows)
    datasets = " / ".join(dict.fromkeys(str(r["dataset"] or "unknown dataset") for r in rows))
    views = list(dict.fromkeys(k[1] for k in groups))
    if len(views) == 1:
        view_text = f"view {views[0]}"
    elif len({k[0] for k in groups}) == len(groups):  # one view per store: say which
        view_text = "views " + ", ".join(f"{k[0]}: {k[1]}" for k in groups)
    else:
        view_text = "views " + ", ".join(views)
    fixed = all(len({r["lr"] for r in rs}) == 1 for rs in groups.values())
    how = f"fixed lr {r0['lr']:g}, nothing selected" if fixed else f"select on {r0['select_on']}"
    return (
        f"{datasets} — linear probe, {view_text}\n{r0['optimizer']}, {r0['epochs']} epochs, batch {r0['batch_size']}, "
        f"normalize {r0['normalize']}, seed {r0['seed']}, {how} — protocol {r0['protocol_hash']}"
    )


def plot_panels(rows: list[dict], protocol: Protocol | None = None) -> list[tuple[str, str]]:
    """(column, title) of each panel: only what exists. No reported panel when nothing is
    reported; one panel, titled max over the reported split, when the LR was chosen on it."""
    on_report = all(chosen_on_report(r) for r in rows)
    select_splits = " / ".join(dict.fromkeys(selection_words(r, protocol) for r in rows))
    report_splits = " / ".join(dict.fromkeys(str(r["report_split"]) for r in rows if r["report_split"] is not None))
    if on_report:
        return [("report_top1_pct", f"{report_splits} top-1: max over the reported split (the LR is chosen on it)")]
    panels = [("select_top1_pct", f"selection: {select_splits} top-1; ★ = selected head")]
    if any(r["report_top1_pct"] is not None for r in rows):
        if any(r.get("refit") for r in rows):  # the reported number is the refit's, not the star's
            panels.append(("report_top1_pct", f"reported: {report_splits} top-1; ★ = selected head, ◆ = its refit (reported)"))
        else:
            panels.append(("report_top1_pct", f"reported: {report_splits} top-1 of every head; ★ = the selected head"))
    return panels


def plot_rows(rows: list[dict]) -> list[dict]:
    """The rows the LR plot shows: the linear heads of the first seed and training-set size."""
    linear = [r for r in rows if r.get("method", "linear") == "linear"]
    if not linear:
        return []
    first = (linear[0]["seed"], linear[0].get("shots"))
    return [r for r in linear if (r["seed"], r.get("shots")) == first]


PLOT, FIXED_PLOT = "accuracy_vs_lr.png", "accuracy.png"


def is_fixed(rows: list[dict]) -> bool:
    """A fixed learning rate: every linear probe of the plotted rows trained a single head (one
    lr × wd); its refit is that head trained again on train + holdout, not a second setting."""
    return all(len(sweep_rows(rs)) == 1 for rs in by_probe(plot_rows(rows)).values())


def plot_name(rows: list[dict]) -> str | None:
    """The figure a run gets: accuracy_vs_lr.png for an LR sweep, accuracy.png (each store's
    accuracy with its interval) for a fixed LR with a reported split, none without linear rows."""
    shown = plot_rows(rows)
    if not shown:
        return None
    if is_fixed(rows):
        return FIXED_PLOT if any(r["report_top1_pct"] is not None for r in shown) else None
    return PLOT


def fixed_figure(rows: list[dict], protocol: Protocol | None = None, note: str | None = None):
    """A fixed LR selects nothing, so there is no LR axis: each store × view's reported top-1 with
    its 95% interval (percentile bootstrap over the images; Wilson where there is none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the reported row of each probe: the refit where there is one, not the head it trained again
    shown = [r for r in rows if r["selected"] and r["report_top1_pct"] is not None]
    with_view = len({r["view"] for r in shown}) > 1
    fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(shown) + 1.9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for y, r in enumerate(reversed(shown)):
        boot = r.get("ci95_low") is not None
        lo, hi = (r["ci95_low"], r["ci95_high"]) if boot else (r.get("wilson95_low"), r.get("wilson95_high"))
        top = r["report_top1_pct"]
        color = colors[(len(shown) - 1 - y) % len(colors)]
        if lo is not None:
            ax.errorbar(top, y, xerr=[[top - lo], [hi - top]], fmt="o", color=color, capsize=4, ms=7)
            text = f"{top:.1f} [{lo:.1f}, {hi:.1f}]" + ("" if boot else " Wilson")
        else:
            ax.plot(top, y, "o", color=color, ms=7)
            text = f"{top:.1f}"
        ax.annotate(text, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([probe_name((r["label"], r["view"]), with_view) for r in reversed(shown)])
    ax.set_ylim(-0.6, len(shown) - 0.4)
    splits = " / ".join(dict.fromkeys(str(r["report_split"]) for r in shown))
    refit = "; trained on train + holdout (refit)" if any(r.get("refit") for r in shown) else ""
    ax.set_xlabel(f"{splits} top-1 accuracy (%), 95% interval{refit}")
    ax.grid(axis="x", alpha=0.3)
    title = plot_title(rows, protocol) + (f"\n{note}" if note else "")
    width = int(fig.get_figwidth() * 12)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=9)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: Path, protocol: Protocol | None = None) -> None:
    """Write :func:`figure` of :func:`plot_rows` as a PNG (:func:`fixed_figure` for a fixed LR)."""
    shown = plot_rows(rows)
    note = None
    if is_battery(rows):
        seeds = list(dict.fromkeys(r["seed"] for r in rows))
        size = "every training row" if shown[0].get("shots") is None else f"{shown[0]['shots']} per class"
        note = (
            f"the linear probe of seed {shown[0]['seed']}"
            + (f" (of {len(seeds)})" if len(seeds) > 1 else "")
            + f", {size}; all methods, seeds and sizes: summary.csv"
        )
    fig = fixed_figure(shown, protocol, note) if is_fixed(rows) else figure(shown, protocol, note)
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

    groups = by_probe(rows)
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
        chosen = chosen_on_selection(rs, sel)  # the star's head; sel is its refit when they differ
        rs = sweep_rows(rs)
        color = colors[styles[(key[0], key[1], sel["wd"])][0] % len(colors)]  # the store's (or line's) colour
        for wd in wds:
            line = sorted((r for r in rs if r["wd"] == wd), key=lambda r: r["lr"])
            name = probe_name(key, with_view) + (f" wd={wd:g}" if len(wds) > 1 else "")
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
            if sel is not chosen and sel[col] is not None:  # the reported refit (train + holdout), beside its sweep head
                ax.plot(sel["lr"], sel[col], "D", ms=7, color=color, markeredgecolor="black", zorder=6)
            if chosen[col] is None:
                continue
            ax.plot(sel["lr"], chosen[col], "*", ms=14, color=color, markeredgecolor="black", zorder=5)
            if several:
                continue
            # the selected head tops its selection curve: inside the grid the space below the star is
            # free, at an end of the grid the space beside it (towards the axes' inside)
            end = "right" if sel["lr"] == max(lr_span) else "left" if sel["lr"] == min(lr_span) else None
            offset = (0, -17) if end is None else (-11 if end == "right" else 11, 0)
            ax.annotate(
                f"lr {sel['lr']:g}",
                (sel["lr"], chosen[col]),
                textcoords="offset points",
                xytext=offset,
                ha=end or "center",
                va="top" if end is None else "center",
                fontsize=8,
                color=color,
                fontweight="bold",
                zorder=6,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
            )
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
