"""Reading a CSV file list (``path,label[,split]``) strictly: its text, its rows and its labels.

Every refusal is one line naming the CSV line at fault, because each of these used to be accepted
silently or to abort with a traceback: a Latin-1 file (UnicodeDecodeError), a row without a label
(a class named '' that turned every integer label into a sorted text name: label 2 stored as index
5), one stray label of 5,000,000 (5,000,001 classes built). A UTF-8 byte-order mark, as spreadsheet
programs write it, is read, not refused.

Labels are either all integers or all class names. Integers must be dense, 0..C-1 each used at
least once, unless ``labels="sparse"``: then the distinct integers, sorted, become classes 0..K-1
and the class names record which integer each class was (the mapping lives in the manifest).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

LABEL_MODES = ("dense", "sparse")


@dataclass(frozen=True)
class FileList:
    """The rows of a file list, each with the CSV line it came from."""

    lines: tuple[int, ...]
    paths: tuple[str, ...]
    labels: tuple[str, ...]  # as written
    splits: tuple[str, ...]  # "all" where the row names none


@dataclass(frozen=True)
class LabelMap:
    class_names: tuple[str, ...]
    index: dict[str, int]  # label as written → class index
    mode: str  # "names", "dense" or "sparse"


def read_file_list(csv_path: Path) -> FileList:
    name = str(csv_path)
    data = csv_path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise UsageError(
            f"{name!r} line {line} is not UTF-8 text (byte 0x{data[e.start]:02X} at column {column})",
            f"save the file list as UTF-8, e.g. iconv -f latin1 -t utf-8 {csv_path.name} > utf8.csv",
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        header = []
    columns = [c.strip().lower() for c in header]
    if "path" not in columns or "label" not in columns:
        raise UsageError(
            f"{name!r} lacks a 'path' or 'label' column (has: {', '.join(c for c in columns if c) or 'none'})",
            "the first line must be a header such as path,label,split",
        )
    at = {c: columns.index(c) for c in ("path", "label", "split") if c in columns}
    lines, paths, labels, splits = [], [], [], []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank lines (a trailing newline or two) are not rows
        cell = {c: (row[i].strip() if i < len(row) else "") for c, i in at.items()}
        if not cell["path"]:
            raise UsageError(f"{name!r} line {line} has an empty path", "every line needs path,label")
        if not cell["label"]:
            raise UsageError(
                f"{name!r} line {line} ({cell['path']!r}) has no label", "every line needs path,label; remove the line or give its label"
            )
        lines.append(line)
        paths.append(cell["path"])
        labels.append(cell["label"])
        splits.append(cell.get("split") or "all")
    if not paths:
        raise UsageError(f"{name!r} lists no images", "add one line per image: path,label[,split]")
    return FileList(tuple(lines), tuple(paths), tuple(labels), tuple(splits))


def label_map(rows: FileList, csv_path: Path, mode: str = "dense") -> LabelMap:
    """Class names and the index of every label written in ``rows`` (see the module docstring)."""
    name = str(csv_path)
    if mode not in LABEL_MODES:
        raise UsageError(f"unknown --labels {mode!r}", f"use one of {', '.join(LABEL_MODES)}")
    ints = [_int(v) for v in rows.labels]
    if all(v is None for v in ints):
        names = tuple(sorted(set(rows.labels)))
        return LabelMap(names, {c: i for i, c in enumerate(names)}, "names")
    if any(v is None for v in ints):
        # a mix: name the first line that disagrees with the kind most lines have
        numeric = sum(v is not None for v in ints) * 2 >= len(ints)
        k = next(i for i, v in enumerate(ints) if (v is None) == numeric)
        other = next(i for i, v in enumerate(ints) if (v is None) != numeric)
        raise UsageError(
            f"{name!r} line {rows.lines[k]}: label {rows.labels[k]!r} is {'not ' if numeric else ''}an integer, "
            f"but line {rows.lines[other]}'s label {rows.labels[other]!r} is {'' if numeric else 'not '}one",
            "use integer labels 0..C-1 throughout, or class names throughout",
        )
    values = [int(v) for v in ints if v is not None]
    if min(values) < 0:
        k = values.index(min(values))
        raise UsageError(f"{name!r} line {rows.lines[k]} has the negative label {values[k]}", "integer labels must be 0..C-1")
    distinct = sorted(set(values))
    if mode == "sparse":
        position = {v: i for i, v in enumerate(distinct)}
        return LabelMap(tuple(str(v) for v in distinct), {raw: position[int(raw)] for raw in set(rows.labels)}, "sparse")
    if len(distinct) != distinct[-1] + 1:
        missing = next(i for i, v in enumerate(distinct) if i != v)
        k = values.index(distinct[-1])
        raise UsageError(
            f"{name!r}: integer labels must be 0..C-1, each used, but they run to {distinct[-1]} (line {rows.lines[k]}) "
            f"with {len(distinct)} distinct values ({missing} is the first unused)",
            f"relabel them 0..{len(distinct) - 1}, or pass --labels sparse to make the {len(distinct)} distinct labels "
            "classes 0..K-1 in sorted order (recorded in the store)",
        )
    return LabelMap(tuple(str(v) for v in distinct), {raw: int(raw) for raw in set(rows.labels)}, "dense")


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None
