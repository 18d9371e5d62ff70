"""``probe report``: several results folders gathered into one leaderboard (markdown + CSV) and
one self-contained report.html."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from featstore.atomic import atomic_file
from featstore.errors import UsageError

from .html import render
from .leaderboard import LEADERBOARD_CSV, LEADERBOARD_MD, REPORT_HTML, Group, csv_text, gather, markdown, table_rows


def report(
    folders: list[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike = "report",
    *,
    reference: str | None = None,
    allow_mixed: bool = False,
) -> dict[str, Path]:
    """Gather the results folders of ``probe fit`` runs and write leaderboard.md, leaderboard.csv and
    report.html into ``out``.

    Parameters
    ----------
    folders
        Results folders written by :func:`probe.fit` (``out=``) or ``probe fit --out``.
    out
        The folder to write into (created if missing; those three files are replaced).
    reference
        The store label the others are compared with; default: the first store.
    allow_mixed
        Rank results of different protocols, datasets or report splits as separate groups
        instead of refusing them.

    Returns
    -------
    dict
        File name → path of each file written.
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    groups = gather(list(folders), allow_mixed=allow_mixed, reference=reference)
    return write(groups, out)


def write(groups: list[Group], out: str | os.PathLike) -> dict[str, Path]:
    """leaderboard.md, leaderboard.csv and report.html into ``out`` (temp files renamed into place)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file", "pass a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(groups)
    texts = {LEADERBOARD_MD: markdown(groups, rows), LEADERBOARD_CSV: csv_text(rows), REPORT_HTML: render(groups, rows)}
    final = {name: out / name for name in texts}
    # every file written before any is renamed (the stack renames in reverse order of entry: md, csv, html)
    with ExitStack() as stack:
        for name in reversed(list(texts)):
            stack.enter_context(atomic_file(final[name])).write_text(texts[name], encoding="utf-8")
    return final
