"""What a probe method is to ``probe.fit``: the :class:`Method` protocol, the :class:`Case` it runs
on and the :class:`MethodResult` it gives back.

A method fits its whole grid (learning rates, k, C) on the ``train`` role, chooses one
configuration on the ``select`` role only (:func:`probe.selection.choose`: the reported split is
never an input to a choice), then evaluates the roles. ``probe.fit`` turns each configuration
into a results row (the shared columns, plus the method's own: :meth:`Method.columns`) and
keeps the selected configuration's per-row predictions. Adding a method is one module that
implements the protocol and one entry in :data:`probe.methods.METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from featstore.errors import FeatstoreError

from ..protocol import Protocol as ProbeProtocol
from ..selection import choose, refits
from .token_rows import TokenRows
from .view_rows import ViewRows

Metrics = dict[str, dict[str, float]]  # role → {"top1": %, "top5": % (>= 5 classes)}
Ranking = tuple[NDArray[np.int64], NDArray[np.int64] | None]  # per row: top-1 (N,), top-5 (N, ≤5) or None


@dataclass(frozen=True)
class Case:
    """One store × view × seed × shots as a method sees it: the rows of every role, already on
    the device, and what its warnings and log lines need.

    Roles: ``train`` (what the method fits or searches), ``select`` (the selection rows) and,
    where there is one apart from them, ``report``."""

    protocol: ProbeProtocol
    x: Mapping[str, torch.Tensor]  # role → raw features (N, D) on the device; each method normalizes its own copy
    y: Mapping[str, torch.Tensor]  # role → labels (N,) int64 on the device
    rows: Mapping[str, NDArray[np.int64]]  # role → the rows' indices into their store split
    split_rows: int  # rows of the whole train split (the linear heads' minibatch order is drawn over all of them)
    num_classes: int
    seed: int
    shots: int | None
    reported_role: str | None  # "report", "select" (--select-on report) or None (nothing reported)
    select_split: str  # where the selection rows come from: a store split, or "holdout" (a seeded part of train)
    device: torch.device
    dtype: torch.dtype  # the compute dtype of the linear heads' features
    name: str  # ``label [view] (seed 1 5-shot)``: how log lines name the case
    where: str  # ``store 'p' view 'v' seed 1 5-shot``: how warnings name the case
    first: bool  # the first seed × shots of this store × view: where once-per-probe warnings go
    first_view: bool  # the store's first view
    first_seed: bool  # the protocol's first seed
    warn: Callable[[str], None]
    log: Callable[[str], None]
    # what a method keeps across the cases of one run (the linear heads' epoch orders, per split size and seed)
    cache: dict[Hashable, object] = field(default_factory=dict)
    # role → its rows' K augmented views (probe.augment), for the roles that train on them (train, and
    # a holdout of train for the refit), one split's views shared by both; empty: center crops only
    augmented: Mapping[str, ViewRows] = field(default_factory=dict)
    # on a patch view: role → its rows' tokens (``x`` is then empty), and the bytes of them held resident
    tokens: Mapping[str, TokenRows] | None = None
    max_memory: int | None = None  # None: a quarter of the RAM / GPU memory

    def refits(self, *, val: bool = False) -> bool:
        """Whether the chosen configuration is fit again on train + selection rows and that model
        reported (:func:`probe.selection.refits`; ``val``: on a store's val split too)."""
        return refits(self.protocol.refit, self.reported_role, self.shots, self.select_split, val=val)


@dataclass
class Config:
    """One configuration of a method: its settings, accuracy per role, and whether it is the selected one."""

    # e.g. {"lr": 0.01, "wd": 0.0, "refit": False}, {"k": 20, "temperature": 0.07, "weights": "exp", "refit": False};
    # "refit": True on the one configuration fit again on train + selection rows after selection
    # (it is then the selected one, and has no selection-split numbers: those rows trained it)
    settings: dict[str, Any]
    metrics: Metrics  # empty for a configuration that has no numbers (a diverged head)
    selected: bool = False
    best_report: bool = False  # the best on the reported split (for comparison with papers only; never selected)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a head's train loss, logreg iterations


@dataclass
class MethodResult:
    """Every configuration of a method on one case, exactly one of them selected."""

    configs: list[Config]
    # the selected configuration's per-row predictions on each evaluated role it has them for
    predictions: dict[str, Ranking]

    @property
    def selected(self) -> Config:
        return next(c for c in self.configs if c.selected)


def mark_best_report(configs: list[Config], keys: Sequence[tuple[float, ...]]) -> None:
    """Mark the best configuration on the reported split, by :func:`probe.selection.choose`'s rule
    (ties → the smallest key): for comparison with papers only, never selected. Configurations
    without a reported number (a diverged head, nothing reported) are left out."""
    scores = [c.metrics["report"]["top1"] if "report" in c.metrics else math.nan for c in configs]
    best = choose(scores, keys)
    if best >= 0:
        configs[best].best_report = True


class Method(Protocol):
    """A probe method: the members ``probe.fit`` and the summaries use, and nothing else."""

    @property
    def name(self) -> str:
        """Its name in ``--method`` and in the results' ``method`` column."""
        ...

    @property
    def tokens(self) -> bool:
        """Whether it reads a patch view's tokens (``case.tokens``) instead of global features (``case.x``)."""
        ...

    @property
    def seeded(self) -> bool:
        """Whether its result depends on the seed beyond the rows (the linear heads' minibatch
        order). When False, ``probe.fit`` reuses a result for a later seed with the same rows and
        :meth:`variant`, warnings included (they were given with it)."""
        ...

    def variant(self, case: Case) -> Hashable:
        """What its result depends on besides the case's rows (and the protocol, the same for a run)."""
        ...

    def run(self, case: Case) -> MethodResult:
        """Fit the grid on ``train``, choose on ``select`` only, evaluate the roles; give its
        warnings through ``case.warn``."""
        ...

    def columns(self, case: Case, config: Config) -> dict[str, Any]:
        """The results columns of one configuration that this method fills (its settings, how it was fit)."""
        ...

    def setting(self, row: Mapping[str, Any]) -> str:
        """A results row's configuration in a few characters: ``lr 0.01``, ``k 20``, ``C 0.1 (refit)``."""
        ...


def grid_configs(
    protocol: ProbeProtocol,
    train_loss: NDArray[np.float64],
    finite: NDArray[np.bool_],
    chosen: int,
    refit: bool,
    per_head: Callable[[int], Metrics],
) -> list[Config]:
    """One :class:`Config` per (lr, wd) head of a batched grid (the linear and attentive heads): its
    train loss, whether it diverged, its metrics; the chosen one selected unless it is fit again; the
    best on the reported split marked."""
    configs = []
    for h, (lr, wd) in enumerate(protocol.heads):
        loss = round(float(train_loss[h]), 6) if finite[h] and np.isfinite(train_loss[h]) else None
        extra = {"train_loss": loss, "diverged": not bool(finite[h])}
        configs.append(Config({"lr": lr, "wd": wd, "refit": False}, per_head(h), selected=h == chosen and not refit, extra=extra))
    mark_best_report(configs, [(lr, wd) for lr, wd in protocol.heads])
    return configs


def select_head(case: Case, select_top1: NDArray[np.float64], finite: NDArray[np.bool_], what: str, hint: str) -> int:
    """The (lr, wd) head of a batched grid chosen on the selection rows' top-1 (the reported split is
    never an input), with what a user must hear about the grid: the heads that diverged (never
    selected), a refusal when every one did (``hint``: how to fix it), a choice at the grid's edge.
    ``what``: a head's name in those messages ("head", "attentive head")."""
    protocol = case.protocol
    lrs = [lr for lr, _ in protocol.heads]
    chosen = choose(select_top1, list(protocol.heads), finite)
    if not finite.all():
        wds = [wd for _, wd in protocol.heads]
        bad = ", ".join(f"{lrs[h]:g}" + (f"/wd {wds[h]:g}" if len(protocol.wd_grid) > 1 else "") for h in np.flatnonzero(~finite))
        case.warn(f"{case.where}: {int((~finite).sum())} {what}s diverged (lr {bad}); they are never selected")
    if chosen < 0:
        raise FeatstoreError(f"{case.where}: every {what} diverged", hint)
    if len(protocol.lr_grid) >= 3 and lrs[chosen] in (protocol.lr_grid[0], protocol.lr_grid[-1]) and case.first:
        of = "" if what == "head" else f" of the {what}s"
        case.warn(f"{case.where}: the selected lr {lrs[chosen]:g}{of} is at the edge of the grid; consider widening --lr-grid")
    return chosen
