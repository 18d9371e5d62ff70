"""The public Python API of featstore: ``featstore.open``, ``extract``, ``ls``, ``lookup``, ``export``.

Each function imports its implementation when called, so ``import featstore`` (and the command
line's start-up) imports no torch, zarr or timm. ``featstore/__init__.py`` exposes these names
lazily; docs/api.md walks through them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for readers and type checkers only: nothing heavy is imported at run time
    from .cache import StoreEntry
    from .request import ExtractConfig, ExtractResult
    from .store import FeatureStore


def open(path: str | os.PathLike, mode: str = "r", verify: bool = False) -> FeatureStore:
    """Open a feature store for reading.

    Parameters
    ----------
    path : str or os.PathLike
        A Zarr store folder (``feats.zarr``), an HDF5 export (``feats.h5``) or an ``s3://``,
        ``gs://`` or ``http(s)://`` URL of either.
    mode : {"r", "r+"}, default "r"
        ``"r+"`` opens a local Zarr store for writing (what an extraction does); URLs and HDF5
        exports are read-only.
    verify : bool, default False
        Check every unit a read covers wholly against the store's content digests (what
        ``probe fit`` does); a damaged one raises a one-line ``FeatstoreError`` naming the split,
        array and rows. ``featstore verify`` checks the whole store.

    Returns
    -------
    FeatureStore
        ``.splits``, ``.views`` (view → dim), ``.attrs`` (provenance), ``.labels(split)``,
        ``.paths(split)``, ``.valid(split)`` and ``.features(split, view)``, a lazy array that
        reads only the chunks an index touches (``np.asarray`` reads it all).

    Raises
    ------
    FeatstoreError
        The path does not exist or is not a featstore store.

    Examples
    --------
    >>> store = featstore.open("digits.zarr")                       # doctest: +SKIP
    >>> store.splits, store.views                                   # doctest: +SKIP
    (['test', 'train', 'val'], {'pool': 512})
    >>> store.features("train", "pool")[:4].shape                   # doctest: +SKIP
    (4, 512)
    """
    from .store import FeatureStore

    return FeatureStore.open(path, mode=mode, verify=verify)


def extract(
    config: ExtractConfig | None = None, /, *, log: Callable[[str], None] | None = None, progress: bool | str = True, **fields
) -> ExtractResult:
    """Run a frozen encoder over a labelled image dataset into a store (or resume it, or find it up to date).

    Parameters
    ----------
    config : ExtractConfig, optional
        The whole request. Instead of it (or to override its fields), pass the fields of
        :class:`ExtractConfig` as keywords: ``model`` and ``dataset`` (required), ``out`` (default:
        the cache, ``$FEATSTORE_HOME/stores/<dataset>/<model>-<key>.zarr``), ``weights``,
        ``random_init``, ``views``, ``loader``, ``device``, ``batch_size``, ``workers``, ``dtype``,
        ``image_size``, ``resize``, ``interpolation``, ``mean``, ``std``, ``overwrite``, ``strict``,
        ``chunk_rows``, ``compile``, ``cuda_graphs``, ``data_root``, ``trust_checkpoint``, ``ignore_keys``, ``split``
        (``"train=0.7,val=0.1,test=0.2"``: seeded stratified splits of a dataset without any), ``split_seed``.
    log : callable, optional
        Receives each progress or notice line (default: written to stderr).
    progress : bool or {"auto", "bar", "lines", "off"}, default True
        True/"auto": a bar when stderr is a terminal, else a line every
        ``$FEATSTORE_PROGRESS_SECONDS`` (30) s; False/"off": none.
    **fields
        :class:`ExtractConfig` fields, as above.

    Returns
    -------
    ExtractResult
        ``store`` (its path), ``status`` ("created", "resumed" or "up to date"), ``rows`` per split,
        ``rows_written``, ``invalid``, ``nonfinite``, ``seconds``, ``images_per_second``;
        ``summary()`` is the line the CLI prints.

    Raises
    ------
    UsageError
        A wrong argument: unknown model, view, dtype, dataset; ``out`` holding another store.
    FeatstoreError
        A runtime failure the user can fix: missing weights, a store locked by another run, a full disk.
    TypeError
        An unknown keyword, or neither ``config`` nor ``model`` and ``dataset``.

    Examples
    --------
    >>> result = featstore.extract(model="resnet18", dataset="digits", out="digits.zarr",
    ...                            random_init=True, progress=False)              # doctest: +SKIP
    >>> result.status, result.rows                                                # doctest: +SKIP
    ('created', {'test': 360, 'train': 1078, 'val': 359})
    """
    from .request import ExtractConfig

    if config is None:
        config = ExtractConfig(**fields)
    elif not isinstance(config, ExtractConfig):
        raise TypeError(f"featstore.extract() takes an ExtractConfig or its fields as keywords, not {type(config).__name__}")
    elif fields:
        config = dataclasses.replace(config, **fields)
    if isinstance(config.views, str):
        config = dataclasses.replace(config, views=[v.strip() for v in config.views.split(",") if v.strip()])
    from .extraction import extract as run
    from .progress import log_to_stderr

    return run(config, log=log or log_to_stderr, progress=progress)


def ls(paths: list[str | os.PathLike] | str | os.PathLike | None = None) -> list[StoreEntry]:
    """List feature stores: those in the cache, or those at ``paths``.

    Parameters
    ----------
    paths : list of str or os.PathLike, or one of them, optional
        Stores, folders holding stores, ``.h5`` exports or URLs. Default: every store in the cache
        (``$FEATSTORE_HOME/stores``).

    Returns
    -------
    list of StoreEntry
        One per store: ``path``, ``label``, ``model``, ``weights``, ``dataset``, ``views``, ``rows``,
        ``invalid``, ``size_bytes``, ``created``, ``complete``, ``state``; ``to_dict()`` is
        ``featstore ls --json``'s object.

    Raises
    ------
    FeatstoreError
        A path that is neither a store nor a folder holding stores.

    Examples
    --------
    >>> [(e.model, e.dataset, e.rows) for e in featstore.ls()]     # doctest: +SKIP
    [('resnet18', 'digits', 1797)]
    """
    from .cache import list_stores

    if paths is not None and isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return list_stores([os.fspath(p) for p in paths] if paths else None)


def lookup(model: str, dataset: str, weights: str | os.PathLike | None = None) -> str:
    """The path of the one complete cached store of ``model`` on ``dataset``, without building a model.

    Parameters
    ----------
    model : str
        The model as given to :func:`extract` (a preset, an alias, a timm name).
    dataset : str
        The dataset as given to :func:`extract` (``digits``, ``imagenet``, a folder, a CSV file).
    weights : str or os.PathLike, optional
        The checkpoint it was extracted with, when several stores of the model are cached
        (matched on its sha256).

    Returns
    -------
    str
        The store's path, for :func:`open` or ``probe.fit``.

    Raises
    ------
    UsageError
        No match, several matches, or an incomplete one; the message lists what the cache holds
        and the hint names the ``featstore extract`` command to run.

    Examples
    --------
    >>> featstore.lookup("resnet18", "digits")                     # doctest: +SKIP
    '/home/me/.cache/featstore/stores/digits/resnet18-3f9c2a71be04.zarr'
    """
    from .cache import lookup as find

    return find(model, dataset, os.fspath(weights) if weights is not None else None)


def export(store: str | os.PathLike, to: str | os.PathLike, view: str | None = None, overwrite: bool = False) -> dict:
    """Write a complete store as one file: HDF5 (every split and view) or ``.npz`` (one view).

    Parameters
    ----------
    store : str or os.PathLike
        The store to read (a path or URL).
    to : str or os.PathLike
        ``FILE.h5`` / ``FILE.hdf5`` (the store's schema, readable with plain h5py and by
        :func:`open`) or ``FILE.npz`` (``<split>_features``, ``_labels``, ``_valid``, ``_paths``,
        ``provenance``).
    view : str, optional
        The view of an ``.npz`` export (default: the store's first, ``cls`` for a ViT, ``pool``
        for a CNN). An HDF5 export holds every view.
    overwrite : bool, default False
        Replace an existing ``to`` file.

    Returns
    -------
    dict
        ``store``, ``to``, ``format``, ``view``, ``bytes`` (file size), ``feature_bytes``, ``seconds``.

    Raises
    ------
    UsageError
        Unknown suffix, ``to`` exists, its folder does not, ``view`` with an HDF5 export or not in the store.
    FeatstoreError
        The store is not complete, or the file cannot be written.

    Examples
    --------
    >>> featstore.export("digits.zarr", "digits.npz", view="pool")["format"]   # doctest: +SKIP
    'npz'
    """
    from .store.export import export as write

    return write(os.fspath(store), os.fspath(to), view=view, overwrite=overwrite)
