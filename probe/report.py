"""Outputs of a probe run: results.csv, protocol.json, accuracy_vs_lr.png and a markdown summary.

Everything is rendered to temp files in the output folder first and renamed into place only
after all of them were written, so a failed run never leaves a half-written results.csv.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

from featstore import __version__
from featstore.errors import UsageError

from .fit import COLUMNS
from .protocol import Protocol

RESULTS, PROTOCOL, PLOT = "results.csv", "protocol.json", "accuracy_vs_lr.png"


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


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by store × view (one probe each), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["store"], r["view"]), []).append(r)
    return groups


def _label(store: str, view: str, multi_view: bool) -> str:
    name = Path(store).name or store
    return f"{name} [{view}]" if multi_view else name


def plot(rows: list[dict], path: Path) -> None:
    """Validation and test top-1 against LR (log axis), one line per store (× view × wd), selected LR starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    multi_view = len({v for _, v in groups}) > 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((store, view), rs) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        wds = sorted({r["wd"] for r in rs})
        for j, wd in enumerate(wds):
            line = sorted((r for r in rs if r["wd"] == wd), key=lambda r: r["lr"])
            label = _label(store, view, multi_view) + (f" wd={wd:g}" if len(wds) > 1 else "")
            style = ["-", "--", ":", "-."][j % 4]
            for ax, key in ((axes[0], "val_top1"), (axes[1], "test_top1")):
                pts = [(r["lr"], r[key]) for r in line if r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color, label=label)
        sel = next(r for r in rs if r["selected"])
        for ax, key in ((axes[0], "val_top1"), (axes[1], "test_top1")):
            if sel[key] is not None:
                ax.plot(sel["lr"], sel[key], "*", ms=14, color=color, markeredgecolor="black", zorder=5)
    val_names = sorted({r["val_split"] for r in rows})
    axes[0].set_title(f"selection split ({' / '.join(val_names)}) top-1; ★ = selected")
    axes[1].set_title("test top-1 of every head; ★ = the selected head")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"linear probe LR sweep — protocol {rows[0]['protocol_hash']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _pct(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict]) -> str:
    """Per store × view: the fixed-LR result (one head) or the selected LR, its test top-1, and the
    best-of-sweep head by test accuracy, labelled as such."""
    groups = _groups(rows)
    multi_view = len({v for _, v in groups}) > 1
    one_head = all(len(rs) == 1 for rs in groups.values())
    multi_wd = any(len({r["wd"] for r in rs}) > 1 for rs in groups.values())
    no_test = any(r["report_split"] != "test" for r in rows)
    has_top5 = any(r["test_top5"] is not None or r["val_top5"] is not None for r in rows)
    head = ["store", "encoder"] + (["view"] if multi_view else [])
    head += ["lr (fixed)"] if one_head else ["selected lr"]
    head += ["wd"] if multi_wd or one_head and rows[0]["wd"] else []
    head += ["val top-1", "test top-1"] + (["test top-5"] if has_top5 else [])
    head += ["reported on"] if no_test else []
    head += [] if one_head else ["best-of-sweep test top-1 (lr)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (store, view), rs in groups.items():
        sel = next(r for r in rs if r["selected"])
        reported = sel["test_top1"] if sel["report_split"] == "test" else sel["val_top1"]
        reported5 = sel["test_top5"] if sel["report_split"] == "test" else sel["val_top5"]
        cells = [store, sel["encoder"] or "—"] + ([view] if multi_view else [])
        cells += [f"{sel['lr']:g}"]
        cells += [f"{sel['wd']:g}"] if multi_wd or one_head and rows[0]["wd"] else []
        cells += [f"{_pct(sel['val_top1'])} ({sel['val_split']})", _pct(reported)] + ([_pct(reported5)] if has_top5 else [])
        if no_test:
            cells += ["test" if sel["report_split"] == "test" else f"{sel['report_split']} (no test split; also used for selection)"]
        if not one_head:
            best = next((r for r in rs if r["best_test"]), None)
            cells += [f"{_pct(best['test_top1'])} ({best['lr']:g})" if best else "— (no test split)"]
        lines.append("| " + " | ".join(cells) + " |")
    r0 = rows[0]
    notes = f"protocol {r0['protocol_hash']}: {r0['optimizer']}, {r0['epochs']} epochs, batch {r0['batch_size']}, normalize {r0['normalize']}, seed {r0['seed']}"
    if not one_head:
        notes += "; selected = highest val top-1 (ties → smaller lr); best-of-sweep is picked on test, for comparison with papers only"
    return "\n".join(lines) + "\n\n" + notes + "\n"


def write_outputs(rows: list[dict], protocol: Protocol, out: str | os.PathLike, run: dict | None = None) -> dict[str, Path]:
    """Write results.csv, protocol.json and accuracy_vs_lr.png into ``out``, all or nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file", "pass a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    tag = f".{os.getpid()}.tmp"
    final = {name: out / name for name in (RESULTS, PROTOCOL, PLOT)}
    temps = {name: out / f".{name}{tag}" for name in final}
    try:
        temps[RESULTS].write_text(csv_text(rows))
        temps[PROTOCOL].write_text(protocol_json(protocol, run))
        plot(rows, temps[PLOT])
        for name in (PLOT, PROTOCOL, RESULTS):  # results.csv last: its presence means the run finished
            os.replace(temps[name], final[name])
    finally:
        for t in temps.values():
            t.unlink(missing_ok=True)
    return final
