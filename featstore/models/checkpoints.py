"""Safe, loud checkpoint loading: a published SSL checkpoint goes into the network its authors evaluated.

``weights_only=True`` first; pickled metadata that is plain data (``argparse.Namespace`` under
``args``, numpy scalars and arrays) is allowed by name. A file pickling other classes (a config of
the training script's ``__main__``, an OmegaConf object, a whole module) loads with inert
placeholders for them, running none of their code (``safe_unpickle.py``), and the report names them;
``--trust-checkpoint`` runs their code instead, where their modules are installed.
The layouts of the main self-supervised codebases are recognised (see ``layouts.py`` for the key
rules and where each comes from): the evaluated copy is taken (DINO/iBOT/DINOv2 teacher, MSN/I-JEPA
target encoder, MoCo query encoder, BYOL online network), momentum copies and heads are dropped,
wrapper prefixes stripped, renumbered layouts renamed, and position embeddings resampled the way
the authors' model does. The report says what was taken, loaded, dropped and resampled; a missing
backbone tensor, a tensor with no place, a shape mismatch or contradicting provenance is an error.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import FeatstoreError
from .layouts import HEAD_NAMES, Checkpoint, normalize_checkpoint, rename_for_model
from .presets import POS_EMBED_RULES
from .safe_unpickle import inert_load, system_calls


@dataclass
class LoadReport:
    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # the dropped head keys, named in the summary
    ignored: int = 0  # dropped by --ignore-keys
    taken: str = ""  # which copy of the network was loaded, and why
    notes: list[str] = field(default_factory=list)

    @property
    def dropped_heads(self) -> int:
        return len(self.dropped)

    def summary(self) -> str:
        text = f"weights {Path(self.path).name}: "
        if self.taken:
            text += f"took {self.taken}; "
        text += (
            f"loaded {self.loaded} tensors, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"dropped head/projection {self.dropped_heads}"
        )
        if self.ignored:
            text += f", ignored by --ignore-keys {self.ignored}"
        heads = Counter(k.split(".")[0] for k in self.dropped)  # which heads, so none goes unnoticed
        named = ["dropped " + ", ".join(f"{h}.* ({n})" for h, n in heads.items())] if heads else []
        return "; ".join([text, *named, *self.notes])


def _safe_globals() -> list:
    """Classes a checkpoint may pickle as plain data: training args and numpy numbers, never code."""
    allowed: list = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return allowed
    core = getattr(np, "_core", None) or np.core
    allowed += [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]
    allowed += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    return allowed


def load_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """The backbone tensors plus what the file says about itself (provenance, which copy was taken,
    which pickled classes were stood in for by inert placeholders)."""
    path = Path(path)
    placeholders: list[str] = []
    obj: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:  # safetensors raises its own (Rust) error types
            raise FeatstoreError(
                f"{path.name!r} is not a readable safetensors file ({e})", "pass a valid .safetensors, .pth or .pt checkpoint"
            ) from e
    else:
        obj, placeholders = _torch_load(path, trust)
    try:
        ckpt = normalize_checkpoint(obj, path.name)
    except FeatstoreError as e:
        if not placeholders:
            raise
        raise FeatstoreError(
            f"{e.message} outside the objects it pickles, loaded as inert placeholders ({_names(placeholders)})",
            "pass --trust-checkpoint to run their code if you trust its source, or re-save the state dict / safetensors",
        ) from e
    ckpt.placeholders = placeholders
    return ckpt


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _torch_load(path: Path, trust: bool) -> tuple[object, list[str]]:
    """The unpickled file and the placeholders it needed: weights_only first; a file that pickles other
    classes is loaded with inert placeholders for them (safe_unpickle.py), or with its own classes,
    running their code, under --trust-checkpoint."""
    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # the inert unpickler reads any protocol
            return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as e:
        # weights_only names the global it refused; anything else is garbage, or an opcode it lacks
        # (protocol 4's FRAME), which the inert unpickler below reads
        refused_global = "GLOBAL" in str(e)
    except Exception as e:  # garbage bytes make the unpickler fail in arbitrary ways
        raise FeatstoreError(
            f"{path.name!r} is not a PyTorch checkpoint ({type(e).__name__})",
            "pass a .pth/.pt/.safetensors file saved by torch.save or safetensors",
        ) from e
    if trust and refused_global:
        _refuse_system_calls(path, _static_globals(path))  # even a trusted file gets no os.system
        try:
            return torch.load(path, map_location="cpu", weights_only=False), []
        except (ModuleNotFoundError, AttributeError):
            pass  # a class of a module not installed, or of the training script's __main__: placeholders
        except Exception as e:
            raise FeatstoreError(
                f"{path.name!r} could not be unpickled ({type(e).__name__}: {e})",
                "re-save the checkpoint as a plain state dict / safetensors",
            ) from e
    try:
        obj, placeholders = inert_load(path, _safe_globals())
    except Exception as e:
        if not refused_global:
            raise FeatstoreError(
                f"{path.name!r} is not a PyTorch checkpoint", "pass a .pth/.pt/.safetensors file saved by torch.save or safetensors"
            ) from e
        raise FeatstoreError(
            f"{path.name!r} could not be unpickled, even with inert placeholders for its classes ({type(e).__name__}: {e})",
            "re-save the checkpoint as a plain state dict / safetensors",
        ) from e
    _refuse_system_calls(path, placeholders)
    return obj, placeholders


def _static_globals(path: Path) -> list[str]:
    """The globals a zip checkpoint's pickle names, read without unpickling (none for the legacy format)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def _refuse_system_calls(path: Path, names: list[str]) -> None:
    bad = system_calls(names)
    if bad:
        raise FeatstoreError(
            f"{path.name!r} pickles calls to {_names(bad)}, which no checkpoint needs: refused, nothing was run",
            "do not use this file; whoever made it can re-save the model's state dict (torch.save(model.state_dict())) or safetensors",
        )


def load_weights(
    model: nn.Module,
    path: str | Path,
    arch: str = "",
    trust: bool = False,
    ignore_keys: tuple[str, ...] | list[str] = (),
    pos_embed: str = "timm",
    model_name: str = "",
) -> LoadReport:
    """Load ``path`` into ``model``; raise when backbone parameters are missing, shapes differ, or the
    checkpoint says it was trained as another architecture.

    ``pos_embed`` is how the authors' model resamples position embeddings to another grid (see
    ``presets.POS_EMBED_RULES``); ``ignore_keys`` are globs of checkpoint keys to drop.
    """
    name = Path(path).name
    label = arch or type(model).__name__
    if model_name and not arch.endswith(model_name):
        label = f"{model_name} [{label}]"
    ckpt = load_checkpoint(path, trust=trust)
    ckpt.provenance.check(model, arch, name, label)
    sd = dict(ckpt.tensors)  # our own copy: timm's converter mutates the dict it is given
    notes: list[str] = []
    if ckpt.placeholders:
        notes.append(f"inert placeholders (no code run) for {len(ckpt.placeholders)} pickled classes: {_names(ckpt.placeholders)}")

    ignored = [k for k in sd if any(fnmatch.fnmatchcase(k, g) for g in ignore_keys)]
    for k in ignored:
        del sd[k]
    unmatched = [g for g in ignore_keys if not any(fnmatch.fnmatchcase(k, g) for k in ckpt.tensors)]
    if unmatched:
        notes.append("--ignore-keys matched nothing: " + ", ".join(unmatched))

    sd, renamed = rename_for_model(sd, model.state_dict().keys(), [n for n, _ in model.named_children()])
    notes += renamed
    _refuse_other_patch_size(sd, model, name, label)  # before timm's filter, which would resample the kernel silently
    sd, resampled = resample_pos_embed(sd, model, pos_embed)
    notes += resampled
    sd = _timm_filter(sd, model, arch)

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dropped = [k for k in sd if k not in shapes and (k.split(".")[0] in HEAD_NAMES or _under_removed_head(model, k, arch))]
    for k in dropped:
        del sd[k]
    if not shapes.keys() & sd.keys():
        sample = ", ".join(sorted(sd)[:3])
        transformers_keys = any(k.startswith(("embeddings.", "encoder.layer.", "encoder.layers.", "vision_model.")) for k in sd)
        raise FeatstoreError(
            f"weights {name!r} do not fit {label}: no parameter names match (file has e.g. {sample})",
            # no --model fits a transformers state dict: it is read with its config.json
            "a Hugging Face transformers state dict: pass its folder with config.json (--weights DIR) or --model hf:ORG/NAME"
            if transformers_keys
            else "check --model matches the checkpoint's architecture",
        )
    mismatched = [k for k, v in sd.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if mismatched:
        k = mismatched[0]
        raise FeatstoreError(
            f"weights {name!r} do not fit {label}: shape mismatch for {len(mismatched)} tensors, "
            f"e.g. {k} {tuple(sd[k].shape)} vs {shapes[k]}{_mismatch_cause(sd, shapes)}",
            "check --model matches the checkpoint's architecture (size, patch size, depth)",
        )
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    report = LoadReport(
        str(path),
        loaded=len(sd) - len(result.unexpected_keys),
        missing=missing,
        unexpected=list(result.unexpected_keys),
        dropped=dropped,
        ignored=len(ignored),
        taken=ckpt.taken,
        notes=notes,
    )
    if report.unexpected:
        shown = ", ".join(report.unexpected[:3])
        raise FeatstoreError(
            f"weights {name!r} do not fit {label}: {len(report.unexpected)} tensors have no place in it, e.g. {shown}",
            "the file has register tokens: use a _reg4 model (featstore models lists them)"
            if any("register_tokens" in k or "reg_token" in k for k in report.unexpected)
            else "check --model matches the checkpoint (a deeper or different variant?); --ignore-keys GLOB drops keys you know are not the backbone",
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FeatstoreError(
            f"weights {name!r} lack {len(missing)} backbone parameters of {label}: {shown}",
            "check --model matches the checkpoint, or that the file holds the whole backbone",
        )
    return report


def _under_removed_head(model: nn.Module, key: str, arch: str) -> bool:
    """A key under a module the model holds as nn.Identity that stands for a removed head: one named
    as heads are (``backbone.fc``, ``heads``), or in a user's builder any direct child
    (``net.linear = nn.Identity()``). Other Identities are the architecture's own choices (timm's ViT
    without layer-scale ``blocks.N.ls1``, ``norm_pre``, ``fc_norm``, q/k norms): a checkpoint's
    tensors there are backbone parameters this model lacks, so they are unexpected, not dropped
    (a DINOv2 file loaded into a ViT without layer-scale lost all its gammas quietly)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            module = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if not isinstance(module, nn.Identity):
            return False
        return parts[i - 1] in HEAD_NAMES or (i == 1 and arch.startswith("user:"))
    return False


def _refuse_other_patch_size(sd: dict[str, torch.Tensor], model: nn.Module, name: str, label: str) -> None:
    """A ViT checkpoint of another patch size (ViT-S/8 weights for ViT-S/16) is another network:
    refused, where timm's checkpoint filter resamples the patch kernel (and the position
    embeddings follow) without a word. The authors' loaders fail on it too (a size mismatch)."""
    kernel, own = sd.get("patch_embed.proj.weight"), model.state_dict().get("patch_embed.proj.weight")
    if kernel is None or own is None or kernel.ndim != 4 or own.ndim != 4 or tuple(kernel.shape[-2:]) == tuple(own.shape[-2:]):
        return
    theirs, ours = "×".join(map(str, kernel.shape[-2:])), "×".join(map(str, own.shape[-2:]))
    raise FeatstoreError(
        f"weights {name!r} do not fit {label}: the file's patches are {theirs} pixels, the model's {ours}",
        "pick the --model of the checkpoint's patch size (featstore models lists them)",
    )


def _mismatch_cause(sd: dict, shapes: dict) -> str:
    """A short diagnosis for the two ResNet mix-ups people make."""
    conv1 = sd.get("conv1.weight")
    if conv1 is not None and "conv1.weight" in shapes and conv1.shape[-1] != shapes["conv1.weight"][-1]:
        return f" (the file's conv1 is {conv1.shape[-2]}x{conv1.shape[-1]}, the model's {shapes['conv1.weight'][-2]}x{shapes['conv1.weight'][-1]}: a CIFAR-stem ResNet?)"
    file_net, model_net = _resnet_kind(sd.keys()), _resnet_kind(shapes.keys())
    if file_net and model_net and file_net != model_net:
        return f" (the file is a {file_net}, the model a {model_net})"
    return ""


def _resnet_kind(keys) -> str:
    blocks = [len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    if not all(blocks):
        return ""
    bottleneck = any(k.endswith("conv3.weight") for k in keys)
    depth = sum(blocks) * (3 if bottleneck else 2) + 2
    return f"ResNet-{depth}"


def resample_pos_embed(sd: dict, model: nn.Module, rule: str) -> tuple[dict, list[str]]:
    """Resample ``pos_embed`` to the model's patch grid as the authors' own model does at that size.

    timm's converter would resample with its antialiased interpolation, which gives other features
    than DINO/DINOv2/MSN/MAE code does; doing it here first leaves timm nothing to resample.
    """
    if rule not in POS_EMBED_RULES:
        raise ValueError(f"unknown position-embedding rule {rule!r} (one of {', '.join(POS_EMBED_RULES)})")
    pe = sd.get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if rule == "timm" or pe is None or pe.ndim != 3 or grid is None:
        return sd, []
    n_prefix, old = _pos_grid(pe.shape[1])
    new = cast(tuple[int, int], tuple(int(g) for g in grid))  # a ViT patch_embed.grid_size is (h, w)
    if old is None or (old, old) == new:
        return sd, []
    prefix, patches = pe[:, :n_prefix], pe[:, n_prefix:].float()
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = interpolate_patch_pos_embed(patches, new, rule)
    out = torch.cat([prefix.float(), patches.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1).to(pe.dtype)
    sd = {**sd, "pos_embed": out}
    names = {
        "dino": "DINO's interpolate_pos_encoding",
        "dinov2-reg": "DINOv2-reg's interpolate_pos_encoding (offset 0, antialiased)",
        "scale": "MSN/I-JEPA's interpolate_pos_encoding",
        "size": "MAE's interpolate_pos_embed",
    }
    return sd, [f"position embeddings {old}x{old} -> {new[0]}x{new[1]} as {names[rule]}"]


def interpolate_patch_pos_embed(patches: torch.Tensor, new: tuple[int, int], rule: str) -> torch.Tensor:
    """(1, D, H, W) patch position embeddings to ``new`` (h, w), bicubic, antialiased only where the authors' model is."""
    old_h, old_w = patches.shape[-2:]
    if rule == "dino":
        # dinov2/models/vision_transformer.py interpolate_pos_encoding (interpolate_offset=0.1): the scale
        # factor, not the size, sets the sampling positions; dino/vision_transformer.py does the same
        scale = ((new[0] + 0.1) / old_h, (new[1] + 0.1) / old_w)
        return nn.functional.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    if rule == "dinov2-reg":
        # the same function as built by hub/backbones.py dinov2_*_reg (interpolate_offset=0.0,
        # interpolate_antialias=True): the size, not a scale factor, and antialiased when shrinking
        return nn.functional.interpolate(patches, size=new, mode="bicubic", antialias=True)
    if rule == "scale":
        # msn src/deit.py, ijepa src/models/vision_transformer.py: scale_factor=math.sqrt(npatch / N)
        factor = math.sqrt(new[0] * new[1] / (old_h * old_w))
        out = nn.functional.interpolate(patches, scale_factor=factor, mode="bicubic")
        if tuple(out.shape[-2:]) != tuple(new):
            raise FeatstoreError(
                f"position embeddings {old_h}x{old_w} cannot be resampled to {new[0]}x{new[1]} by one scale factor",
                "use a square --image-size",
            )
        return out
    if rule == "size":
        # mae util/pos_embed.py interpolate_pos_embed
        return nn.functional.interpolate(patches, size=new, mode="bicubic", align_corners=False)
    raise ValueError(f"unknown position-embedding rule {rule!r} (one of {', '.join(r for r in POS_EMBED_RULES if r != 'timm')})")


def _pos_grid(tokens: int) -> tuple[int, int | None]:
    """(prefix tokens, grid side) of a square position embedding with 0 or 1 prefix (CLS) tokens."""
    for n_prefix in (1, 0):
        side = math.isqrt(tokens - n_prefix)
        if side * side == tokens - n_prefix:
            return n_prefix, side
    return 0, None


def _timm_filter(sd: dict, model: nn.Module, arch: str) -> dict:
    """timm's own converter for the model family (DINOv2 originals, register tokens, patch embeddings)."""
    if not arch.startswith("timm:"):
        return sd
    import importlib

    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    try:
        return fn(dict(sd), model)  # a copy: the converter pops keys from what it is given
    except Exception:  # a foreign layout timm does not know: load as-is and let the key check speak
        return sd
