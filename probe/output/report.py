"""``probe report``: several results folders gathered into one leaderboard (markdown + CSV) and
one self-contained report.html."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from featstore.atomic import atomic_file
from featstore.errors import UsageError

from . import paper
from .html import render
from .leaderboard import LEADERBOARD_CSV, LEADERBOARD_MD, REPORT_HTML, Group, csv_text, fixed_or_sweep, gather, markdown, table_rows, titles

TABLE_TEX, TABLE_MD = "table.tex", "table.md"  # the paper tables (--latex, --markdown)


def report(
    folders: list[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike = "report",
    *,
    reference: str | None = None,
    allow_mixed: bool = False,
    per_seed: bool = False,
    latex: bool = False,
    markdown: bool = False,
    spread: str = "ci",
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
    per_seed
        One leaderboard row per seed (default: a store's seeds are one row, mean ± std).
    latex, markdown
        Also write table.tex (booktabs) / table.md: each store's top-1 per method, the best per
        method in bold, for a paper.
    spread
        In those tables: ``"ci"`` the 95% interval, ``"std"`` ± the std over seeds.

    Returns
    -------
    dict
        File name → path of each file written.
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    if spread not in paper.SPREADS:
        raise UsageError(f"unknown spread {spread!r}", f"use one of {', '.join(paper.SPREADS)}")
    groups = gather(list(folders), allow_mixed=allow_mixed, reference=reference)
    return write(groups, out, per_seed=per_seed, latex=latex, markdown_table=markdown, spread=spread)


def paper_tables(groups: list[Group], spread: str = "ci") -> list[paper.Table]:
    """One :func:`paper.report_table` per group, captioned with what its numbers are."""
    rows = table_rows(groups)
    names = titles(groups)
    out = []
    for gi, g in enumerate(groups, start=1):
        mine = [r for r in rows if r["group"] == gi]
        seeds = max((r.get("n_seeds", 1) for r in mine), default=1)
        how = f"mean ± sample std over {seeds} seeds" if spread == "std" and seeds > 1 else "95% percentile bootstrap interval over images"
        dataset = paper.literal(g.runs[0].dataset.get("name") or g.fields["dataset"])
        caption = (
            f"Top-1 accuracy (%) on the {g.fields['report split']} split of {dataset} ({paper.literal(names[gi - 1]) if len(groups) > 1 else fixed_or_sweep(g.runs[0])}), "
            f"{how}{'' if spread == 'std' and seeds > 1 else ', seeds averaged' if seeds > 1 else ''}; the best per method in bold."
        )
        out.append(paper.report_table(mine, spread=spread, caption=caption))
    return out


def write(
    groups: list[Group],
    out: str | os.PathLike,
    *,
    per_seed: bool = False,
    latex: bool = False,
    markdown_table: bool = False,
    spread: str = "ci",
) -> dict[str, Path]:
    """leaderboard.md, leaderboard.csv and report.html (and table.tex / table.md when asked) into
    ``out`` (temp files renamed into place)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file", "pass a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(groups, per_seed=per_seed)
    texts = {LEADERBOARD_MD: markdown(groups, rows, per_seed), LEADERBOARD_CSV: csv_text(rows), REPORT_HTML: render(groups, rows, per_seed)}
    if latex or markdown_table:
        tables = paper_tables(groups, spread)
        if latex:
            texts[TABLE_TEX] = "\n".join(paper.latex(t) for t in tables)
        if markdown_table:
            texts[TABLE_MD] = "\n".join(paper.markdown(t) for t in tables)
    final = {name: out / name for name in texts}
    # every file written before any is renamed (the stack renames in reverse order of entry: md, csv, html)
    with ExitStack() as stack:
        for name in reversed(list(texts)):
            stack.enter_context(atomic_file(final[name])).write_text(texts[name], encoding="utf-8")
    return final
