"""Dense metrics in numpy, image by image, as Probe3D (mbanani/probe3d, evals/utils/metrics.py)
computes them: every metric of an image on its valid pixels (depth > 0 / mask != 255) at target
resolution, the reported value the mean over images; depth both at true scale and after a per-image
least-squares scale and shift (Probe3D's two ways). Segmentation: one confusion matrix over the
reported images gives mIoU and pixel accuracy; per image, the same two numbers on its own pixels.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

DEPTH_METRICS = ("rmse", "absrel", "log10", "delta1", "delta2", "delta3")
LOWER_IS_BETTER = frozenset({"rmse", "absrel", "log10", "sig_loss"})
MIN_DEPTH = 1e-3  # DINOv2's min_depth: aligned predictions are clamped to it before logs and ratios
IGNORE = 255


def align_scale_shift(pred: NDArray[np.floating], gt: NDArray[np.floating]) -> NDArray[np.float64]:
    """``pred`` mapped by the per-image (s, t) minimising Σ (s·pred + t − gt)² over valid pixels
    (gt > 0): the 2×2 normal equations of Probe3D's match_scale_and_shift. (N, H, W) in, out."""
    p, g = pred.astype(np.float64), gt.astype(np.float64)
    m = (g > 0).astype(np.float64)
    a00, a01, a11 = (m * p * p).sum((1, 2)), (m * p).sum((1, 2)), m.sum((1, 2))
    b0, b1 = (m * p * g).sum((1, 2)), (m * g).sum((1, 2))
    det = a00 * a11 - a01 * a01
    ok = det != 0
    scale = np.where(ok, (a11 * b0 - a01 * b1) / np.where(ok, det, 1), 1.0)
    shift = np.where(ok, (a00 * b1 - a01 * b0) / np.where(ok, det, 1), 0.0)
    out: NDArray[np.float64] = p * scale[:, None, None] + shift[:, None, None]
    return out


def depth_per_image(pred: NDArray[np.floating], gt: NDArray[np.floating], aligned: bool = False) -> dict[str, NDArray[np.float64]]:
    """(N,) per-image RMSE, AbsRel, log10, δ1, δ2, δ3 over valid pixels; NaN for an image without any."""
    p = align_scale_shift(pred, gt) if aligned else pred.astype(np.float64)
    g = gt.astype(np.float64)
    valid = g > 0
    count = valid.sum((1, 2)).astype(np.float64)
    p = np.maximum(p, MIN_DEPTH)
    g_safe = np.where(valid, g, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.maximum(p / g_safe, g_safe / p)
        out = {
            "rmse": np.sqrt(np.where(valid, (p - g) ** 2, 0).sum((1, 2)) / count),
            "absrel": np.where(valid, np.abs(p - g) / g_safe, 0).sum((1, 2)) / count,
            "log10": np.where(valid, np.abs(np.log10(p) - np.log10(g_safe)), 0).sum((1, 2)) / count,
        }
        for k in (1, 2, 3):
            out[f"delta{k}"] = np.where(valid, ratio < 1.25**k, False).sum((1, 2)) / count
    return out


def confusion(pred: NDArray[np.integer], gt: NDArray[np.integer], num_classes: int) -> NDArray[np.int64]:
    """(K, K) counts of (true class, predicted class) over pixels whose truth is not 255."""
    keep = gt != IGNORE
    t = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    counts: NDArray[np.int64] = np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return counts


def class_iou(matrices: NDArray[np.integer] | NDArray[np.floating]) -> NDArray[np.float64]:
    """IoU of every class from confusion matrices (..., K, K) (rows: truth); NaN where a class is in
    neither truth nor prediction (it then does not count in the mIoU either)."""
    m = matrices.astype(np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(-1) + m.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def seg_scores(matrix: NDArray[np.integer]) -> dict[str, float]:
    """mIoU over the classes present in truth or prediction, and pixel accuracy, from one confusion matrix."""
    iou = class_iou(matrix)
    present = np.isfinite(iou)
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = matrix.sum()
    return {"miou": miou, "pixel_acc": float(np.trace(matrix.astype(np.float64)) / total) if total else float("nan")}


def seg_per_image(pred: NDArray[np.integer], gt: NDArray[np.integer], num_classes: int) -> dict[str, NDArray[np.float64]]:
    """(N,) per-image mIoU and pixel accuracy (each image's own confusion matrix)."""
    scores = [seg_scores(confusion(p, g, num_classes)) for p, g in zip(pred, gt)]
    return {k: np.array([s[k] for s in scores]) for k in ("miou", "pixel_acc")}


def depth_summary(pred: NDArray[np.floating], gt: NDArray[np.floating]) -> dict[str, float]:
    """The reported depth numbers: the mean over images of each metric, true scale and aligned (``_ssa``)."""
    out: dict[str, float] = {}
    for aligned, suffix in ((False, ""), (True, "_ssa")):
        for k, v in depth_per_image(pred, gt, aligned).items():
            out[k + suffix] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def seg_per_image_from_confusion(matrices: NDArray[np.integer]) -> dict[str, NDArray[np.float64]]:
    """(N,) per-image mIoU and pixel accuracy from (N, K, K) per-image confusion matrices (as
    :func:`seg_scores` of each, without a Python loop over images)."""
    m = matrices.astype(np.float64)
    iou = class_iou(m)
    present = np.isfinite(iou)
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = np.where(present.any(-1), np.nansum(iou, -1) / present.sum(-1), np.nan)
        total = m.sum((-2, -1))
        tp = np.diagonal(m, axis1=-2, axis2=-1)
        acc = np.where(total > 0, tp.sum(-1) / np.where(total > 0, total, 1.0), np.nan)
    return {"miou": miou, "pixel_acc": acc}


def confusions(pred: NDArray[np.integer], gt: NDArray[np.integer], num_classes: int) -> NDArray[np.int64]:
    """(B, G, K, K) confusion matrices of every image and head at once: (B, G, H, W) predictions
    against (B, H, W) truth, pixels whose truth is 255 left out (one bincount, no loop)."""
    b, g = pred.shape[:2]
    k = num_classes
    if (gt[gt != IGNORE] >= k).any():
        raise ValueError(f"a mask holds a class >= {k} (the store's class count) other than 255")
    keep = np.broadcast_to((gt != IGNORE)[:, None], pred.shape)
    truth = np.broadcast_to(gt[:, None].astype(np.int64), pred.shape)
    cell = (np.arange(b * g, dtype=np.int64).reshape(b, g, 1, 1) * k + truth) * k + pred.astype(np.int64)
    counts: NDArray[np.int64] = np.bincount(cell[keep], minlength=b * g * k * k).reshape(b, g, k, k)
    return counts
