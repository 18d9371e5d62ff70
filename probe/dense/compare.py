"""``probe compare`` of a dense run: each store against the reference on the same images.

Depth: Δ RMSE, Δ AbsRel and Δ δ1 (true scale and aligned) as means over images of the per-image
differences, each with a paired percentile bootstrap interval (the images are resampled, both stores
scored on the same draw: ``scipy.stats.bootstrap(paired=True)``) and the Wilcoxon signed-rank test's
p (``scipy.stats.wilcoxon``) on the per-image differences. Segmentation: Δ mIoU and Δ pixel accuracy
of the summed confusion matrices, the bootstrap resampling images and summing their confusion matrices
again; p from the Wilcoxon test on the per-image mIoU differences. Per class (:func:`per_class_iou`):
each store's IoU of every class, and Δ IoU to the reference with the same paired resampling.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featstore.errors import UsageError

from ..results import markdown_cells, table_csv
from . import metrics

DEPTH_COMPARED = ("rmse", "absrel", "delta1", "rmse_ssa", "delta1_ssa")
SEG_COMPARED = ("miou", "pixel_acc")
N_RESAMPLES = 2000
SEED = 0


def is_dense_run(folder: str | Path) -> bool:
    try:
        record = json.loads((Path(folder) / "protocol.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("task") in ("depth", "seg")


@dataclass(frozen=True)
class Difference:
    store: str
    reference: str
    metric: str
    value: float  # the store's reported value
    reference_value: float
    delta: float  # store − reference
    low: float
    high: float
    p: float
    images: int


def _per_image(folder: Path) -> dict[str, dict[int, dict[str, float]]]:
    out: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    path = folder / "predictions.csv"
    with table_csv.reading(path) as (_, lines):
        for line, r in lines:
            try:
                out[r["store"]][int(r["row"])] = {
                    k: float(v) for k, v in r.items() if k not in ("store", "split", "row", "path") and v != ""
                }
            except (KeyError, ValueError):
                raise UsageError(
                    f"{str(path)!r} line {line}: not a row of per-image metrics (row, then numbers)", "rerun probe fit"
                ) from None
    return out


@dataclass(frozen=True)
class RunFiles:
    """What the comparisons read of a dense results folder, read once for both of them (a seg run's
    confusion.npz is decompressed at every read)."""

    folder: Path
    record: dict[str, Any]  # protocol.json
    per: dict[str, dict[int, dict[str, float]]]  # store → reported row → per-image metrics (predictions.csv)
    confusion: dict[str, np.ndarray] | None  # seg: store → (N, K, K) per-image confusion matrices

    @property
    def labels(self) -> list[str]:
        return [s["label"] for s in self.record["run"]["stores"]]


def read_run_files(folder: str | Path) -> RunFiles:
    folder = Path(folder)
    record = json.loads((folder / "protocol.json").read_text())
    labels = [s["label"] for s in record["run"]["stores"]]
    return RunFiles(folder, record, _per_image(folder), _confusions(folder, labels) if record.get("task") == "seg" else None)


def compare_dense(run: str | Path | RunFiles, reference: str | None = None, n_resamples: int = N_RESAMPLES) -> tuple[str, list[Difference]]:
    """(task, the differences of every other store from the reference); ``run``: the results folder
    or its files read by :func:`read_run_files`."""
    from scipy import stats

    files = run if isinstance(run, RunFiles) else read_run_files(run)
    folder, task, per, labels, confusion = files.folder, files.record["task"], files.per, files.labels, files.confusion
    if len(labels) < 2:
        raise UsageError(f"{str(folder)!r} holds one store", "run probe fit --task with two or more --store to compare them")
    reference = reference or labels[0]
    if reference not in per:
        raise UsageError(f"no store {reference!r} in {str(folder)!r}", f"it has: {', '.join(labels)}")
    out = []
    rng = np.random.default_rng(SEED)
    for label in labels:
        if label == reference:
            continue
        rows = _shared_rows(per, label, reference)
        if task == "seg":
            assert confusion is not None
            a, b = _on_rows(confusion[label], per[label], rows), _on_rows(confusion[reference], per[reference], rows)
            counts = _resample_counts(len(rows), n_resamples, rng)
            flat_a, flat_b = a.reshape(len(rows), -1), b.reshape(len(rows), -1)
            for m in SEG_COMPARED:
                va, vb = metrics.seg_scores(a.sum(0))[m], metrics.seg_scores(b.sum(0))[m]
                boot = np.array(
                    [
                        metrics.seg_scores((c @ flat_a).reshape(a.shape[1:]))[m] - metrics.seg_scores((c @ flat_b).reshape(b.shape[1:]))[m]
                        for c in counts
                    ]
                )
                # an image with no labelled pixel has no per-image score (an empty cell): out of the pairs
                diff = np.array([per[label][r].get(m, np.nan) - per[reference][r].get(m, np.nan) for r in rows])
                diff = diff[np.isfinite(diff)]
                p = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
                low, high = np.percentile(boot, [2.5, 97.5])
                out.append(Difference(label, reference, m, va, vb, va - vb, float(low), float(high), p, len(rows)))
            continue
        for m in DEPTH_COMPARED:
            x = np.array([per[label][r].get(m, np.nan) for r in rows])
            y = np.array([per[reference][r].get(m, np.nan) for r in rows])
            ok = np.isfinite(x) & np.isfinite(y)  # an image without a valid depth pixel has no per-image number
            if ok.sum() < 2:
                raise UsageError(
                    f"stores {label!r} and {reference!r} share {int(ok.sum())} reported images with a {m} (of {len(rows)}): "
                    "too few to compare",
                    "report a split whose images have depth",
                )
            x, y = x[ok], y[ok]
            res = stats.bootstrap((x, y), lambda a, b, axis=-1: np.mean(a - b, axis=axis), paired=True, vectorized=True,
                                  n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(SEED))  # fmt: skip
            diff = x - y
            p = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
            ci = res.confidence_interval
            out.append(
                Difference(
                    label,
                    reference,
                    m,
                    float(x.mean()),
                    float(y.mean()),
                    float(diff.mean()),
                    float(ci.low),
                    float(ci.high),
                    p,
                    int(ok.sum()),
                )
            )
    return task, out


def _shared_rows(per: dict[str, dict[int, dict[str, float]]], label: str, reference: str) -> list[int]:
    """The reported rows both stores have per-image numbers for (at least 2: a paired comparison needs them)."""
    rows = sorted(set(per[label]) & set(per[reference]))
    if len(rows) < 2:
        raise UsageError(f"stores {label!r} and {reference!r} share fewer than 2 reported images", "compare stores of the same dataset")
    return rows


# what numpy raises on an .npz cut short or overwritten: not a zip, a member cut short, bad deflate data
DAMAGED_NPZ = (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error)


def _confusions(folder: Path, labels: list[str]) -> dict[str, np.ndarray]:
    """Each store's (N, K, K) per-image confusion matrices from confusion.npz, each read once (an npz
    decompresses an array again at every access)."""
    path = folder / "confusion.npz"
    try:
        with np.load(path) as npz:
            return {label: npz[_key(label, npz.files)] for label in labels}
    except DAMAGED_NPZ as e:
        raise UsageError(
            f"{str(path)!r} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:100]})", "rerun probe fit --task seg"
        ) from None


def _on_rows(matrices: np.ndarray, per_image: dict[int, dict[str, float]], rows: list[int]) -> np.ndarray:
    """A store's per-image confusion matrices (stored in the order of its sorted reported rows) on ``rows``."""
    return matrices[np.searchsorted(sorted(per_image), rows)]


def _resample_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(R, n): how often each of n images is drawn in each of R bootstrap resamples."""
    draws = rng.integers(0, n, (n_resamples, n))
    return np.stack([np.bincount(d, minlength=n) for d in draws])


@dataclass(frozen=True)
class ClassIoU:
    """One class of a segmentation run: each store's IoU, and each other store's Δ to the reference."""

    index: int
    name: str
    iou: dict[str, float]  # store → IoU over the reported images (NaN: the class is in neither truth nor prediction)
    delta: dict[str, tuple[float, float, float]]  # store → (Δ IoU, 95% low, high), paired bootstrap over images

    def to_dict(self) -> dict[str, Any]:
        """For JSON: NaN (a class one store never met) as null."""
        num = lambda v: None if not np.isfinite(v) else v  # noqa: E731
        return {"index": self.index, "name": self.name, "iou": {k: num(v) for k, v in self.iou.items()},
                "delta": {k: [num(v) for v in d] for k, d in self.delta.items()}}  # fmt: skip


def per_class_iou(
    run: str | Path | RunFiles, reference: str | None, class_names: list[str] | None = None, n_resamples: int = N_RESAMPLES
) -> list[ClassIoU]:
    """Every class present in some store's truth or prediction: IoU per store (from the summed per-image
    confusion matrices, as the mIoU) and, with a ``reference``, Δ IoU with a paired percentile bootstrap
    interval (images resampled, both stores scored on the same draw; resamples where the class is
    absent do not count). ``run``: the results folder or its files read by :func:`read_run_files`."""
    files = run if isinstance(run, RunFiles) else read_run_files(run)
    if files.confusion is None:  # not a seg run
        return []
    labels, confusion, per = files.labels, files.confusion, files.per
    ious = {label: metrics.class_iou(m.sum(0)) for label, m in confusion.items()}
    k = len(next(iter(ious.values())))
    deltas: dict[str, np.ndarray] = {}  # store → (K, 3)
    if reference is not None:
        rng = np.random.default_rng(SEED)
        for label in labels:
            if label == reference:
                continue
            rows = _shared_rows(per, label, reference)
            a = _on_rows(confusion[label], per[label], rows).reshape(len(rows), -1).astype(np.float64)
            b = _on_rows(confusion[reference], per[reference], rows).reshape(len(rows), -1).astype(np.float64)
            counts = _resample_counts(len(rows), n_resamples, rng).astype(np.float64)
            boot = np.concatenate([metrics.class_iou((c @ a).reshape(-1, k, k)) - metrics.class_iou((c @ b).reshape(-1, k, k))
                                   for c in np.array_split(counts, max(1, len(counts) // 250))])  # fmt: skip
            with np.errstate(invalid="ignore"):
                point = metrics.class_iou(a.sum(0).reshape(k, k)) - metrics.class_iou(b.sum(0).reshape(k, k))
            seen = np.isfinite(boot).any(0)
            low = np.full(k, np.nan)
            high = np.full(k, np.nan)
            low[seen], high[seen] = np.nanpercentile(boot[:, seen], [2.5, 97.5], axis=0)
            deltas[label] = np.stack([point, low, high], axis=1)
    names = class_names or []
    present = [c for c in range(k) if any(np.isfinite(v[c]) for v in ious.values())]
    return [
        ClassIoU(
            c,
            names[c] if c < len(names) else f"class {c}",
            {label: float(ious[label][c]) for label in labels},
            {label: (float(d[c, 0]), float(d[c, 1]), float(d[c, 2])) for label, d in deltas.items()},
        )
        for c in present
    ]


def safe_name(label: str) -> str:
    """A store label as a file / npz key name (labels may hold paths and colons)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _key(label: str, files: list[str]) -> str:
    if safe_name(label) in files:
        return safe_name(label)
    raise UsageError(f"confusion.npz has no store {label!r}", "rerun probe fit --task seg")


def markdown(task: str, differences: list[Difference]) -> str:
    lines = [f"dense {task}: each store − reference on the same images (95% paired bootstrap interval; Wilcoxon signed-rank p)", "",
             "| store | reference | metric | store | reference | Δ | 95% interval | p | images |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in differences:
        lines.append(markdown_cells.row([d.store, d.reference, d.metric, f"{d.value:.4f}", f"{d.reference_value:.4f}", f"{d.delta:+.4f}",
                                         f"[{d.low:+.4f}, {d.high:+.4f}]", f"{d.p:.2g}", d.images]))  # fmt: skip
    return "\n".join(lines)


def to_json(task: str, differences: list[Difference]) -> dict[str, Any]:
    return {"task": task, "differences": [d.__dict__ for d in differences]}
