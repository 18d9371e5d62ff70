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

from .fewshot import parse_ints

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
METHODS = ("linear", "knn", "logreg", "attentive")
KNN_WEIGHTS = ("exp", "uniform")
DEFAULT_KNN_K = (10, 20, 100, 200)  # DINO (Caron et al. 2021) and DINOv2's k-NN evaluation
DEFAULT_KNN_TEMPERATURE = 0.07  # DINO's T in the vote weight exp(similarity / T)
DEFAULT_LOGREG_C = "1e-6:1e5:45"  # DINOv2's grid 10^linspace(-6, 5, 45) (dinov2/eval/log_regression.py)
DEFAULT_LOGREG_MAX_ITER = 1000  # DINOv2's and scikit-learn's cap
DEFAULT_LOGREG_TOL = 1e-4  # scikit-learn's tol: max |gradient| of the mean-scaled objective
# The battery's fields enter the record (and the hash) only where they act: the k-NN settings
# when k-NN runs, and so on. A default run (linear only, all rows, one seed) therefore keeps the
# record and hash it had before the battery existed.
_KNN_FIELDS = ("knn_k", "knn_temperature", "knn_weights")
_LOGREG_FIELDS = ("logreg_C", "logreg_max_iter", "logreg_tol")
_ATTENTIVE_FIELDS = ("attentive_queries", "attentive_heads", "attentive_optimizer")
# ``refit`` acts on every method (the reported model is fit again on train + holdout), so it is
# always recorded: it entered the default record with #27, which changed the default hash.
_LEGACY_NAMES = {"logreg_refit": "refit"}  # protocol.json records written before #27
# Augmented views (#25): "on" (default: train on a store's stored views where it has them), "off",
# or what a run resolved "on" to, "<method>:<K>" (probe.augment). Only the resolved form acts, so only
# it enters the record and the hash: a run without views keeps the hash it had before views existed.
AUGMENT = ("on", "off")
AUGMENT_NOTE = (
    "linear heads: one of the K stored views per train row per epoch (seeded); selection and reported rows, knn and logreg: the center crop"
)


def augment_views(augment: str) -> int | None:
    """K of a resolved augmentation ``"<method>:<K>"``; None for any other text."""
    method, _, views = str(augment).rpartition(":")
    return int(views) if method and views.isdigit() and int(views) > 0 else None


def _round_sig(value: float, digits: int = 4) -> float:
    # log-range points rounded so the grid (and the hash) reads the same everywhere
    return float(f"{value:.{digits}g}")


def check_knn(ks, temperature: float, weights: str) -> tuple[int, ...]:
    """The k-NN settings' one check (Protocol's and knn.predict's): the k grid as a sorted tuple
    of distinct positive ints; UsageError on a bad k, temperature or weighting."""
    ks = parse_ints(ks if ks is None or isinstance(ks, (str, int, float)) else list(ks), what="k-NN k grid", option="--knn-k", minimum=1)
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"k-NN temperature must be positive, got {temperature!r}", "pass --knn-temperature like 0.07")
    if weights not in KNN_WEIGHTS:
        raise UsageError(f"unknown k-NN weighting {weights!r}", f"use one of {', '.join(KNN_WEIGHTS)}")
    return ks


def check_logreg(Cs, tol: float, max_iter: int) -> tuple[float, ...]:
    """The logistic-regression settings' one check (Protocol's and logreg.fit_path's): the C grid
    as a sorted tuple of distinct positive floats; UsageError on a bad C, tolerance or iteration cap."""
    Cs = parse_grid(Cs if Cs is None or isinstance(Cs, (str, int, float)) else list(Cs), what="C", option="--logreg-C")
    if not (math.isfinite(tol) and tol > 0):
        raise UsageError(f"logistic-regression tolerance must be positive, got {tol!r}", "pass --logreg-tol like 1e-4")
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise UsageError(
            f"logistic-regression iteration cap must be a positive integer, got {max_iter!r}", "pass --logreg-max-iter like 1000"
        )
    return Cs


def parse_grid(
    text: str | float | list | tuple | None, *, what: str = "learning rate", allow_zero: bool = False, option: str | None = None
) -> tuple[float, ...]:
    """Parse ``1e-4,1e-3,0.01`` or ``start:stop:count`` (log-spaced) into a sorted tuple of floats."""
    option = option or ("--lr-grid" if what == "learning rate" else "--wd-grid")
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
                raise UsageError(
                    f"bad {what} grid {s!r}: start and stop must be numbers, count an integer", f"e.g. {option} 1e-5:1e-1:13"
                ) from None
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
                    raise UsageError(
                        f"bad {what} grid {s!r}: {item.strip()!r} is not a number", f"pass {option} like 1e-4,1e-3,0.01 or 1e-5:1e-1:13"
                    ) from None
    for v in values:
        if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            need = "non-negative" if allow_zero else "positive"
            raise UsageError(f"bad {what} grid: {v!r} is not a {need} number", f"every {what} must be {need} and finite")
    if not values:
        raise UsageError(f"empty {what} grid", f"pass {option} like 1e-4,1e-3,0.01")
    return tuple(sorted(set(values)))


def _number(name: str, value: object) -> float:
    """``value`` as a float; a UsageError naming the field when it is not a number (a protocol record
    edited by hand, a None or a list where probe fit wrote a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{name.replace('_', ' ')} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"{name.replace('_', ' ')} must be a number, got {value!r}") from None


@dataclass(frozen=True)
class Protocol:
    """Every hyperparameter that changes accuracy. The defaults are explained in docs/probe.md.

    Parameters
    ----------
    lr_grid, wd_grid : str, float or sequence of float
        Learning rates (default ``"1e-5:1e-1:13"``) and weight decays (default ``0``): a list, a
        comma text ``"1e-4,1e-3"`` or a log range ``"start:stop:count"``; sorted, de-duplicated,
        rounded to 4 significant digits.
    optimizer : {"sgd", "adamw"}, default "sgd"
    epochs, batch_size : int, default 30, 256
    momentum : float, default 0.9
        SGD only (``betas``, ``eps``: AdamW only).
    schedule : {"cosine", "constant"}, default "cosine"
    normalize : {"none", "l2", "standardize"}, default "standardize"
    select_on : {"auto", "holdout", "report"}, default "auto"
        Where the LR (k, C) is chosen; ``val_fraction`` (0.1) is the seeded train holdout's share.
    test_fraction : float, optional
        A store with a single split (a plain class-folder dataset's ``all``): this share of every
        class is drawn, seeded by ``seed`` and stratified, as the report split ``drawn-test``
        before the selection holdout is taken from the rest.
    seed : int, default 0
    seeds : sequence of int or str, default ()
        Repeat everything per seed (``seed`` is then ``seeds[0]``).
    methods : sequence of str or str, default ("linear",)
        Any of ``linear``, ``knn``, ``logreg``, ``attentive`` (on a patch view).
    shots : sequence of int or str, default ()
        Few-shot training sets, examples per class; ``"all"`` (0) is every training row.
    knn_k, knn_temperature, knn_weights
        k-NN: neighbour counts (10, 20, 100, 200), T (0.07), ``"exp"`` or ``"uniform"`` votes.
    logreg_C, logreg_max_iter, logreg_tol
        Logistic regression: the C grid (``"1e-6:1e5:45"``), L-BFGS cap (1000) and tolerance (1e-4).
    attentive_queries, attentive_heads, attentive_optimizer
        The attentive probe: learned queries (1), attention heads (0: the tokens' width / 64) and
        its optimizer (``"adamw"``); it trains over ``lr_grid`` × ``wd_grid`` like the linear heads.
    refit : bool, default True
        After selection, fit the reported model again on the training rows and the selection rows
        (:func:`probe.selection.refits` says where): every method when the selection rows are a
        holdout of train, logistic regression on train + val too. False: report the model fit
        before selection, on train minus the holdout.

    Raises
    ------
    featstore.UsageError
        Any value out of its range or choices.

    Examples
    --------
    >>> probe.Protocol(lr_grid="1e-3:1e-1:5", epochs=10).lr_grid
    (0.001, 0.003162, 0.01, 0.03162, 0.1)
    """

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
    test_fraction: float | None = None  # a store with one split: the share drawn as its report split
    selection: str = "val_top1"
    select_on: str = "auto"
    seed: int = 0
    version: int = PROTOCOL_VERSION
    # the evaluation battery (docs/probe.md "Methods"); see _KNN_FIELDS for how they are hashed
    methods: tuple[str, ...] = ("linear",)
    knn_k: tuple[int, ...] = DEFAULT_KNN_K
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE
    knn_weights: str = "exp"
    logreg_C: tuple[float, ...] = field(default_factory=lambda: parse_grid(DEFAULT_LOGREG_C, what="C", option="--logreg-C"))
    logreg_max_iter: int = DEFAULT_LOGREG_MAX_ITER
    logreg_tol: float = DEFAULT_LOGREG_TOL
    # the attentive probe (docs/probe.md "Attentive probe"): learned queries, attention heads (0: D / 64),
    # its optimizer (AdamW, as V-JEPA's attentive probes; the linear heads keep ``optimizer``)
    attentive_queries: int = 1
    attentive_heads: int = 0
    attentive_optimizer: str = "adamw"
    refit: bool = True
    shots: tuple[int, ...] = ()  # examples per class; 0 = every training row; () = every training row only
    seeds: tuple[int, ...] = ()  # () = just ``seed``; else every seed in turn (seed = seeds[0])
    augment: str = "on"  # "on" | "off" | resolved "rrc-flip:K" (see AUGMENT)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("lr_grid", parse_grid(self.lr_grid))
        set_("wd_grid", parse_grid(self.wd_grid, what="weight decay", allow_zero=True))
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise UsageError(f"betas must be two numbers, got {self.betas!r}")
        set_("betas", tuple(_number("betas", b) for b in self.betas))
        for name in ("momentum", "eps", "val_fraction", "knn_temperature", "logreg_tol"):
            set_(name, _number(name, getattr(self, name)))
        self._check_battery(set_)
        for name in ("epochs", "batch_size", "seed", "version", "logreg_max_iter", "attentive_queries", "attentive_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value:
                raise UsageError(f"{name.replace('_', ' ')} must be an integer, got {value!r}")
            set_(name, int(value))
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.attentive_optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown attentive optimizer {self.attentive_optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.attentive_queries < 1:
            raise UsageError(f"--queries must be >= 1, got {self.attentive_queries}", "pass --queries 1 (V-JEPA) or more")
        if self.attentive_heads < 0:
            raise UsageError(
                f"--attention-heads must be >= 0, got {self.attentive_heads}", "pass 0 (D / 64) or a divisor of the token width"
            )
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        if self.normalize not in NORMALIZATIONS:
            raise UsageError(f"unknown normalization {self.normalize!r}", f"use one of {', '.join(NORMALIZATIONS)}")
        if self.selection not in SELECTION_RULES:
            raise UsageError(f"unknown selection rule {self.selection!r}", f"use one of {', '.join(SELECTION_RULES)}")
        if self.select_on not in SELECT_ON:
            raise UsageError(f"unknown --select-on {self.select_on!r}", f"use one of {', '.join(SELECT_ON)}")
        # numpy's generators take no negative seed and torch's none of 2**63 or more: said here, before any store is read
        for seed in (self.seed, *self.seeds):
            if not 0 <= seed < 2**63:
                raise UsageError(f"seed {seed} is outside [0, 2**63)", "pass --seed / --seeds like 0 or 0,1,2")
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
        if self.augment not in AUGMENT and augment_views(self.augment) is None:
            raise UsageError(f"unknown --augment {self.augment!r}", "use on or off")
        if self.test_fraction is not None:
            set_("test_fraction", float(self.test_fraction))
            if not 0.0 < self.test_fraction < 1.0:
                raise UsageError(f"test fraction must be in (0, 1), got {self.test_fraction}", "pass --test-fraction like 0.2")

    def _check_battery(self, set_) -> None:
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        methods = tuple(m.strip() for part in methods for m in str(part).split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise UsageError(
                f"unknown method {', '.join(unknown) or '(none)'}",
                f"pass --method with any of {', '.join(METHODS)}, e.g. linear,knn,logreg",
            )
        set_("methods", tuple(m for m in METHODS if m in methods))  # canonical order: one hash per set
        set_("knn_k", check_knn(self.knn_k, self.knn_temperature, self.knn_weights))
        set_("logreg_C", check_logreg(self.logreg_C, self.logreg_tol, self.logreg_max_iter))
        set_("refit", bool(self.refit))
        set_(
            "shots",
            parse_ints(self.shots, what="shots", option="--shots", minimum=0, allow_all=True)
            if self.shots not in ((), [], None, "")
            else (),
        )
        seeds = parse_ints(self.seeds, what="seeds", option="--seeds", keep_order=True) if self.seeds not in ((), [], None, "") else ()
        if seeds:
            set_("seed", seeds[0])
        set_("seeds", seeds)

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """Every seed a run repeats over (the single ``seed`` unless ``seeds`` is given)."""
        return self.seeds or (self.seed,)

    @property
    def run_shots(self) -> tuple[int | None, ...]:
        """Training-set sizes a run repeats over: examples per class, None = every training row."""
        return tuple(s or None for s in self.shots) if self.shots else (None,)

    @property
    def fixed(self) -> str | None:
        """The one setting of a protocol that selects nothing (every method has a single
        configuration: one lr and wd, one k, one C), e.g. ``lr 0.01``; None when it selects."""
        grids = {
            "linear": (
                len(self.lr_grid) * len(self.wd_grid),
                f"lr {self.lr_grid[0]:g}" + (f" wd {self.wd_grid[0]:g}" if self.wd_grid[0] else ""),
            ),
            "knn": (len(self.knn_k), f"k {self.knn_k[0]}"),
            "logreg": (len(self.logreg_C), f"C {self.logreg_C[0]:g}"),
        }
        grids["attentive"] = grids["linear"]
        if any(grids[m][0] > 1 for m in self.methods):
            return None
        return ", ".join(grids[m][1] for m in self.methods)

    @property
    def heads(self) -> list[tuple[float, float]]:
        """The (lr, wd) pair of every head, in head order (LR major, then weight decay)."""
        return [(lr, wd) for lr in self.lr_grid for wd in self.wd_grid]

    def _all_fields(self) -> dict:
        d = asdict(self)
        for name, value in d.items():
            if isinstance(value, tuple):
                d[name] = list(value)
        return d

    def to_dict(self) -> dict:
        """The record (and what the hash covers): every field that acts on this run's results."""
        d = self._all_fields()
        dropped = []
        if self.methods == ("linear",):
            dropped.append("methods")
        if "knn" not in self.methods:
            dropped += _KNN_FIELDS
        if "logreg" not in self.methods:
            dropped += _LOGREG_FIELDS
        if "attentive" not in self.methods:
            dropped += _ATTENTIVE_FIELDS
        if not self.shots:
            dropped.append("shots")
        if self.test_fraction is None:  # runs without it keep the hash they had before it existed
            dropped.append("test_fraction")
        if len(self.seeds) <= 1:
            dropped.append("seeds")
        if self.augment in AUGMENT:  # unresolved or off: no views are trained on
            dropped.append("augment")
        for name in dropped:
            d.pop(name)
        if "augment" in d:
            method, views = str(self.augment).rsplit(":", 1)
            d["augment"] = {"method": method, "views": int(views), "applies": AUGMENT_NOTE}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Protocol:
        names = {f.name for f in fields(cls)}
        d = dict(d)
        for old, new in _LEGACY_NAMES.items():
            if old in d:  # read under today's name; the hash is today's (refit now acts on every method)
                d.setdefault(new, d.pop(old))
        if isinstance(d.get("augment"), dict):  # the record's form of a resolved augmentation
            d["augment"] = f"{d['augment']['method']}:{d['augment']['views']}"
        # a record without the field trained on no views (to_dict leaves "off" out): read as off, not as
        # the default "on", which would train a rerun on views the recorded run never saw
        d.setdefault("augment", "off")
        unknown = set(d) - names
        if unknown:
            raise UsageError(f"unknown protocol fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def hash(self) -> str:
        """Stable across runs and machines: sha256 of the canonical JSON of every field."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def replace(self, **changes) -> Protocol:
        d = self._all_fields()
        d.update(changes)
        return Protocol.from_dict(d)
