"""Unpickling a checkpoint without running any of its code: classes outside the allow-list become inert placeholders.

Research checkpoints pickle the training script's own objects beside the tensors: a config dataclass
defined in ``__main__``, an ``EasyDict``, an OmegaConf ``DictConfig``, an enum, sometimes the whole
``nn.Module``. ``weights_only=True`` refuses them and a full unpickle cannot find (or must not run)
their classes. Here every global the pickle names is looked up in an allow-list (torch's own
``weights_only`` list plus the plain-data classes featstore allows); any other becomes a placeholder
class made on the spot, which keeps what the pickle hands it (constructor arguments, state, items)
and runs nothing: no import of the named module, no ``__reduce__``, ``__setstate__`` or ``__init__``
of the real class. The tensors load; :attr:`InertLoad.placeholders` names what was stood in for.

A pickled module tree (``torch.save(model)``) becomes the state dict it holds, read from the
placeholders' ``_parameters`` / ``_buffers`` / ``_modules``.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from collections import OrderedDict, defaultdict, deque
from pathlib import Path
from typing import Any, ClassVar

import torch

# Modules whose functions a checkpoint has no reason to name: a pickle calling into them is an
# attack (``os.system`` via ``__reduce__``); it is refused, loudly, though its placeholder runs nothing.
SYSTEM_MODULES = frozenset(
    {"os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "runpy", "socket", "ctypes", "pty", "signal"}
    | {"pickle", "_pickle", "marshal", "code", "codeop", "types", "webbrowser", "multiprocessing", "asyncio"}
)
SYSTEM_BUILTINS = frozenset({"eval", "exec", "compile", "open", "__import__", "breakpoint", "input", "exit", "quit"})
# builtin data types are safe to call with any arguments (no code of the file's runs): real, not placeholders
DATA_BUILTINS = (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool, slice, range)


class Placeholder:
    """An object of a pickled class featstore did not load. Holds what unpickling gave it, runs nothing.

    ``placeholder_args``: the constructor / ``__new__`` / ``__reduce__`` arguments; ``placeholder_state``:
    the state ``__setstate__`` would have received (a dict state also becomes attributes, as pickle's
    default does, so ``args.arch`` reads as it would); ``placeholder_items`` / ``placeholder_list``:
    what a dict or list subclass held.
    """

    pickled_as: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__.update(placeholder_args=args, placeholder_kwargs=kwargs, placeholder_state=None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # the real class's __init__ is exactly what must not run

    def __setstate__(self, state: Any) -> None:
        self.__dict__["placeholder_state"] = state
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)  # (dict state, slot state)
        for part in parts:
            if isinstance(part, dict):
                self.__dict__.update({k: v for k, v in part.items() if isinstance(k, str) and not k.startswith("placeholder_")})

    # a dict or list subclass (EasyDict, addict) is filled by SETITEMS / APPENDS after it is made
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("placeholder_items", {})[key] = value

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("placeholder_list", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("placeholder_list", []).extend(items)

    def __repr__(self) -> str:
        return f"<inert placeholder for {self.pickled_as}>"


def python3_name(module: str, name: str) -> tuple[str, str]:
    """torch.save writes protocol 2, which spells Python 3 names the Python 2 way (__builtin__.set, commands.call)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _allowed_globals(extra: list) -> dict[str, Any]:
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update({f"builtins.{t.__name__}": t for t in DATA_BUILTINS})
    allowed.update({"collections.defaultdict": defaultdict, "collections.deque": deque})
    allowed.update({f"{g.__module__}.{g.__qualname__}": g for g in extra})
    return allowed


class InertLoad:
    """One load: a ``pickle_module`` for :func:`torch.load` whose unpickler returns allow-listed globals
    and a placeholder for every other, and the names of the placeholders it made."""

    __name__ = "featstore.models.safe_unpickle"  # torch.load asks pickle_module.__name__ (for dill)

    def __init__(self, allowed_extra: list):
        self.allowed = _allowed_globals(allowed_extra)
        self.placeholders: dict[str, type] = {}
        load = self

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                return load.find_class(module, name)

        self.Unpickler = Unpickler

    def find_class(self, module: str, name: str) -> Any:
        module, name = python3_name(module, name)
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        if full not in self.placeholders:
            self.placeholders[full] = type(name, (Placeholder,), {"pickled_as": full, "__module__": module, "__qualname__": name})
        return self.placeholders[full]

    def load(self, file: Any, **kwargs: Any) -> Any:
        """What torch.load calls for the legacy format's header records (plain numbers and dicts)."""
        return self.Unpickler(file, **kwargs).load()


def inert_load(path: Path, allowed_extra: list) -> tuple[Any, list[str]]:
    """The file's object with placeholders for what is outside the allow-list, and their names."""
    loader = InertLoad(allowed_extra)
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=loader)
    return modules_as_state_dicts(obj), sorted(loader.placeholders)


def system_calls(names: list[str]) -> list[str]:
    """The placeholders that stand for functions of the system modules (an attack, not a checkpoint)."""

    def system(name: str) -> bool:
        module, _, attr = name.rpartition(".")
        module, attr = python3_name(module, attr)
        return module.split(".")[0] in SYSTEM_MODULES or (module == "builtins" and attr in SYSTEM_BUILTINS)

    return [n for n in names if system(n)]


def modules_as_state_dicts(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every pickled module tree (a placeholder holding ``_parameters`` and ``_modules``)
    replaced by its state dict, through dicts, lists and tuples a few levels down."""
    if depth > 6:
        return obj
    if _is_module(obj):
        return _state_dict(obj)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = modules_as_state_dicts(v, depth + 1)
        return out
    if isinstance(obj, list | tuple) and type(obj) in (list, tuple):
        return type(obj)(modules_as_state_dicts(v, depth + 1) for v in obj)
    return obj


def _is_module(obj: Any) -> bool:
    return (
        isinstance(obj, Placeholder)
        and isinstance(obj.__dict__.get("_parameters"), dict)
        and isinstance(obj.__dict__.get("_modules"), dict)
    )


def _state_dict(module: Any, prefix: str = "") -> OrderedDict:
    """nn.Module.state_dict read from the pickled attributes: parameters, persistent buffers, children."""
    out: OrderedDict = OrderedDict()
    attrs = module.__dict__
    for name, p in attrs["_parameters"].items():
        if isinstance(p, torch.Tensor):
            out[prefix + name] = p.detach()
    transient = attrs.get("_non_persistent_buffers_set") or set()
    for name, b in (attrs.get("_buffers") or {}).items():
        if isinstance(b, torch.Tensor) and name not in transient:
            out[prefix + name] = b
    for name, child in attrs["_modules"].items():
        if _is_module(child):
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out
