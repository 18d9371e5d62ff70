"""The one CSV writer of probe's files: results.csv, summary.csv, predictions.csv and leaderboard.csv,
and the one checked way of reading them back (:func:`reading`).

One cell rule for all of them (:func:`cell`): nothing (None or NaN) is an empty cell, a bool is
``true``/``false``, a float below 0.01 in magnitude keeps six significant digits and any other
float six decimals (its shortest text: ``93.4``, ``0.012346``), everything else its ``str``.
:func:`value` reads them back.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from featstore.errors import UsageError


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


def value(text: str, as_text: bool = False) -> Any:
    """A cell's text back to None / bool / int / float / str, the inverse of :func:`cell`; ``as_text``
    (a label, a path, a hash) keeps it text whatever it looks like: a store labelled "1e3" stays "1e3"."""
    if text == "":
        return None
    if as_text:
        return text
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@contextmanager
def reading(path: str | os.PathLike[str]) -> Iterator[tuple[list[str], Iterator[tuple[int, dict[str, str]]]]]:
    """(columns, rows) of one of probe's CSV files, read as they are iterated; each row (line number,
    {column: cell text}). A row with more or fewer cells than the header (a file cut short or
    edited), or bytes that are not UTF-8 CSV, are a UsageError naming the file and the line, instead
    of None cells surfacing later as an unexpected TypeError."""
    where = repr(str(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])

            def rows() -> Iterator[tuple[int, dict[str, str]]]:
                for row in reader:
                    if None in row or None in row.values():  # csv.DictReader's marks of a long or short row
                        raise UsageError(
                            f"{where} line {reader.line_num}: not the {len(columns)} cells of its header (the file was cut short or edited)",
                            "rerun probe fit",
                        )
                    yield reader.line_num, row

            yield columns, rows()
    except (csv.Error, UnicodeDecodeError) as e:
        raise UsageError(f"{where} is not a CSV file probe wrote ({' '.join(str(e).split())[:120]})", "rerun probe fit") from None
