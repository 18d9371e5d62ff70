"""The probe protocol: every hyperparameter that changes a probe's accuracy, and its stable hash.

Results from different protocol hashes are never ranked together. Grid syntax (``--lr-grid``,
``--wd-grid``): a comma list ``1e-4,1e-3,0.01`` or a log range ``start:stop:count``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from featstore.errors import UsageError

# Bump when the training semantics change without a field changing (e.g. init, what decays),
# so that old and new results never share a hash.
PROTOCOL_VERSION = 1

DEFAULT_LR_GRID = "1e-5:1e-1:13"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
NORMALIZATIONS = ("none", "l2", "standardize")
SELECTION_RULES = ("val_top1",)
# where the LR is chosen: "auto" = the store's val split when a test split is reported, otherwise a
# seeded holdout of train; "holdout" = always the train holdout; "report" = on the reported split
# itself (max over the reported split: optimistic, opt-in, labelled so everywhere)
SELECT_ON = ("auto", "holdout", "report")


def _round_sig(value: float, digits: int = 4) -> float:
    # log-range points rounded so the grid (and the hash) reads the same everywhere
    return float(f"{value:.{digits}g}")


def parse_grid(text: str | float | list | tuple, *, what: str = "learning rate", allow_zero: bool = False) -> tuple[float, ...]:
    """Parse ``1e-4,1e-3,0.01`` or ``start:stop:count`` (log-spaced) into a sorted tuple of floats."""
    option = "--lr-grid" if what == "learning rate" else "--wd-grid"
    if isinstance(text, (int, float)):
        values = [float(text)]
    elif isinstance(text, (list, tuple)):
        values = [float(v) for v in text]
    else:
        s = str(text).strip()
        if not s:
            raise UsageError(f"empty {what} grid", f"pass {option} like 1e-4,1e-3,0.01 or 1e-5:1e-1:13")
        if ":" in s:
            parts = s.split(":")
            if len(parts) != 3:
                raise UsageError(f"bad {what} grid {s!r}: a range is start:stop:count", f"e.g. {option} 1e-5:1e-1:13")
            try:
                start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            except ValueError:
                raise UsageError(f"bad {what} grid {s!r}: start and stop must be numbers, count an integer", f"e.g. {option} 1e-5:1e-1:13") from None
            if not (start > 0 and stop > 0):
                raise UsageError(f"bad {what} grid {s!r}: a log range needs positive start and stop", f"e.g. {option} 1e-5:1e-1:13")
            if count < 1 or (count == 1 and start != stop):
                raise UsageError(f"bad {what} grid {s!r}: count must be >= 2 (or 1 with start == stop)", f"e.g. {option} 1e-5:1e-1:13")
            if start > stop:
                raise UsageError(f"bad {what} grid {s!r}: start is larger than stop", f"e.g. {option} 1e-5:1e-1:13")
            values = [_round_sig(v) for v in np.logspace(math.log10(start), math.log10(stop), count)]
        else:
            values = []
            for item in s.split(","):
                try:
                    values.append(float(item))
                except ValueError:
                    raise UsageError(f"bad {what} grid {s!r}: {item.strip()!r} is not a number", f"pass {option} like 1e-4,1e-3,0.01 or 1e-5:1e-1:13") from None
    for v in values:
        if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            need = "non-negative" if allow_zero else "positive"
            raise UsageError(f"bad {what} grid: {v!r} is not a {need} number", f"every {what} must be {need} and finite")
    if not values:
        raise UsageError(f"empty {what} grid", f"pass {option} like 1e-4,1e-3,0.01")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class Protocol:
    """Every hyperparameter that changes accuracy. The defaults are explained in docs/probe.md."""

    lr_grid: tuple[float, ...] = field(default_factory=lambda: parse_grid(DEFAULT_LR_GRID))
    wd_grid: tuple[float, ...] = (0.0,)
    optimizer: str = "sgd"
    epochs: int = 30
    batch_size: int = 256
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    normalize: str = "standardize"
    val_fraction: float = 0.1
    selection: str = "val_top1"
    select_on: str = "auto"
    seed: int = 0
    version: int = PROTOCOL_VERSION

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("lr_grid", parse_grid(self.lr_grid))
        set_("wd_grid", parse_grid(self.wd_grid, what="weight decay", allow_zero=True))
        set_("betas", tuple(float(b) for b in self.betas))
        for name in ("momentum", "eps", "val_fraction"):
            set_(name, float(getattr(self, name)))
        for name in ("epochs", "batch_size", "seed", "version"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise UsageError(f"{name.replace('_', ' ')} must be an integer, got {value!r}")
            set_(name, int(value))
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        if self.normalize not in NORMALIZATIONS:
            raise UsageError(f"unknown normalization {self.normalize!r}", f"use one of {', '.join(NORMALIZATIONS)}")
        if self.selection not in SELECTION_RULES:
            raise UsageError(f"unknown selection rule {self.selection!r}", f"use one of {', '.join(SELECTION_RULES)}")
        if self.select_on not in SELECT_ON:
            raise UsageError(f"unknown --select-on {self.select_on!r}", f"use one of {', '.join(SELECT_ON)}")
        if self.epochs < 1:
            raise UsageError(f"epochs must be >= 1, got {self.epochs}", "pass --epochs 1 or more")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}", "pass --batch-size 1 or more")
        if not 0.0 <= self.momentum < 1.0:
            raise UsageError(f"momentum must be in [0, 1), got {self.momentum}", "pass --momentum like 0.9")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UsageError(f"AdamW betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise UsageError(f"eps must be positive, got {self.eps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"validation fraction must be in (0, 1), got {self.val_fraction}", "pass --val-fraction like 0.1")

    @property
    def heads(self) -> list[tuple[float, float]]:
        """The (lr, wd) pair of every head, in head order (LR major, then weight decay)."""
        return [(lr, wd) for lr in self.lr_grid for wd in self.wd_grid]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_grid"] = list(self.lr_grid)
        d["wd_grid"] = list(self.wd_grid)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UsageError(f"unknown protocol fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def hash(self) -> str:
        """Stable across runs and machines: sha256 of the canonical JSON of every field."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def replace(self, **changes) -> "Protocol":
        d = self.to_dict()
        d.update(changes)
        return Protocol.from_dict(d)
