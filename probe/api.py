"""The public Python API of probe beyond the sweep itself (``probe.fit`` and ``probe.fit_run``
live in :mod:`probe.fitting`): ``compare`` and ``report``.

Each function imports its implementation when called. ``probe/__init__.py`` exposes these names
lazily; docs/api.md walks through them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for readers and type checkers only
    from .comparison import Comparison


def compare(
    results,
    reference: str | None = None,
    *,
    class_names: list[str] | None = None,
    n_resamples: int | None = None,
    bootstrap_seed: int | None = None,
) -> Comparison:
    """Compare every selected head with the reference store's, on the same images.

    For each head: top-1 with a bootstrap and a Wilson 95% interval; against the reference's head
    of the same method, shots and seed: the difference on the images both hold, its paired
    bootstrap interval and McNemar's exact test; per seed and per class. No features are read.

    Parameters
    ----------
    results : path, FitResult, list of dict or list of Predictions
        What to compare: a results folder written by :func:`fit` (``out=``) or ``probe fit``
        (its predictions.csv and class names are read); the :class:`FitResult` of
        :func:`fit_run`; the rows :func:`fit` returned; or a list of
        :class:`probe.results.predictions.Predictions`.
    reference : str, optional
        The store label every other store is compared with; default: the first store.
    class_names : list of str, optional
        Names of the classes in the per-class report; default: the results folder's (a folder),
        else class indices.
    n_resamples : int, optional
        Bootstrap resamples (default 2000).
    bootstrap_seed : int, optional
        The bootstrap's seed (default 0).

    Returns
    -------
    Comparison
        ``reference`` (its label); ``rows`` (one per head: ``label``, ``view``, ``method``, ``top1``,
        ``ci95``, ``wilson95``, and for all but the reference ``delta``, ``delta_ci95``,
        ``n_paired``, ``mcnemar_p``); ``seeds``; ``per_class``; ``to_json()`` is
        ``probe compare --json``'s document. ``probe.comparison.markdown(comparison)`` prints it.

    Raises
    ------
    featstore.UsageError
        A folder without results or predictions, no predictions at all, an unknown ``reference``.
    TypeError
        ``results`` of another type.

    Examples
    --------
    >>> comparison = probe.compare("results/ab", reference="a")                 # doctest: +SKIP
    >>> [(r.label, r.top1, r.delta, r.mcnemar_p) for r in comparison.rows]       # doctest: +SKIP
    """
    from . import intervals
    from .comparison import compare as run
    from .results.predictions import Predictions, of_rows

    if isinstance(results, (str, os.PathLike)):
        from .results.runs import load, require_predictions

        loaded = load(Path(results))
        predictions = require_predictions(loaded)
        class_names = class_names if class_names is not None else loaded.class_names
    elif hasattr(results, "rows") and hasattr(results, "comparison"):  # a FitResult (no torch import to check)
        predictions = of_rows(results.rows)
    elif isinstance(results, (list, tuple)) and all(isinstance(p, Predictions) for p in results):
        predictions = list(results)
    elif isinstance(results, (list, tuple)) and all(isinstance(r, dict) for r in results):
        predictions = of_rows(list(results))
    else:
        raise TypeError(
            "probe.compare() takes a results folder, a FitResult, the rows of probe.fit or a list of "
            f"Predictions, not {type(results).__name__}"
        )
    return run(
        predictions,
        reference,
        class_names=class_names,
        n_resamples=intervals.N_RESAMPLES if n_resamples is None else n_resamples,
        bootstrap_seed=intervals.BOOTSTRAP_SEED if bootstrap_seed is None else bootstrap_seed,
    )


def report(
    folders: Iterable[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike = "report",
    *,
    reference: str | None = None,
    allow_mixed: bool = False,
    per_seed: bool = False,
    latex: bool = False,
    markdown: bool = False,
    spread: str = "ci",
) -> dict[str, Path]:
    """Gather results folders of probe runs into one leaderboard and one self-contained report.html.

    Parameters
    ----------
    folders : path or iterable of paths
        Results folders written by :func:`fit` (``out=``) or ``probe fit --out``.
    out : path, default "report"
        The folder to write into (created if missing; the three files are replaced).
    reference : str, optional
        The store label the others are compared with; default: the first store.
    allow_mixed : bool, default False
        Rank results of different protocols, datasets or report splits as separate groups
        instead of refusing them.
    per_seed : bool, default False
        One leaderboard row per seed; by default a store's seeds are one row (mean ± std).
    latex, markdown : bool, default False
        Also write ``table.tex`` (booktabs) / ``table.md``: each store's top-1 per method, the
        best per method in bold, for a paper.
    spread : {"ci", "std"}, default "ci"
        What those tables give beside a number: its 95% interval, or ± the std over seeds.

    Returns
    -------
    dict of str to pathlib.Path
        ``leaderboard.md``, ``leaderboard.csv`` and ``report.html`` (and the tables asked for) → the path written.

    Raises
    ------
    featstore.UsageError
        A folder without results, results that cannot be ranked together (without
        ``allow_mixed``), ``out`` naming a file.

    Examples
    --------
    >>> paths = probe.report(["results/ab", "results/cd"], out="report")        # doctest: +SKIP
    >>> sorted(paths)                                                           # doctest: +SKIP
    ['leaderboard.csv', 'leaderboard.md', 'report.html']
    """
    from .output.report import report as write

    if not isinstance(folders, (str, os.PathLike)):
        folders = list(folders)
    return write(
        folders, out, reference=reference, allow_mixed=allow_mixed, per_seed=per_seed, latex=latex, markdown=markdown, spread=spread
    )
