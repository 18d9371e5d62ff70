"""Which stores a comparison holds: ``[LABEL=]PATH[:VIEW]`` specs, each store's label and views.

A CNN store has ``pool``, a ViT store ``cls``, ``avgpool`` and ``cls4``: stores of different
architectures share no view, so each store has a *primary view* (``pool`` for a CNN, ``cls`` for
a ViT, the first view a custom builder returned) used when the stores share none. Labels name
the stores in tables, CSV and plots: a fine-tuned and a pretrained DINOv2 must not both read
``dino``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from featstore.errors import UsageError
from featstore.store import FeatureStore, store_label
from featstore.store.verify import require_readable

# the view each encoder family's extractor puts first (featstore.encoders.FeatureEncoder)
PRIMARY_VIEW = {"vit": "cls", "cnn": "pool"}
_LABEL = re.compile(r"^[^=/\\:]+$")
_VIEW = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class StoreSpec:
    """One store of a comparison: its path, an optional label and an optional view of its own.

    Parameters
    ----------
    path : str
        A store folder, an ``.h5`` export or a URL.
    label : str, optional
        Its name in tables, CSVs and plots (default: the weights file name, else the model name).
    view : str, optional
        Probe this view of this store only (default: the views of :func:`probe.fit`'s ``views``).

    Examples
    --------
    >>> probe.StoreSpec("dinov2-ft.zarr", label="ft", view="cls4")   # as the text "ft=dinov2-ft.zarr:cls4"
    StoreSpec(path='dinov2-ft.zarr', label='ft', view='cls4')
    """

    path: str
    label: str | None = None
    view: str | None = None


def parse_store_spec(spec: str | os.PathLike | StoreSpec) -> StoreSpec:
    """``PATH``, ``LABEL=PATH``, ``PATH:VIEW`` or ``LABEL=PATH:VIEW``.

    A text that names an existing path is a path whatever it contains; ``os.PathLike`` is always
    a plain path.
    """
    if isinstance(spec, StoreSpec):
        return spec
    if isinstance(spec, os.PathLike):
        return StoreSpec(os.fspath(spec))
    text = str(spec)
    if Path(text).exists():
        return StoreSpec(text)
    label = view = None
    head, eq, rest = text.partition("=")
    if eq and _LABEL.match(head) and rest:
        label, text = head.strip(), rest
        if not label:
            raise UsageError(f"empty label in --store {spec!r}", "write --store LABEL=PATH")
    if not Path(text).exists():
        path, colon, tail = text.rpartition(":")
        if colon and path and _VIEW.match(tail):
            text, view = path, tail
    return StoreSpec(text, label, view)


def primary_view(store: FeatureStore) -> str:
    """``pool`` for a CNN, ``cls`` for a ViT, else the first view the store was written with."""
    views = store.views
    family = store.meta.encoder.family
    preferred = PRIMARY_VIEW.get(family) if family is not None else None
    return preferred if preferred in views else next(iter(views))


def default_label(store: FeatureStore) -> str:
    """The weights file's name without its suffix, else the model name, else the store's folder
    name: :func:`featstore.store.store_label`, the label ``featstore ls`` shows."""
    return store_label(store.meta, store.path)


def assign_labels(specs: list[StoreSpec], stores: list[FeatureStore]) -> list[str]:
    """One distinct label per store: the given one, or the default made unique by the store's path."""
    given = [s.label for s in specs if s.label]
    twice = sorted({g for g in given if given.count(g) > 1})
    if twice:
        raise UsageError(f"label {twice[0]!r} given to several stores", "give each --store LABEL=PATH its own label")
    base = [s.label or default_label(fs) for s, fs in zip(specs, stores)]
    labels = []
    for i, (spec, fs) in enumerate(zip(specs, stores)):
        others = [j for j, b in enumerate(base) if b == base[i] and j != i]
        if spec.label or not others:
            labels.append(base[i])
            continue
        # disambiguate by the folder name, or by the whole path when the folder names are equal too
        folder = Path(fs.path).name
        unique = all(Path(stores[j].path).name != folder for j in others)
        labels.append(f"{base[i]} ({folder if unique else fs.path})")
    return labels


def resolve_views(
    specs: list[StoreSpec], stores: list[FeatureStore], views: list[str] | None, log=None, patch: bool = False
) -> list[list[str]]:
    """The views probed on each store.

    A store's own ``:VIEW`` wins. The others take the asked ``views`` (each must be in every one
    of them), or every view they all share (patch views only with ``patch``: a token method such
    as the attentive probe runs), or, when they share none (a CNN and a ViT), each its primary view.
    """
    for spec, fs in zip(specs, stores):
        if spec.view and spec.view not in fs.views:
            raise UsageError(f"view {spec.view!r} not in store {str(fs.path)!r}", f"it has: {', '.join(fs.views)}")
    rest = [fs for spec, fs in zip(specs, stores) if not spec.view]
    if views and not rest:
        raise UsageError(
            f"--view {', '.join(views)} applies to no store: every --store names its own view", "drop --view, or the stores' :VIEW"
        )
    chosen: list[str] | None = None
    if views:
        chosen = list(dict.fromkeys(views))
        for fs in rest:
            for v in chosen:
                if v not in fs.views:
                    raise UsageError(
                        f"view {v!r} not in store {str(fs.path)!r}",
                        f"it has: {', '.join(fs.views)}; give that store its own view with --store {fs.path}:VIEW",
                    )
    elif rest:
        chosen = [v for v in rest[0].views if (patch or v not in rest[0].patch_views) and all(v in fs.views for fs in rest[1:])]
        if not chosen and log is not None:
            log(
                "the stores share no feature view: each uses its primary view ("
                + ", ".join(f"{fs.path}: {primary_view(fs)}" for fs in rest)
                + "); pick one per store with --store PATH:VIEW"
            )
    out = []
    for spec, fs in zip(specs, stores):
        out.append([spec.view] if spec.view else (chosen or [primary_view(fs)]))
    return out


def open_checked(path: str | os.PathLike, verify: bool, warn: Callable[[str], None], read: str = "its rows") -> FeatureStore:
    """A complete store whose arrays agree with its schema; with ``verify`` every unit read is
    checked against its content digest (a damaged one is refused, naming the split, array, rows
    and the command that repairs it). ``read`` names what a store without digests has read unchecked."""
    fs = FeatureStore.open(path, verify=verify).require_complete()
    require_readable(fs)
    if verify and not fs.digests.present:
        warn(
            f"store {str(path)!r} records no content digests (written before featstore recorded them): {read} are read "
            "unchecked; `featstore verify` checks what it can, `featstore extract ... --repair` adds digests"
        )
    return fs
