"""The probe methods on cached features, one module each behind the :class:`~.method.Method`
protocol (:mod:`.linear`, :mod:`.neighbours`, :mod:`.logistic`, :mod:`.attentive`), over their
algorithms: the batched linear heads (:mod:`.heads`), the batched attentive heads (:mod:`.attention`,
on a patch view's tokens: :mod:`.token_rows`), weighted k-NN (:mod:`.knn`), L-BFGS logistic regression
(:mod:`.logreg`), and the one top-k scoring rule they share (:mod:`.topk`).

:data:`METHODS` is the registry ``probe.fit`` and the summaries look a method up in; its names
are :data:`probe.protocol.METHODS`, in the same (canonical) order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from featstore.errors import UsageError

from ..protocol import METHODS as NAMES
from .attentive import Attentive
from .linear import Linear
from .logistic import Logreg
from .method import Case, Config, Method, MethodResult
from .neighbours import Knn

METHODS: dict[str, Method] = {m.name: m for m in (Linear(), Knn(), Logreg(), Attentive())}
assert tuple(METHODS) == NAMES, "probe.protocol.METHODS names the registry's methods, in its order"

# a results.csv written before the method column existed holds linear rows only
UNNAMED = "linear"


def get(name: str) -> Method:
    """The method called ``name``; UsageError for a name the registry does not hold."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}", f"use one of {', '.join(METHODS)}") from None


def of_row(row: Mapping[str, Any]) -> Method:
    """The method of a results row, to read its columns: a row without one (an older results.csv)
    is linear, and so is read a row of a method this version does not know (another version's
    results.csv, in a leaderboard), as before the registry existed."""
    return METHODS.get(row.get("method") or UNNAMED, METHODS[UNNAMED])


__all__ = ["METHODS", "UNNAMED", "Case", "Config", "Method", "MethodResult", "get", "of_row"]
