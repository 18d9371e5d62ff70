"""``probe report`` of dense runs (``probe fit --task depth|seg``): leaderboard.md / .csv, report.html
and, with ``--markdown``, table.md.

Per run, report.html shows the selected head of each store, the paired comparison with the
reference (Δ with its paired bootstrap interval and Wilcoxon p, from :mod:`probe.dense.compare`),
a panel of the first :data:`PANEL_IMAGES` reported images (by store row, the same for every store):
image | ground truth | each store's prediction, and every head's metric against its learning rate;
a segmentation run also each class's IoU per store and Δ IoU to the reference (per_class_iou.csv too).
The predictions come from ``--save-predictions`` (predictions/<store>.npz); the images are the
dataset's files through the store's resize and center crop; the truth is the store's targets.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featstore.atomic import atomic_file
from featstore.errors import FeatstoreError, UsageError
from featstore.preprocess import Preprocess, center_crop_offset, resized_size
from featstore.store import IGNORE, FeatureStore, read_targets, target_info

from ..multiple_testing import holm
from ..output import paper
from ..output.html import _CSS, _compact_json, _figure, _png, _pyplot
from ..output.leaderboard import LEADERBOARD_CSV, LEADERBOARD_MD, REPORT_HTML
from ..output.plots import line_styles, place_legends
from ..results import markdown_cells, table_csv
from .compare import DAMAGED_NPZ, ClassIoU, Difference, compare_dense, is_dense_run, per_class_iou, read_run_files, safe_name

PANEL_IMAGES = 4  # images shown per run: the first reported rows every store has predictions for
TABLE_MD, TABLE_TEX = "table.md", "table.tex"
PER_CLASS_CSV = "per_class_iou.csv"
KIND = {"depth": "depth", "seg": "mask"}
SUMMARY = {"depth": ("rmse", "absrel", "delta1", "rmse_ssa", "delta1_ssa"), "seg": ("miou", "pixel_acc")}
NAMES = {"rmse": "RMSE (m)", "absrel": "AbsRel", "delta1": "δ1", "rmse_ssa": "RMSE aligned", "delta1_ssa": "δ1 aligned",
         "miou": "mIoU", "pixel_acc": "pixel acc"}  # fmt: skip
SELECTION_METRIC = {"depth": "rmse", "seg": "miou"}
GREY = (128, 128, 128)  # ignore (mask 255) and no depth (0)


@dataclass
class DenseRun:
    """One results folder of ``probe fit --task depth|seg``."""

    folder: Path
    record: dict[str, Any]
    rows: list[dict[str, Any]]  # results.csv
    images: list[dict[str, Any]]  # predictions.csv

    @property
    def task(self) -> str:
        return str(self.record["task"])

    @property
    def stores(self) -> list[dict[str, str]]:
        return list(self.record["run"]["stores"])

    @property
    def labels(self) -> list[str]:
        return [s["label"] for s in self.stores]

    def selected(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("selected") is True]


_TEXT = {"store", "path", "view", "task", "head", "split", "select_split", "report_split"}  # a label such as "1e3" stays a label


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with table_csv.reading(path) as (_, lines):
        return [{k: table_csv.value(v, k in _TEXT) for k, v in r.items() if v != ""} for _, r in lines]


def load_run(folder: str | os.PathLike[str]) -> DenseRun:
    folder = Path(folder)
    try:
        record = json.loads((folder / "protocol.json").read_text())
        results = _read_csv(folder / "results.csv")
        if not results:
            raise UsageError(f"{str(folder / 'results.csv')!r} has no rows", "rerun probe fit --task depth|seg --out")
        return DenseRun(folder, record, results, _read_csv(folder / "predictions.csv"))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{str(folder)!r} is not a complete dense results folder ({e})", "rerun probe fit --task depth|seg --out") from e


# ---------------------------------------------------------------- the image panel


@dataclass
class Panel:
    """What the panel shows: per image its crop (or None), truth and each store's prediction."""

    task: str
    split: str
    rows: np.ndarray  # store rows of the reported split
    labels: list[str]  # stores with saved predictions, in run order
    predictions: dict[str, np.ndarray]  # label → (n, H, W)
    truth: np.ndarray | None  # (n, H, W): depth metres or mask classes
    images: list[np.ndarray | None]  # (H, W, 3) uint8 crops; None where the file is gone
    scores: dict[tuple[str, int], float]  # (label, row) → the image's RMSE / mIoU
    class_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def depth_range(self, i: int) -> tuple[float, float]:
        """The colour range of row ``i`` of the panel: the truth's depths, else the predictions'."""
        values = self.truth[i][self.truth[i] > 0] if self.truth is not None else np.empty(0)
        if values.size == 0:
            values = np.concatenate([p[i].ravel() for p in self.predictions.values()])
        return float(values.min()), float(values.max())


def _crop(path: Path, pre: Preprocess) -> np.ndarray:
    """The image as the store saw it: upright, its shorter side resized to ``pre.resize`` (torchvision's
    size rule), the center ``pre.image_size`` square cropped."""
    from PIL import Image

    from featstore.orientation import upright

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}
    with Image.open(path) as file:
        im = upright(file).convert("RGB")
    h, w = resized_size(im.height, im.width, pre.resize)
    im = im.resize((w, h), filters[pre.interpolation])
    top, left = center_crop_offset(h, pre.image_size), center_crop_offset(w, pre.image_size)
    return np.asarray(im.crop((left, top, left + pre.image_size, top + pre.image_size)))


def panel(run: DenseRun, n: int = PANEL_IMAGES) -> Panel:
    """The first ``n`` reported rows every store with saved predictions has, with their truth and crops."""
    saved: dict[str, Any] = {}  # label → (its npz, its rows, its split)
    damaged: list[str] = []  # a file cut short or overwritten: left out of the panel, with a note
    notes = []
    for label in run.labels:
        path = run.folder / "predictions" / f"{safe_name(label)}.npz"
        if path.is_file():
            try:
                npz = np.load(path)
                saved[label] = (npz, np.asarray(npz["rows"]).tolist(), str(npz["split"]))
            except DAMAGED_NPZ:
                damaged.append(label)
    missing = [label for label in run.labels if label not in saved and label not in damaged]
    if missing:
        notes.append(f"no saved predictions for {', '.join(missing)}: rerun its probe fit with --save-predictions to show "
                     f"{'them' if len(missing) > 1 else 'it'} here")  # fmt: skip
    scores = {(str(r["store"]), int(r["row"])): float(r.get(SELECTION_METRIC[run.task], np.nan)) for r in run.images}
    common = sorted(set.intersection(*(set(rows) for _, rows, _ in saved.values()))) if saved else []
    rows = np.asarray(common[:n], np.int64)
    predictions = {}
    for label, (npz, stored, _) in saved.items():  # each array decompressed once, only the panel's rows kept
        where = {int(r): i for i, r in enumerate(stored)}
        try:
            predictions[label] = np.asarray(npz["prediction"])[[where[int(r)] for r in rows]]
        except DAMAGED_NPZ:
            damaged.append(label)
    if damaged:
        notes.append(f"the saved predictions of {', '.join(damaged)} are damaged (cut short or overwritten): rerun its probe fit "
                     "with --save-predictions to show them here")  # fmt: skip
    saved = {label: v for label, v in saved.items() if label in predictions}
    if not saved:
        return Panel(run.task, "", np.empty(0, np.int64), [], {}, None, [], scores, notes=notes)
    split = next(iter(saved.values()))[2]
    truth, class_names = None, []
    images: list[np.ndarray | None] = []
    store_path = next(s["path"] for s in run.stores if s["label"] in saved)
    try:
        fs = FeatureStore.open(store_path)
        truth = read_targets(fs, split, KIND[run.task], rows)
        class_names = [str(c) for c in target_info(fs).get("class_names") or []]
        pre = Preprocess.from_dict(fs.meta.preprocessing)
        root = Path(fs.meta.dataset.root or ".")
        for p in fs.paths(split)[rows]:
            file = Path(str(p)) if Path(str(p)).is_absolute() else root / str(p)
            try:
                images.append(_crop(file, pre))
            except OSError:
                images.append(None)
        gone = sum(i is None for i in images)
        if gone:
            notes.append(f"{gone} of the {len(images)} image files are no longer at the store's paths (under {str(root)!r})")
    except (FeatstoreError, OSError, KeyError) as e:
        notes.append(f"the store {store_path!r} cannot be read ({str(e).splitlines()[0]}): the image and truth columns are left out")
        images = [None] * len(rows)
    return Panel(run.task, split, rows, list(saved), predictions, truth, images, scores, class_names, notes)


def palette(classes: int = 256) -> np.ndarray:
    """(256, 3) uint8: PASCAL VOC's colour map (class i's colour from the bits of i), 255 grey."""
    out = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    out[IGNORE] = GREY
    return out


def colour_depth(depth: np.ndarray, low: float, high: float, cmap: str = "turbo") -> np.ndarray:
    """(H, W, 3) uint8 of ``depth`` on ``cmap`` over [low, high] (clipped); 0 (no depth) grey."""
    import matplotlib

    scaled = np.clip((depth - low) / max(high - low, 1e-6), 0, 1)
    rgb = (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)
    rgb[depth <= 0] = GREY
    return rgb


def panel_figure(p: Panel) -> Any:
    """Rows: the panel's images; columns: image | truth | each store's prediction."""
    plt = _pyplot()
    columns = ["image", "ground truth", *p.labels]
    n = len(p.rows)
    fig, axes = plt.subplots(
        n, len(columns), figsize=(2.1 * len(columns) + (0.8 if p.task == "depth" else 0), 2.2 * n + 0.6), squeeze=False
    )
    colours = palette()
    metric = "RMSE" if p.task == "depth" else "mIoU"
    for i, row in enumerate(p.rows.tolist()):
        low, high = p.depth_range(i) if p.task == "depth" else (0.0, 0.0)
        cells: list[np.ndarray | None] = [p.images[i] if i < len(p.images) else None, None if p.truth is None else p.truth[i]]
        cells += [p.predictions[label][i] for label in p.labels]
        for j, (ax, cell) in enumerate(zip(axes[i], cells)):
            ax.set_xticks([])
            ax.set_yticks([])
            if cell is None:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", fontsize=8, color="grey", transform=ax.transAxes)
            elif j == 0:
                ax.imshow(cell)
            elif p.task == "depth":
                ax.imshow(colour_depth(cell, low, high))
            else:
                ax.imshow(colours[cell])
            if i == 0:
                ax.set_title(columns[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{p.split} row {row}", fontsize=8)
            if j >= 2 and (columns[j], row) in p.scores:
                ax.set_xlabel(f"{metric} {p.scores[(columns[j], row)]:.3f}", fontsize=8)
        if p.task == "depth":
            import matplotlib

            bar = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(low, high), "turbo")
            fig.colorbar(bar, ax=list(axes[i]), fraction=0.02, pad=0.01).set_label("m", fontsize=8)
    if p.task == "seg":
        from matplotlib.patches import Patch

        shown = sorted({int(c) for a in ([p.truth] if p.truth is not None else []) + list(p.predictions.values()) for c in np.unique(a)})
        names = [(c, p.class_names[c] if c < len(p.class_names) else f"class {c}") for c in shown if c != IGNORE]
        handles = [Patch(color=tuple(float(v) / 255 for v in colours[c]), label=name) for c, name in names]  # type: ignore[arg-type]
        if IGNORE in shown:
            handles.append(Patch(color=tuple(v / 255 for v in GREY), label="ignore (255)"))  # type: ignore[arg-type]
        ncol = min(6, max(1, len(handles)))
        # room below the panels for every legend row (NYU's 40 classes: 7 rows), not a fixed share that they overflow
        width, height = fig.get_size_inches()
        legend = 0.2 * -(-len(handles) // ncol) + 0.15
        fig.set_size_inches(width, height + legend)
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, legend / (height + legend), 1, 1))
    return fig


# ---------------------------------------------------------------- the LR curves


def lr_figure(rows: Sequence[dict[str, Any]], task: str) -> Any | None:
    """The selection and report metric of every head (``results.csv`` rows) against its LR, one line
    per store (× wd): the report's figure and ``probe fit``'s own PNG."""
    metric = SELECTION_METRIC[task]
    keys = list(dict.fromkeys((str(r["store"]), "", r.get("wd", 0.0)) for r in rows))
    if len({r.get("lr") for r in rows}) < 2:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = line_styles(keys, len(colors))
    several_wd = len({k[2] for k in keys}) > 1
    for key in keys:
        label, _, wd = key
        mine = sorted((r for r in rows if str(r["store"]) == label and r.get("wd", 0.0) == wd), key=lambda r: r["lr"])
        c, style, marker = styles[key]
        for ax, name in ((axes[0], f"select_{metric}"), (axes[1], metric)):
            pts = [(r["lr"], r[name]) for r in mine if isinstance(r.get(name), float)]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, ms=3, color=colors[c % len(colors)],
                        label=label + (f" wd {wd:g}" if several_wd else ""))  # fmt: skip
            chosen = [r for r in mine if r.get("selected") is True and isinstance(r.get(name), float)]
            for r in chosen:
                ax.plot(r["lr"], r[name], "*", ms=14, color=colors[c % len(colors)], markeredgecolor="black", zorder=5)
    select = next((str(r["select_split"]) for r in rows if r.get("select_split")), "selection")
    report = next((str(r["report_split"]) for r in rows if r.get("report_split")), "report")
    axes[0].set_title(f"selection split ({select})")
    axes[1].set_title(f"report split ({report})")
    for ax in axes:
        ax.set_xscale("log")
        if metric == "rmse":  # an error: a head blown up by a high lr (1e16 m) would flatten every other curve on a linear axis
            ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3, which="both" if metric == "rmse" else "major")
    axes[0].set_ylabel(NAMES[metric] + (" (lower is better)" if metric == "rmse" else " (higher is better)"))
    fig.suptitle(f"dense {task} probe: every head of the grid (★ = selected on the selection split)")
    fig.tight_layout(rect=place_legends(fig, axes, max(len(keys), 2)))
    return fig


# ---------------------------------------------------------------- tables


def summary_rows(run: DenseRun) -> list[dict[str, Any]]:
    """One row per store: its selected head and the reported metrics."""
    out = []
    for r in run.selected():
        row = {"folder": str(run.folder), "task": run.task, "store": r["store"], "view": r.get("view"), "head": r.get("head"),
               "lr": r.get("lr"), "wd": r.get("wd"), "select_split": r.get("select_split"), "report_split": r.get("report_split"),
               "images": sum(1 for i in run.images if str(i["store"]) == str(r["store"]))}  # fmt: skip
        row.update({m: r.get(m) for m in SUMMARY[run.task]})
        out.append(row)
    return out


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def _signed(v: float) -> str:
    """A paper table's difference: signed, a true minus when negative."""
    return paper.number(v, 4, signed=True)


def summary_markdown(run: DenseRun) -> str:
    names = SUMMARY[run.task]
    head = ["store", "view", "lr", "wd", *(NAMES[m] for m in names), "images"]
    lines = [markdown_cells.row(head), "|" + "---|" * len(head)]
    for r in summary_rows(run):
        lines.append(markdown_cells.row([str(r["store"]), str(r["view"]), f"{r['lr']:g}", f"{r['wd']:g}", *(_num(r[m]) for m in names),
                                         str(r["images"])]))  # fmt: skip
    return "\n".join(lines)


def comparison_markdown(differences: Sequence[Difference]) -> str:
    lines = ["| store | reference | metric | store | reference | Δ | 95% paired interval | Wilcoxon p | images |", "|---|---|---|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for d in differences:
        lines.append(markdown_cells.row([d.store, d.reference, NAMES.get(d.metric, d.metric), f"{d.value:.4f}", f"{d.reference_value:.4f}",
                                         f"{d.delta:+.4f}", f"[{d.low:+.4f}, {d.high:+.4f}]", f"{d.p:.2g}", d.images]))  # fmt: skip
    return "\n".join(lines)


LOWER_IS_BETTER = frozenset({"rmse", "absrel", "log10", "rmse_ssa", "absrel_ssa"})


def paper_table(run: DenseRun, differences: Sequence[Difference], reference: str | None) -> paper.Table:
    """Per store its metrics (the best per column in bold, ties all bold), then Δ [95% interval] and
    the Wilcoxon p against the reference (in bold where the Holm-adjusted p over the table is < 0.05)."""
    names = SUMMARY[run.task]
    compared = [m for m in names if any(d.metric == m for d in differences)]
    rows = summary_rows(run)
    best = {}
    for m in names:
        values = [float(r[m]) for r in rows if r.get(m) not in (None, "")]
        best[m] = (min if m in LOWER_IS_BETTER else max)(values, default=None)
    by = {(d.store, d.metric): d for d in differences}
    adjusted = dict(zip([(d.store, d.metric) for d in differences], holm([d.p for d in differences])))
    out, bold = [], []
    for r in rows:
        store = str(r["store"])
        line, marks = [paper.literal(store)], [False]
        for m in names:
            line.append(_num(r[m]))
            marks.append(best[m] is not None and r.get(m) not in (None, "") and _num(float(r[m])) == _num(best[m]))
        for m in compared:
            d = by.get((store, m))
            line.append("reference" if d is None else f"{_signed(d.delta)} [{_signed(d.low)}, {_signed(d.high)}], p {paper.p_value(d.p)}")
            h = adjusted.get((store, m))
            marks.append(h is not None and h < paper.ALPHA)
        out.append(line)
        bold.append(marks)
    split = next((str(r["report_split"]) for r in rows), "report")
    what = ("Δ: store − reference on the same images, paired bootstrap 95% interval; $p$: Wilcoxon signed-rank on the per-image "
            f"differences, in bold where its Holm-adjusted $p$ over the table is < {paper.ALPHA:g}; the best value per metric in bold")  # fmt: skip
    caption = f"Dense {run.task} probe on the {split} split ({paper.literal(run.folder.name)}); {what}" + (
        f"; reference {paper.literal(reference)}." if reference else "."
    )
    head = ["store", *(NAMES[m] for m in names), *(f"Δ {NAMES[m]} [95% CI], p" for m in compared)]
    return paper.Table(head, out, bold, caption, align="l" + "r" * (len(head) - 1))


def paper_markdown(run: DenseRun, differences: Sequence[Difference], reference: str | None) -> str:
    """table.md: :func:`paper_table` as GitHub markdown."""
    return paper.markdown(paper_table(run, differences, reference))


def paper_latex(run: DenseRun, differences: Sequence[Difference], reference: str | None) -> str:
    """table.tex: :func:`paper_table` as a booktabs LaTeX table."""
    return paper.latex(paper_table(run, differences, reference))


def compare_paper_table(task: str, differences: Sequence[Difference]) -> paper.Table:
    """``probe compare --latex/--markdown`` of a dense run: each store × metric, Δ to the reference with
    its paired bootstrap 95% interval, the Wilcoxon p and the Holm-adjusted p over the table (bold < 0.05)."""
    adjusted = holm([d.p for d in differences])
    out = [[paper.literal(d.store), NAMES.get(d.metric, d.metric), f"{_signed(d.delta)} [{_signed(d.low)}, {_signed(d.high)}]", paper.p_value(d.p), paper.p_value(h)]
           for d, h in zip(differences, adjusted)]  # fmt: skip
    significant = [h is not None and h < paper.ALPHA for h in adjusted]
    reference = paper.literal(differences[0].reference) if differences else "the reference"
    caption = (f"Dense {task} probe: each store − {reference} on the same images, paired bootstrap 95% interval; Wilcoxon "
               f"signed-rank $p$ on the per-image differences, Holm-adjusted over the table; in bold: Holm $p$ < {paper.ALPHA:g}.")  # fmt: skip
    return paper.Table(["encoder", "metric", f"Δ vs {reference}", "Wilcoxon $p$", "Holm $p$"], out,
                       [[False, False, s, False, s] for s in significant], caption, align="llrrr")  # fmt: skip


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=text>{html.escape(c)}</td>" if i == 0 else f"<td>{html.escape(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>")  # fmt: skip
    return '<div class="table">' + "\n".join(out) + "</table></div>"


# ---------------------------------------------------------------- the report


def per_class_rows(labels: Sequence[str], reference: str | None, classes: list[ClassIoU]) -> tuple[list[str], list[list[str]]]:
    """The per-class table: class | IoU of each store | Δ of each other store to the reference [95% CI]."""
    others = [label for label in labels if reference is not None and label != reference]
    head = ["class", *(f"IoU {label}" for label in labels), *(f"Δ {label} − {reference} [95% CI]" for label in others)]
    iou = lambda v: "—" if not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
    delta = lambda d: "—" if not np.isfinite(d[0]) else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"  # noqa: E731
    rows = [[c.name, *(iou(c.iou[label]) for label in labels), *(delta(c.delta[label]) for label in others)] for c in classes]
    return head, rows


def per_class_markdown(labels: Sequence[str], reference: str | None, classes: list[ClassIoU]) -> str:
    head, body = per_class_rows(labels, reference, classes)
    title = "per class IoU" + (f" (Δ: store − {reference}, 95% paired bootstrap interval)" if reference else "") + ":"
    return "\n".join([title, "", markdown_cells.row(head), "|" + "---|" * len(head), *(markdown_cells.row(r) for r in body)])


def per_class_csv(runs: Sequence[DenseRun], references: Sequence[str | None], classes: Sequence[list[ClassIoU]]) -> str:
    """per_class_iou.csv: a row per run × class × store (Δ columns empty for the reference)."""
    out = []
    for run, ref, per in zip(runs, references, classes):
        for c in per:
            for label in run.labels:
                d = c.delta.get(label)
                out.append({"run": str(run.folder), "class": c.index, "name": c.name, "store": label, "iou": c.iou[label],
                            "reference": ref or "", "delta": d[0] if d else "", "delta_low": d[1] if d else "",
                            "delta_high": d[2] if d else ""})  # fmt: skip
    columns = ["run", "class", "name", "store", "iou", "reference", "delta", "delta_low", "delta_high"]
    return table_csv.csv_text(columns, out)


def class_names_of(run: DenseRun) -> list[str]:
    """The class names the run's first readable store records (none: "class k")."""
    for s in run.stores:
        try:
            return [str(c) for c in target_info(FeatureStore.open(s["path"])).get("class_names") or []]
        except (FeatstoreError, OSError, KeyError):
            continue
    return []


def _reference(run: DenseRun, reference: str | None) -> str | None:
    if len(run.labels) < 2:
        return None
    return reference if reference in run.labels else run.labels[0]


def _section(run: DenseRun, differences: list[Difference], reference: str | None, index: int, classes: list[ClassIoU]) -> str:
    body = [f"<h2>dense {html.escape(run.task)} probe: {html.escape(str(run.folder))}</h2>"]
    names = SUMMARY[run.task]
    body.append(
        _html_table(
            ["store", "view", "lr", "wd", *(NAMES[m] for m in names), "images"],
            [[str(r["store"]), str(r["view"]), f"{r['lr']:g}", f"{r['wd']:g}", *(_num(r[m]) for m in names), str(r["images"])]
             for r in summary_rows(run)],
        )
    )  # fmt: skip
    if differences:
        body.append(f"<h3>Against {html.escape(str(reference))}, on the same images</h3>")
        body.append(
            _html_table(
                ["store", "metric", "store", "reference", "Δ", "95% paired interval", "Wilcoxon p", "images"],
                [[d.store, NAMES.get(d.metric, d.metric), f"{d.value:.4f}", f"{d.reference_value:.4f}", f"{d.delta:+.4f}",
                  f"[{d.low:+.4f}, {d.high:+.4f}]", f"{d.p:.2g}", str(d.images)] for d in differences],
            )
        )  # fmt: skip
        body.append(
            '<p class="note">Δ = store − reference, the mean over images of the per-image differences (segmentation: of the '
            "summed confusion matrices); the interval is a paired percentile bootstrap over images, p the Wilcoxon "
            "signed-rank test on the per-image differences.</p>"
        )
    if classes:
        body.append("<h3>Per class IoU</h3>")
        body.append(_html_table(*per_class_rows(run.labels, reference, classes)))
        body.append(
            '<p class="note">IoU of each class over the reported images (the summed confusion matrices of the selected head); '
            "— where a class is in neither the truth nor the prediction. Δ = store − reference with its paired percentile "
            "bootstrap 95% interval over images.</p>"
        )
    p = panel(run)
    fig = panel_figure(p) if len(p.rows) else None
    for note in p.notes:
        body.append(f'<p class="note">{html.escape(note)}.</p>')
    if fig is not None:
        what = (
            "depth in metres, one colour range per row (the truth's), grey: no depth"
            if run.task == "depth"
            else "classes in PASCAL VOC's palette, grey: ignore (255)"
        )
        body.append(
            _figure(
                f"r{index}-panel",
                _png(fig),
                f"The first {len(p.rows)} reported images ({p.split} rows {', '.join(map(str, p.rows.tolist()))}): the image as the "
                f"store saw it (resized and center-cropped), the ground truth and each store's prediction under its selected head; "
                f"{what}. Under each prediction: that image's {'RMSE' if run.task == 'depth' else 'mIoU'}.",
            )
        )
    elif not p.notes:
        body.append('<p class="note">No reported images to show.</p>')
    lr = lr_figure(run.rows, run.task)
    if lr is not None:
        metric = NAMES[SELECTION_METRIC[run.task]]
        body.append(_figure(f"r{index}-lr", _png(lr), f"{metric} of every head against its learning rate, every store overlaid; ★ the head selected on the selection split."))  # fmt: skip
    body.append("<h3>Protocol</h3>" + f"<pre>{html.escape(_compact_json(run.record))}</pre>")
    return "\n".join(body)


def report(
    folders: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] = "report",
    *,
    reference: str | None = None,
    latex: bool = False,
    markdown: bool = False,
) -> dict[str, Path]:
    """leaderboard.md, leaderboard.csv and report.html (per_class_iou.csv for segmentation runs; table.md with
    ``markdown``, table.tex with ``latex``) of dense runs."""
    not_dense = [str(f) for f in folders if not is_dense_run(Path(f))]
    if not_dense:
        raise UsageError(f"{not_dense[0]!r} is not a dense run (probe fit --task depth|seg), the others are",
                         "report dense and classification runs in separate probe report calls")  # fmt: skip
    runs = [load_run(f) for f in folders]
    if reference is not None and not any(reference in r.labels for r in runs):
        have = sorted({label for r in runs for label in r.labels})
        raise UsageError(f"no store {reference!r} in these runs", f"they have: {', '.join(have)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file", "pass a folder (it is created if missing)")
    compared, classes = [], []
    for run in runs:
        ref = _reference(run, reference)
        files = read_run_files(run.folder)  # read once for both
        compared.append((ref, compare_dense(files, ref)[1] if ref else []))
        classes.append(per_class_iou(files, ref, class_names_of(run)) if run.task == "seg" else [])
    md, sections, rows = ["# featstore dense probe report", ""], [], []
    for i, (run, (ref, diffs), per) in enumerate(zip(runs, compared, classes), start=1):
        md += [f"## dense {run.task}: {run.folder}", "", summary_markdown(run), ""]
        if diffs:
            md += [f"against {ref} on the same images (95% paired bootstrap interval; Wilcoxon signed-rank p):", "",
                   comparison_markdown(diffs), ""]  # fmt: skip
        if per:
            md += [per_class_markdown(run.labels, ref, per), ""]
        sections.append(_section(run, diffs, ref, i, per))
        rows += summary_rows(run)
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>featstore dense probe report</title><style>{_CSS}</style>'
        "</head>\n<body>\n<h1>featstore dense probe report</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    columns = list(dict.fromkeys(k for r in rows for k in r))
    texts = {LEADERBOARD_MD: "\n".join(md), LEADERBOARD_CSV: table_csv.csv_text(columns, rows), REPORT_HTML: page}
    if any(classes):
        texts[PER_CLASS_CSV] = per_class_csv(runs, [ref for ref, _ in compared], classes)
    if markdown:
        texts[TABLE_MD] = "\n".join(paper_markdown(run, diffs, ref) for run, (ref, diffs) in zip(runs, compared))
    if latex:
        texts[TABLE_TEX] = "\n".join(paper_latex(run, diffs, ref) for run, (ref, diffs) in zip(runs, compared))
    out.mkdir(parents=True, exist_ok=True)
    final = {name: out / name for name in texts}
    with ExitStack() as stack:  # every file written before any is renamed
        for name in reversed(list(texts)):
            stack.enter_context(atomic_file(final[name])).write_text(texts[name], encoding="utf-8")
    return final
