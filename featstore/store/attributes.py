"""A store's attributes (its ``zarr.json`` attributes, an export's provenance) read through one
typed view: :class:`StoreAttributes`, with the encoder and dataset as :class:`EncoderInfo` and
:class:`DatasetInfo`; and :func:`store_label`, the name a store goes by in ``featstore ls`` and
in probe's tables.

The view only reads. The writers (``FeatureStore.create``, ``finalize``, ``update_attrs``,
the extraction) write the same JSON as ever. Reading is as tolerant as the ``.get`` chains it
replaces: a missing key, or a null, reads as nothing (None, ``{}``, ``[]``, False).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# weights file suffixes a store label drops (the longest first: x.pth.tar → x)
WEIGHTS_SUFFIXES = (".safetensors", ".pth.tar", ".pth", ".pt", ".bin", ".ckpt", ".npz")


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class EncoderInfo:
    """The ``encoder`` attribute: which model wrote the features."""

    name: str | None = None
    arch: str | None = None
    family: str | None = None  # "vit" or "cnn"
    weights_path: str | None = None
    weights_sha256: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # every recorded field

    @classmethod
    def from_dict(cls, d: Any) -> EncoderInfo:
        d = _dict(d)
        return cls(_str(d.get("name")), _str(d.get("arch")), _str(d.get("family")), _str(d.get("weights_path")),
                   _str(d.get("weights_sha256")), d)  # fmt: skip

    @property
    def weights_file(self) -> str:
        """The weights file's name (no folder), or "" for none (random init, a hub preset)."""
        return Path(self.weights_path).name if self.weights_path else ""


@dataclass(frozen=True)
class DatasetInfo:
    """The ``dataset`` attribute: which images, as the manifest recorded them."""

    name: str | None = None
    spec: str | None = None  # the --dataset as typed
    root: str | None = None
    manifest_sha256: str | None = None
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Any) -> DatasetInfo:
        d = _dict(d)
        return cls(_str(d.get("name")), _str(d.get("spec")), _str(d.get("root")), _str(d.get("manifest_sha256")),
                   _int(d.get("num_classes")), [str(c) for c in d.get("class_names") or []], d)  # fmt: skip


@dataclass(frozen=True)
class StoreAttributes:
    """Every attribute featstore reads, typed. ``raw`` is the attribute dict itself."""

    schema_version: int = 0
    featstore_version: str | None = None
    created: str | None = None
    completed: str | None = None
    complete: bool = False
    splits: dict[str, int] = field(default_factory=dict)  # split → rows
    views: dict[str, int] = field(default_factory=dict)  # view → dimension
    dtype: str | None = None
    chunk_rows: int | None = None
    encoder: EncoderInfo = field(default_factory=EncoderInfo)
    dataset: DatasetInfo = field(default_factory=DatasetInfo)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    loader: str | None = None
    cache_key: str | None = None
    cache_fields: dict[str, Any] = field(default_factory=dict)
    invalid: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split → [{row, path, reason}]
    job: str | None = None
    device: str | None = None
    images_per_second: float | None = None
    command: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, attrs: Mapping[str, Any] | None) -> StoreAttributes:
        a = _dict(attrs)
        return cls(
            schema_version=int(a.get("schema_version") or 0),
            featstore_version=_str(a.get("featstore_version")),
            created=_str(a.get("created")),
            completed=_str(a.get("completed")),
            complete=bool(a.get("complete")),
            splits={str(s): int(n) for s, n in _dict(a.get("splits")).items()},
            views={str(v): d for v, d in _dict(a.get("views")).items()},
            dtype=_str(a.get("dtype")),
            chunk_rows=_int(a.get("chunk_rows")),
            encoder=EncoderInfo.from_dict(a.get("encoder")),
            dataset=DatasetInfo.from_dict(a.get("dataset")),
            preprocessing=_dict(a.get("preprocessing")),
            loader=_str(a.get("loader")),
            cache_key=_str(a.get("cache_key")),
            cache_fields=_dict(a.get("cache_fields")),
            invalid=_dict(a.get("invalid")),
            job=_str(a.get("job")),
            device=_str(a.get("device")),
            images_per_second=_float(a.get("images_per_second")),
            command=_str(a.get("command")),
            raw=a,
        )

    @property
    def rows(self) -> int:
        """Rows of every split together."""
        return sum(self.splits.values())

    @property
    def invalid_count(self) -> int:
        return sum(len(v) for v in self.invalid.values())


def store_label(meta: StoreAttributes, path: str | os.PathLike[str]) -> str:
    """The name a store goes by (``featstore ls``, probe's tables): its weights file's name without
    the suffix (``x.pth.tar`` → ``x``), else the model name, else the store's folder name."""
    name = meta.encoder.weights_file
    if name:
        for suffix in WEIGHTS_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return Path(name).stem or name
    return meta.encoder.name or Path(path).name
