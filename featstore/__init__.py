"""featstore: encode a labelled image dataset once with a frozen encoder into a Zarr store.

    >>> import featstore
    >>> result = featstore.extract(model="resnet18", dataset="digits", out="digits.zarr", random_init=True)
    >>> store = featstore.open(result.store)
    >>> store.features("train", "pool").shape
    (1078, 512)

Every public name is loaded on first use (module ``__getattr__``), so ``import featstore`` imports
no torch, zarr or timm. The walk-through and the reference: docs/api.md.
"""

from .lazy import lazy_names
from .version import __version__ as __version__

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "open": "featstore.api",
    "extract": "featstore.api",
    "ls": "featstore.api",
    "lookup": "featstore.api",
    "export": "featstore.api",
    "FeatureStore": "featstore.store.feature_store",
    "ExtractConfig": "featstore.request",
    "ExtractResult": "featstore.request",
    "StoreEntry": "featstore.cache",
    "FeatstoreError": "featstore.errors",
    "UsageError": "featstore.errors",
}

__all__ = sorted([*_LAZY, "__version__"])


__getattr__, __dir__ = lazy_names("featstore", _LAZY, globals())
