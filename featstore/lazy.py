"""Public names of a package loaded on first use (PEP 562 module ``__getattr__``), so importing
the package imports none of what its names need (torch, zarr, timm) until a name is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, names: Mapping[str, str], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``names`` maps each public name to the
    module that defines it; a name found once is kept in ``namespace`` (the package's globals), so
    later lookups skip ``__getattr__``."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | {n for n in namespace if not n.startswith("_") or n.startswith("__")})

    return __getattr__, __dir__
