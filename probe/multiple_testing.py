"""Many comparisons at once: Holm's step-down adjustment of p-values (family-wise error rate).

scipy has no Holm (``scipy.stats.false_discovery_control`` controls the false discovery rate,
Benjamini-Hochberg/-Yekutieli, a different promise), so it is computed here and checked in the
tests against ``statsmodels.stats.multitest.multipletests(method="holm")`` and a hand-worked
example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values, in the input order; None (no test) stays None and is not counted.

    With the m p-values sorted ascending, p(1) ≤ … ≤ p(m), the adjusted value of p(i) is
    ``min(1, max_{j ≤ i} (m − j + 1) · p(j))``: the running maximum keeps the adjusted values in
    the order of the raw ones. Rejecting every adjusted p ≤ α keeps the chance of any false
    rejection among the m at most α, whatever their dependence.
    """
    tested = [(p, i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
