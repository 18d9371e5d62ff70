"""The feature store: its schema (create, resume, write whole units, read), where stores live
(local folders, HDF5 exports, URLs), HDF5/npz export, and the writer's lock.

``featstore.store`` never imports the extraction pipeline, the loaders or the models: it holds
arrays and their provenance, whatever produced them.
"""

from .attributes import DatasetInfo, EncoderInfo, StoreAttributes, store_label
from .feature_store import DEFAULT_CHUNK_ROWS, FEATURE_DTYPES, SCHEMA_VERSION, FeatureArray, FeatureStore, Unit, is_store
from .locations import PROGRESS, is_hdf5_path, is_url
from .patch import PatchArray, RowShape, capped_chunk_rows, expected_bytes, human_bytes, refuse_if_no_space, row_shape
from .targets import IGNORE, TARGET_KINDS, read_targets, target_info, target_valid, write_split_targets

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FEATURE_DTYPES",
    "IGNORE",
    "PROGRESS",
    "SCHEMA_VERSION",
    "TARGET_KINDS",
    "DatasetInfo",
    "EncoderInfo",
    "FeatureArray",
    "FeatureStore",
    "PatchArray",
    "RowShape",
    "StoreAttributes",
    "Unit",
    "capped_chunk_rows",
    "expected_bytes",
    "human_bytes",
    "is_hdf5_path",
    "is_store",
    "is_url",
    "read_targets",
    "refuse_if_no_space",
    "row_shape",
    "store_label",
    "target_info",
    "target_valid",
    "write_split_targets",
]
