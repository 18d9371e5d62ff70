"""probe: linear probes on cached features — every head of an LR sweep trained at once — and the
rest of the evaluation battery (k-NN, logistic regression, few-shot, seeds) under the same protocol.

    >>> import probe
    >>> rows = probe.fit(["a.zarr", "ft=b.zarr:cls4"], probe.Protocol(epochs=30), device="auto", out="probe-results/ab")
    >>> rows = probe.fit("a.zarr", probe.Protocol(methods="linear,knn,logreg", shots="1,5,all", seeds="0,1,2"))
    >>> comparison = probe.compare("probe-results/ab")          # Δ top-1 vs the first store, same images
    >>> paths = probe.report(["probe-results/ab"], out="report")  # leaderboard.md/.csv, report.html

Every public name is loaded on first use (module ``__getattr__``), so ``import probe`` imports no
torch. The walk-through and the reference: docs/api.md.
"""

from featstore.lazy import lazy_names

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "fit": "probe.fitting",
    "fit_run": "probe.fitting",
    "compare": "probe.api",
    "report": "probe.api",
    "Protocol": "probe.protocol",
    "DEFAULT_LR_GRID": "probe.protocol",
    "parse_grid": "probe.protocol",
    "StoreSpec": "probe.stores",
    "COLUMNS": "probe.results.columns",
    "FitResult": "probe.fitting",
    "ProbeWarning": "probe.fitting",
    "Comparison": "probe.comparison",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names("probe", _LAZY, globals())
