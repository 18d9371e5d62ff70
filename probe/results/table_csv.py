"""The one CSV writer of probe's files: results.csv, summary.csv, predictions.csv and leaderboard.csv.

One cell rule for all of them (:func:`cell`): nothing (None or NaN) is an empty cell, a bool is
``true``/``false``, a float below 0.01 in magnitude keeps six significant digits and any other
float six decimals (its shortest text: ``93.4``, ``0.012346``), everything else its ``str``.
:func:`probe.results.runs` reads these cells back.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """One value as its CSV cell text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.6g}" if abs(value) < 1e-2 and value != 0 else repr(round(value, 6))
    return str(value)


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any] | Sequence[Any]]) -> str:
    """A header of ``columns``, then one line per row: a mapping (its ``columns``' values, missing
    ones empty) or a sequence of values in column order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        values = [r.get(c) for c in columns] if isinstance(r, Mapping) else r
        w.writerow([cell(v) for v in values])
    return buf.getvalue()
