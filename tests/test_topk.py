"""probe.methods.topk, the one top-1/top-5 scoring rule of every method, against scikit-learn's
top_k_accuracy_score on the same scores, on numpy rankings and on torch ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score

from probe.methods import topk


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Each row's min(5, C) best classes, best first (what every method's predictions hold)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, : min(5, scores.shape[1])]


@pytest.mark.parametrize("classes", [3, 5, 12])
def test_accuracy_matches_scikit_learn_per_column(classes):
    rng = np.random.default_rng(classes)
    n, heads = 400, 3
    labels = rng.integers(0, classes, n)
    scores = rng.normal(size=(heads, n, classes))
    scores[:, np.arange(n), labels] += np.array([0.0, 1.0, 3.0])[:, None]  # three accuracy levels
    ranked = np.stack([_ranked(s) for s in scores], axis=1)  # (N, H, k): rows first
    acc = topk.accuracy(ranked, labels)
    want1 = [top_k_accuracy_score(labels, s, k=1, labels=np.arange(classes)) * 100 for s in scores]
    np.testing.assert_allclose(acc["top1"], want1, rtol=0, atol=1e-12)
    assert acc["top1"].dtype == np.float64 and len(set(acc["top1"].tolist())) == 3
    if classes < 5:
        assert "top5" not in acc  # every label is among the ranked classes: nothing to tell
    else:  # 5 classes: top-5 is every class (scikit-learn warns the score is meaningless, and it is 100)
        want5 = [top_k_accuracy_score(labels, s, k=5, labels=np.arange(classes)) * 100 if classes > 5 else 100.0 for s in scores]
        np.testing.assert_allclose(acc["top5"], want5, rtol=0, atol=1e-12)
        assert (acc["top5"] >= acc["top1"]).all() and (acc["top5"] > acc["top1"]).any()


def test_torch_hits_count_what_numpy_counts_and_empty_rows_score_zero():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, 50)
    ranked = np.stack([_ranked(rng.normal(size=(50, 8))) for _ in range(2)], axis=1)
    c1, c5 = topk.hits(torch.from_numpy(ranked), torch.from_numpy(labels))
    n1, n5 = topk.hits(ranked, labels)
    assert c1.tolist() == n1.tolist() and c5.tolist() == n5.tolist()
    assert n1.tolist() == [int((ranked[:, h, 0] == labels).sum()) for h in range(2)]
    empty = topk.accuracy(np.zeros((0, 2, 5), np.int64), np.zeros(0, np.int64))
    assert empty["top1"].tolist() == [0.0, 0.0] and empty["top5"].tolist() == [0.0, 0.0]
