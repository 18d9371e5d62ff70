"""Issue 23 items 2-4: summary.csv names the store by its label; the leaderboard ranks within a
method over seeds; Holm-adjusted p-values; paper tables (LaTeX booktabs, markdown) of probe report
and probe compare; a fixed LR is its own protocol; report.html's forest plot shows the paired Δ."""

from __future__ import annotations

import csv
import statistics

import numpy as np
import pytest

import probe
from probe.comparison import compare
from probe.multiple_testing import holm
from probe.output import leaderboard, paper
from probe.output.html import forest, render
from probe.protocol import Protocol
from probe.results.runs import load
from tests.test_probe import FAST, digits, make_store, one_thread, run_cli  # noqa: F401 (fixtures)

# ---------------------------------------------------------------- Holm


def test_holm_by_hand_and_against_statsmodels():
    # by hand: sorted 0.005 (×4 = 0.02), 0.01 (×3 = 0.03), 0.03 (×2 = 0.06), 0.04 (×1 = 0.04 → the running max 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # None: no test, not counted (m = 2): 0.02 × 2 = 0.04, then 0.03 × 1 = 0.03 → the running max 0.04
    assert holm([0.02, None, 0.03]) == [pytest.approx(0.04), None, pytest.approx(0.04)]
    assert holm([0.3]) == [0.3] and holm([]) == []
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    for m in (2, 5, 17):
        p = np.concatenate([rng.uniform(0, 0.05, m // 2), rng.uniform(0, 1, m - m // 2)])
        assert holm(list(p)) == pytest.approx(list(multitest.multipletests(p, method="holm")[1]), abs=1e-12)


def test_sign_flip_test_is_mcnemar_for_one_seed_and_exact_for_several():
    from probe import intervals as I

    for n01, n10 in ((3, 24), (10, 12), (0, 5), (40, 25), (0, 0)):
        d = np.array([1] * n01 + [-1] * n10 + [0] * 30, dtype=np.int8)
        assert I.seed_mean_sign_test(d[None]) == pytest.approx(I.mcnemar(d > 0, d < 0).p, rel=1e-9)
    # three seeds: the exact tail against a direct enumeration of every sign pattern of 12 images
    rng = np.random.default_rng(3)
    d = rng.choice([-1, 0, 1], size=(3, 12), p=[0.25, 0.35, 0.4]).astype(np.int8)
    k = d.sum(axis=0)
    signs = np.array(np.meshgrid(*[[-1, 1]] * 12)).reshape(12, -1).T  # all 4096 flips
    exact = np.mean(np.abs(signs @ np.abs(k)) >= abs(k.sum()))
    assert I.seed_mean_sign_test(d) == pytest.approx(exact, rel=1e-12)


# ---------------------------------------------------------------- renderers


def test_negative_numbers_get_a_minus_and_names_keep_their_hyphens():
    assert [paper.number(v, 1, signed=True) for v in (-0.31, 0.0, 2.25, -12.0)] == ["−0.3", "+0.0", "+2.2", "−12.0"]
    assert paper.number(-3.14159, 4) == "−3.1416" and paper.number(3.14159, 2) == "3.14"
    delta = paper._number(-0.31, (-1.2, 0.64), None, 1, "ci", signed=True)
    t = paper.Table(
        ["encoder", "Δ top-1 vs run-2026"],
        [["dino-v2_b", delta], ["mae lr 1e-4", paper._number(1.0, None, None, 1, "ci", signed=True)]],
        [[False, True], [False, False]],
        "Δ: store − reference; bold: p < 0.05",
    )
    tex = paper.latex(t)
    assert r"dino-v2\_b & \textbf{$-$0.3 [$-$1.2, +0.6]} \\" in tex and r"mae lr 1e-4 & +1.0 \\" in tex
    assert r"$\Delta$ top-1 vs run-2026" in tex and r"\caption{$\Delta$: store $-$ reference; bold: p $<$ 0.05}" in tex
    md = paper.markdown(t)
    assert "| dino-v2_b | **−0.3 [−1.2, +0.6]** |" in md and "| mae lr 1e-4 | +1.0 |" in md


def test_small_p_values_are_powers_of_ten_not_e_notation():
    assert [paper.p_value(p) for p in (0.5, 0.0012, 0.001, 0.00099, 1.23e-5, 4e-12, 0.0, None)] == [
        "0.500", "0.001", "0.001", "9.9×10⁻⁴", "1.2×10⁻⁵", "4.0×10⁻¹²", "0", "—",
    ]  # fmt: skip
    t = paper.Table(
        ["encoder", "Holm $p$"], [["a", paper.p_value(1.23e-5)], ["b", paper.p_value(4e-12)]], [[False, True], [False, False]], ""
    )
    tex = paper.latex(t)
    assert r"a & \textbf{1.2$\times10^{-5}$} \\" in tex and r"b & 4.0$\times10^{-12}$ \\" in tex
    assert "| a | **1.2×10⁻⁵** |" in paper.markdown(t)


# ---------------------------------------------------------------- runs


def _noisy(digits, scale, seed):
    rng = np.random.default_rng(seed)
    return {k: (x + rng.normal(0, scale, x.shape).astype(np.float32), y, i) for k, (x, y, i) in digits.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    """Three stores (the pixels, and two noisier copies) under an LR sweep with linear + k-NN over
    two seeds, and a fixed-LR run of the same stores."""
    root = tmp_path_factory.mktemp("paper")
    stores = [
        f"clean={make_store(root / 'a.zarr', digits)}",
        f"noisy={make_store(root / 'b.zarr', _noisy(digits, 4, 1))}",
        f"noisier={make_store(root / 'c.zarr', _noisy(digits, 8, 2))}",
    ]
    sweep = Protocol(lr_grid="0.01,0.1", methods="linear,knn", knn_k="5,10", seeds="0,1", **FAST)
    rows = probe.fit(stores, sweep, device="cpu", warn=lambda m: None, out=root / "sweep")
    fixed = Protocol(lr_grid=[0.05], **FAST)
    fixed_rows = probe.fit(stores, fixed, device="cpu", warn=lambda m: None, out=root / "fixed")
    return root, rows, fixed_rows


@pytest.mark.slow
def test_summary_csv_names_each_store_by_its_label(runs):
    root, _, _ = runs
    summary = list(csv.DictReader(open(root / "sweep" / "summary.csv")))
    assert [s["label"] for s in summary] == ["clean", "clean", "noisy", "noisy", "noisier", "noisier"]
    assert summary[0]["store"].endswith("a.zarr")


@pytest.mark.slow
def test_leaderboard_ranks_within_each_method_over_seeds(runs):
    root, rows, _ = runs
    (g,) = leaderboard.gather([root / "sweep"])
    board = leaderboard.table_rows([g])
    assert [(r["method"], r["rank"]) for r in board] == [("linear", 1), ("linear", 2), ("linear", 3), ("knn", 1), ("knn", 2), ("knn", 3)]
    for r in board:
        per_seed = [x["report_top1_pct"] for x in rows if x["selected"] and x["label"] == r["label"] and x["method"] == r["method"]]
        assert len(per_seed) == 2 and r["n_seeds"] == 2 and r["seeds"] == "0 1"
        assert r["top1"] == pytest.approx(statistics.mean(per_seed), abs=1e-3)
        assert r["top1_std"] == pytest.approx(statistics.stdev(per_seed), abs=1e-3)
        assert r["ci95_low"] < r["top1"] < r["ci95_high"]
    tops = {m: [r["top1"] for r in board if r["method"] == m] for m in ("linear", "knn")}
    assert all(t == sorted(t, reverse=True) for t in tops.values())
    # the difference over seeds is the comparison's seed mean, with its paired interval
    s = next(s for s in g.comparison.seeds if (s.label, s.method) == ("noisy", "knn"))
    r = next(r for r in board if (r["label"], r["method"]) == ("noisy", "knn"))
    assert r["delta"] == s.delta_mean and (r["delta_ci95_low"], r["delta_ci95_high"]) == s.delta_mean_ci95
    # seeds shown only on request: then one row per seed, ranked within method and seed, McNemar and Holm per test
    per_seed = leaderboard.table_rows([g], per_seed=True)
    assert len(per_seed) == 12 and {r["rank"] for r in per_seed} == {1, 2, 3}
    tested = [r for r in per_seed if r["mcnemar_p"] is not None]
    assert len(tested) == 8 and all(r["p"] == r["mcnemar_p"] for r in tested)
    assert [r["p_holm"] for r in tested] == pytest.approx(holm([r["mcnemar_p"] for r in tested]))
    # over seeds: the exact sign-flip test of the seed-mean difference, Holm over the table's 4 tests
    pooled = [r for r in board if r["p"] is not None]
    assert len(pooled) == 4 and all(r["mcnemar_p"] is None for r in pooled)
    assert [r["p"] for r in pooled] == [
        next(s.p_sign for s in g.comparison.seeds if (s.label, s.method) == (r["label"], r["method"])) for r in pooled
    ]
    assert [r["p_holm"] for r in pooled] == pytest.approx(holm([r["p"] for r in pooled]))
    assert "| Holm p |" in leaderboard.markdown([g], per_seed, per_seed=True) and "| seed |" in leaderboard.markdown([g], per_seed, True)
    assert "| seeds |" in leaderboard.markdown([g], board)


@pytest.mark.slow
def test_report_writes_latex_and_markdown_tables_with_the_best_per_method_in_bold(runs, tmp_path):
    root, _, _ = runs
    code, out = run_cli(["report", str(root / "sweep"), "--out", str(tmp_path / "rep"), "--latex", "--markdown"])
    assert code == 0, out
    tex = (tmp_path / "rep" / "table.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"\begin{tabular}{lrr}" in tex
    (g,) = leaderboard.gather([root / "sweep"])
    board = leaderboard.table_rows([g])
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert [line.split(" & ")[0] for line in body] == ["clean", "noisy", "noisier"]
    for column, method in ((1, "linear"), (2, "knn")):
        best = max((r for r in board if r["method"] == method), key=lambda r: r["top1"])
        for line in body:
            cell = line.removesuffix(r" \\").split(" & ")[column]
            assert cell.startswith(r"\textbf{") == line.startswith(best["label"] + " "), (method, line)
        r = next(r for r in board if r["method"] == method and r["label"] == "noisier")
        assert f"{r['top1']:.1f} [{r['ci95_low']:.1f}, {r['ci95_high']:.1f}]" in tex  # the seed-mean and its interval
    assert r"\caption{Top-1 accuracy (\%) on the test split of digits" in tex
    md = (tmp_path / "rep" / "table.md").read_text()
    assert md.startswith("| encoder | linear | k-NN |") and md.count("**") == 4  # one bold cell per method
    code, out = run_cli(["report", str(root / "sweep"), "--out", str(tmp_path / "rep2"), "--latex", "--spread", "std"])
    assert code == 0 and r"$\pm$" in (tmp_path / "rep2" / "table.tex").read_text()


@pytest.mark.slow
def test_compare_paper_table_gives_delta_interval_p_and_holm_p(runs):
    root, _, _ = runs
    run = load(root / "fixed")
    comparison = compare(run.predictions, class_names=run.class_names)
    code, out = run_cli(["compare", str(root / "fixed"), "--latex"])
    assert code == 0, out
    assert r"\toprule" in out and r"$\Delta$ top-1 vs clean" in out and "Holm $p$" in out
    others = [r for r in comparison.rows if not r.is_reference]
    adjusted = holm([r.mcnemar_p for r in others])
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    assert adjusted == pytest.approx(list(multitest.multipletests([r.mcnemar_p for r in others], method="holm")[1]))
    for r, h in zip(others, adjusted):
        line = next(line for line in out.splitlines() if line.startswith(r.label + " "))
        assert f"{r.delta:+.1f} [{r.delta_ci95[0]:+.1f}, {r.delta_ci95[1]:+.1f}]".replace("-", "$-$") in line
        p, holm_p = (paper._tex(paper.p_value(x)) for x in (r.mcnemar_p, h))
        assert line.split(" & ")[3:] == [p, holm_p + r" \\"] or line.split(" & ")[4] == rf"\textbf{{{holm_p}}} \\"
        assert r.mcnemar_p_holm == pytest.approx(h)
    code, md = run_cli(["compare", str(root / "fixed"), "--markdown"])
    assert code == 0 and md.startswith("| encoder | method | Δ top-1 vs clean | McNemar p | Holm p |")
    code, plain = run_cli(["compare", str(root / "fixed")])
    assert "| Holm p |" in plain and "Holm p: the 2 McNemar p-values adjusted together" in plain
    # over two seeds with --spread std the cells are mean ± std, and the caption says so (it said bootstrap)
    code, std = run_cli(["compare", str(root / "sweep"), "--markdown", "--spread", "std"])
    assert code == 0 and " ± " in std and "mean ± sample std of the per-seed differences" in std and "bootstrap" not in std


# ---------------------------------------------------------------- fixed LR


@pytest.mark.slow
def test_fixed_lr_selects_nothing_and_says_so(runs):
    root, _, fixed_rows = runs
    for r in fixed_rows:
        assert r["reported_as"] == "test (reported; fixed lr 0.05, nothing selected)"
    table = probe.output.tables.markdown_table(fixed_rows)
    assert "selection" not in table and "select on" not in table and "fixed lr 0.05, nothing selected" in table
    names = sorted(p.name for p in (root / "fixed").iterdir())
    assert "accuracy.png" in names and "accuracy_vs_lr.png" not in names
    fig = probe.output.plots.fixed_figure(probe.output.plots.plot_rows(fixed_rows))
    (ax,) = fig.axes
    assert ax.get_xscale() == "linear" and "★" not in fig.texts[0].get_text() and "nothing selected" in fig.texts[0].get_text()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["noisier", "noisy", "clean"]


@pytest.mark.slow
def test_fixed_and_sweep_share_one_report_titled_by_what_they_are(runs, tmp_path):
    root, _, _ = runs
    code, out = run_cli(["report", str(root / "fixed"), str(root / "sweep"), "--out", str(tmp_path / "rep"), "--allow-mixed"])
    assert code == 0, out
    assert "### group 1: fixed lr 0.05" in out and "### group 2: LR sweep 0.01…0.1 (2); knn" in out
    # the differing fields only, shortened: no hashes, no fields the two runs share
    line = next(line for line in out.splitlines() if line.startswith("2 groups"))
    assert "lr_grid 0.05 vs 0.01,0.1" in line and "methods linear vs linear,knn" in line and "seeds 0 vs 0,1" in line
    assert "epochs" not in line and "hash" not in line and "knn_temperature" not in line
    page = (tmp_path / "rep" / "report.html").read_text()
    fixed_part = page.split("<h2>group 2")[0]
    assert "<h2>group 1: fixed lr 0.05</h2>" in fixed_part and "setting (fixed)" in fixed_part
    assert "★" not in fixed_part and 'id="g1-lr"' not in fixed_part and "nothing is selected" in fixed_part
    assert 'id="g2-lr"' in page  # the sweep keeps its LR curves


# ---------------------------------------------------------------- report.html


@pytest.mark.slow
def test_forest_plot_shows_the_paired_difference_beside_each_store_seeds_averaged(runs):
    root, _, _ = runs
    (g,) = leaderboard.gather([root / "sweep"])
    board = leaderboard.table_rows([g])
    linear = [r for r in board if r["method"] == "linear"]
    fig = forest(g, linear)
    own, paired = fig.axes
    assert len(own.get_yticklabels()) == 3  # one row per store: the two seeds averaged
    for r in linear:
        if r["label"] == "clean":
            continue
        # the Δ point and its paired interval are drawn at the comparison's seed-mean numbers
        s = next(s for s in g.comparison.seeds if (s.label, s.method) == (r["label"], "linear"))
        drawn = []
        for c in paired.containers:  # errorbar containers: (point, caps, (bar segments,))
            point, _, (bars,) = c
            (segment,) = bars.get_segments()
            drawn.append((point.get_xdata()[0], sorted(segment[:, 0])))
        assert any(np.isclose(x, s.delta_mean) and np.allclose(ci, sorted(s.delta_mean_ci95)) for x, ci in drawn), drawn
    assert "Δ top-1 vs clean" in paired.get_xlabel() and "mean over seeds" in own.get_xlabel()


@pytest.mark.slow
def test_the_forest_caption_names_the_dashed_line_only_where_it_is_drawn(runs, tmp_path):
    """The dashed reference line is drawn for a single reference row; with a reference row per
    method (linear and k-NN) only the squares mark the reference, and the caption says that."""
    root, _, _ = runs
    for run, dashed in (("fixed", True), ("sweep", False)):
        (g,) = leaderboard.gather([root / run])
        rows = leaderboard.table_rows([g])
        assert sum(r["label"] == r["reference"] for r in rows) == (1 if dashed else 2)
        fig = forest(g, rows)
        assert any(line.get_linestyle() == "--" for line in fig.axes[0].get_lines()) == dashed
        html = probe.report(root / run, out=tmp_path / run)["report.html"].read_text()
        if dashed:
            assert "(squares and the dashed line: the reference)" in html
        else:
            assert "(squares: the reference)" in html and "dashed line" not in html


@pytest.mark.slow
def test_report_html_wraps_long_json(runs):
    root, _, _ = runs
    groups = leaderboard.gather([root / "sweep"])
    page = render(groups, leaderboard.table_rows(groups))
    css = page.split("<style>")[1].split("</style>")[0]
    pre = next(line for line in css.splitlines() if line.startswith("pre "))
    assert "white-space: pre-wrap" in pre and "overflow-wrap: anywhere" in pre and "overflow-x" not in pre


def test_latex_writes_greek_and_minus_as_math():
    """δ (dense δ1 columns) and the minus sign of "store − reference" compile under plain pdflatex."""
    from probe.output.paper import _tex

    assert _tex("Δ δ1 − ref ± 1") == r"$\Delta$ $\delta$1 $-$ ref $\pm$ 1"


def test_user_text_cannot_break_markdown_or_latex():
    """A label is the user's text: a | shifted every later cell of its markdown row, <b> became a tag
    hiding the label, and a $ opened math in LaTeX (its % then commented out the line) and vanished
    from markdown. Our own math ($p$) still renders as math."""
    from probe.results.markdown_cells import cell, row

    assert cell("p|q <b> 5 < 7") == r"p\|q \<b> 5 < 7"
    assert row(["a|b", 3]) == r"| a\|b | 3 |"
    label = paper.literal("US$ 50%_&#{x} p|q")
    t = paper.Table(["encoder", "McNemar $p$"], [[label, "0.5"]], [[False, False]], f"reference {label}.")
    tex = paper.latex(t)
    assert r"US\$ 50\%\_\&\#\{x\} p|q & 0.5 \\" in tex and r"McNemar $p$" in tex
    assert tex.count("$") - tex.count(r"\$") == 2  # only our own $p$ is math
    md = paper.markdown(t)
    assert (
        r"| US$ 50%_&#{x} p\|q | 0.5 |" in md and "| encoder | McNemar p |" in md and md.rstrip().endswith(r"reference US$ 50%_&#{x} p|q.")
    )


def test_compare_table_names_the_view_when_stores_have_several():
    """Two views of one store each against the reference: their rows were both just the label."""
    from probe.results.predictions import Predictions

    n, target = 50, np.arange(50) % 5
    preds = [Predictions(label, label, view, "linear", "", 0, [f"x{i}" for i in range(n)], target, (target + k * (np.arange(n) % 7 == 0)) % 5)
             for label, view, k in (("r", "cls", 0), ("r", "avgpool", 0), ("u", "cls", 1), ("u", "avgpool", 2))]  # fmt: skip
    names = [row[0] for row in paper.compare_table(compare(preds, "r")).rows]
    assert names == ["u [cls]", "u [avgpool]"]


def test_equal_top1_share_a_rank(tmp_path):
    """Two stores with exactly the same top-1 were ranked 1 and 2 by the order they came in; they
    share rank 1, and the next is 3."""
    from tests.test_compare import results_folder

    target = np.arange(200) % 10
    right, less = target.copy(), target.copy()
    less[:30] = (less[:30] + 1) % 10
    folder = results_folder(tmp_path / "run", {"z": (target, right), "a": (target, right), "m": (target, less)})
    (g,) = leaderboard.gather([folder])
    assert sorted((r["rank"], r["label"]) for r in leaderboard.table_rows([g])) == [(1, "a"), (1, "z"), (3, "m")]
