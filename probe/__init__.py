"""probe: linear probes on cached features — every head of an LR sweep trained at once — and the
rest of the evaluation battery (k-NN, logistic regression, few-shot, seeds) under the same protocol.

    >>> import probe
    >>> rows = probe.fit(["a.zarr", "ft=b.zarr:cls4"], probe.Protocol(epochs=30), device="auto", out="probe-results/ab")
    >>> rows = probe.fit("a.zarr", probe.Protocol(methods="linear,knn,logreg", shots="1,5,all", seeds="0,1,2"))
"""

from .fitting import FitResult, ProbeWarning, fit, fit_run
from .results.columns import COLUMNS
from .protocol import DEFAULT_LR_GRID, Protocol, parse_grid
from .stores import StoreSpec

__all__ = ["COLUMNS", "DEFAULT_LR_GRID", "FitResult", "ProbeWarning", "Protocol", "StoreSpec", "fit", "fit_run", "parse_grid"]
