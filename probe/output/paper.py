"""Tables a paper can include: ``probe report --latex/--markdown`` (each store's top-1 per method,
the best per method in bold) and ``probe compare --latex/--markdown`` (each store's difference
to the reference with its paired interval, McNemar p and Holm-adjusted p).

One :class:`Table` (cells with a bold flag, a caption), two renderers: LaTeX with booktabs rules
(``\\usepackage{booktabs}``) and GitHub markdown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..comparison import Comparison
from ..multiple_testing import holm
from ..results import markdown_cells

ALPHA = 0.05  # a difference is set in bold when its Holm-adjusted p is below this
SPREADS = ("ci", "std")  # what follows a number: its 95% interval, or ± the sample std over seeds


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]
    caption: str
    align: str = ""  # LaTeX column alignment; default: l for the first column, r for the rest
    notes: list[str] = field(default_factory=list)


def number(value: float, digits: int, signed: bool = False) -> str:
    """``value`` to ``digits`` decimals (``signed``: with its sign), a negative one with a true minus
    (U+2212, which the LaTeX renderer sets as ``$-$``): a hyphen there would print as a hyphen."""
    return (f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}").replace("-", "−")


_PLAIN, _RAISED = "-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"  # an exponent's characters, and as superscripts
_SUPERSCRIPT = str.maketrans(_PLAIN, _RAISED)


def p_value(p: float | None) -> str:
    """A p-value for a paper: three decimals, or below 0.001 as 1.2×10⁻⁵ (LaTeX: ``$1.2\\times10^{-5}$``),
    not the ``1.2e-05`` a hyphen would print."""
    if p is None or math.isnan(p):
        return "—"
    if p >= 0.001:
        return f"{p:.3f}"
    if p <= 0:
        return "0"
    mantissa, exponent = f"{p:.1e}".split("e")
    return f"{mantissa}×10{str(int(exponent)).translate(_SUPERSCRIPT)}"


def _number(mean: float | None, ci: tuple | None, std: float | None, n_seeds: int, spread: str, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if spread == "std" and n_seeds > 1 and std is not None:
        return f"{number(mean, 1, signed)} ± {std:.1f}"
    if ci is not None and all(v is not None and not math.isnan(v) for v in ci):
        return f"{number(mean, 1, signed)} [{number(ci[0], 1, signed)}, {number(ci[1], 1, signed)}]"
    return number(mean, 1, signed)


def _column(method: str, shots: str | None, several_shots: bool) -> str:
    names = {"linear": "linear", "knn": "$k$-NN", "logreg": "log. reg."}
    return names.get(method, method) + (f" ({shots or 'all'}-shot)" if several_shots else "")


def report_table(rows: list[dict], *, spread: str = "ci", caption: str = "") -> Table:
    """One group's leaderboard rows (over seeds) as a store × method table of top-1, the best
    per method (column) in bold, ties all bold."""
    several_shots = len({r["shots"] for r in rows}) > 1
    several_views = len({(r["label"], r["view"]) for r in rows}) > len({r["label"] for r in rows})
    columns = list(dict.fromkeys((r["method"], r["shots"]) for r in rows))
    stores = list(dict.fromkeys((r["label"], r["view"]) for r in rows))
    cell = {(r["label"], r["view"], r["method"], r["shots"]): r for r in rows}
    best = {c: max((r["top1"] for r in rows if (r["method"], r["shots"]) == c and r["top1"] is not None), default=None) for c in columns}
    out, bold = [], []
    for label, view in stores:
        line, marks = [literal(label) + (f" [{literal(view)}]" if several_views else "")], [False]
        for c in columns:
            r = cell.get((label, view, *c))
            if r is None:
                line.append("—")
                marks.append(False)
                continue
            ci = (r["ci95_low"], r["ci95_high"]) if r["ci95_low"] is not None else None
            line.append(_number(r["top1"], ci, r.get("top1_std"), r.get("n_seeds", 1), spread))
            top = best[c]
            marks.append(r["top1"] is not None and top is not None and round(r["top1"], 1) == round(top, 1))  # as printed: ties bold
        out.append(line)
        bold.append(marks)
    return Table(["encoder"] + [_column(m, s, several_shots) for m, s in columns], out, bold, caption)


def compare_table(comparison: Comparison, *, spread: str = "ci", caption: str = "") -> Table:
    """Every store but the reference: Δ top-1 vs the reference with its paired 95% interval, the
    paired p (McNemar's exact test; several seeds: the sign-flip test of the seed-mean difference)
    and the Holm-adjusted p over the table's tests."""
    several_shots = len({r.shots for r in comparison.rows}) > 1
    several_views = len({(r.label, r.view) for r in comparison.rows}) > len({r.label for r in comparison.rows})  # name each store's view
    seeds = {(s.label, s.view, s.method, s.shots): s for s in comparison.seeds}
    out, ps, seen = [], [], set()
    for r in comparison.rows:
        key = (r.label, r.view, r.method, r.shots)
        if r.is_reference or key in seen:
            continue
        seen.add(key)
        name = literal(r.label) + (f" [{literal(r.view)}]" if several_views or (r.reference_view and r.reference_view != r.view) else "")
        s = seeds.get(key)
        if s is None:
            delta, p = _number(r.delta, r.delta_ci95, None, 1, spread, signed=True), r.mcnemar_p
        else:
            delta, p = _number(s.delta_mean, s.delta_mean_ci95, s.delta_std, len(s.seeds), spread, signed=True), s.p_sign
        out.append([name, _column(r.method, r.shots, several_shots), delta, p_value(p)])
        ps.append(p)
    adjusted = holm(ps)
    for row, h in zip(out, adjusted):
        row.append(p_value(h))
    significant = [h is not None and h < ALPHA for h in adjusted]  # after Holm: Δ and its Holm p in bold
    bold = [[False, False, sig, False, sig] for sig in significant]
    test = "sign-flip $p$" if seeds else "McNemar $p$"
    columns = ["encoder", "method", f"Δ top-1 vs {literal(comparison.reference)}", test, "Holm $p$"]
    return Table(columns, out, bold, caption, align="llrrr")


# ---------------------------------------------------------------- renderers

_DOLLAR = "\ue000"  # a user's own $ (in a label or name): not a mark of our math, printed as $ (\$ in LaTeX)
_LATEX_SPECIAL = {_DOLLAR: r"\$", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "\\": r"\textbackslash{}"}  # fmt: skip


_POWER = re.compile(f"×10([{_RAISED}]+)")
_PLAIN_DIGITS = str.maketrans(_RAISED, _PLAIN)


def _tex(text: str) -> str:
    """Text for LaTeX: special characters escaped, except inside $…$ (our own math), ± and Δ as math,
    a power of ten (×10⁻⁵) as ``$\\times10^{-5}$``."""
    text = _POWER.sub(lambda m: f"$\\times10^{{{m.group(1).translate(_PLAIN_DIGITS)}}}$", text)
    parts = text.split("$")
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # inside $…$
            out.append(f"${part}$")
        else:
            escaped = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in part)
            out.append(
                escaped.replace("±", r"$\pm$")
                .replace("Δ", r"$\Delta$")
                .replace("δ", r"$\delta$")
                .replace("−", "$-$")
                .replace("<", "$<$")  # in text mode LaTeX's default (OT1) fonts print < and > as ¡ and ¿
                .replace(">", "$>$")
                .replace("—", "---")
                .replace("…", r"\ldots{}")
            )
    return "".join(out)


def latex(table: Table) -> str:
    """A ``table`` float with booktabs rules (``\\toprule``, ``\\midrule``, ``\\bottomrule``); bold as ``\\textbf``."""
    align = table.align or "l" + "r" * (len(table.columns) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(_tex(c) for c in table.columns) + r" \\")
    lines.append(r"\midrule")
    for row, marks in zip(table.rows, table.bold):
        lines.append(" & ".join(rf"\textbf{{{_tex(c)}}}" if b else _tex(c) for c, b in zip(row, marks)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(table.caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def literal(text: object) -> str:
    """A user's text (a store label, a dataset or folder name) for a table or caption: its ``$`` signs
    are its own, not the ``$…$`` of our math."""
    return str(text).replace("$", _DOLLAR)


def markdown(table: Table) -> str:
    """A GitHub markdown table, bold as ``**…**``, the caption below it."""
    plain = lambda text: text.replace("$", "").replace(_DOLLAR, "$")  # noqa: E731 (the LaTeX math marks of our own text)
    lines = [markdown_cells.row(plain(c) for c in table.columns)]
    lines.append(
        "|" + "|".join("---" if i == 0 or (table.align and table.align[i] == "l") else "---:" for i in range(len(table.columns))) + "|"
    )
    for row, marks in zip(table.rows, table.bold):
        lines.append(markdown_cells.row(f"**{plain(c)}**" if b else plain(c) for c, b in zip(row, marks)))
    return "\n".join(lines) + "\n\n" + plain(table.caption) + "\n"
