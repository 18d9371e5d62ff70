"""probe: linear probes on cached features — every head of an LR sweep trained at once.

    >>> import probe
    >>> rows = probe.fit(["a.zarr", "b.zarr"], probe.Protocol(epochs=30), device="auto", out="probe-results")
"""

from .fit import COLUMNS, ProbeWarning, fit
from .protocol import DEFAULT_LR_GRID, Protocol, parse_grid

__all__ = ["COLUMNS", "DEFAULT_LR_GRID", "ProbeWarning", "Protocol", "fit", "parse_grid"]
