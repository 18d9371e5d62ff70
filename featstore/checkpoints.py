"""Safe, loud checkpoint loading.

``weights_only=True`` always (a pickle that needs arbitrary code is refused unless the user trusts
it), safetensors supported, the usual wrappers unwrapped (``state_dict``, ``model``, DINO's
``teacher``/``student``, MoCo's query/base encoder) and prefixes stripped, classifier and projection
heads dropped; a report of loaded / missing / unexpected keys, and an error when backbone keys are
missing.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import FeatstoreError

# wrapper keys in the order they are tried; DINO keeps the teacher (the evaluated network)
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "teacher", "student", "module", "net", "network", "encoder")
# MoCo: keep the query/base encoder, drop the momentum (key) encoder
MOCO_PREFIXES = ("module.encoder_q.", "module.base_encoder.", "encoder_q.", "base_encoder.")
MOCO_DROPPED = ("module.encoder_k.", "module.momentum_encoder.", "encoder_k.", "momentum_encoder.", "module.predictor.", "predictor.", "queue")
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
HEAD_NAMES = frozenset(
    {"fc", "head", "heads", "classifier", "projector", "predictor", "projection_head", "prediction_head",
     "projection", "prediction", "head_dist", "mask_token", "queue", "queue_ptr",
     # MAE's decoder is not part of the encoder, nor an autoencoder's (encoder.* + decoder.*)
     "decoder", "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "decoder_pos_embed"}
)


@dataclass
class LoadReport:
    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped_heads: int = 0

    def summary(self) -> str:
        return (
            f"weights {Path(self.path).name}: loaded {self.loaded} tensors, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, dropped head/projection {self.dropped_heads}"
        )


def read_checkpoint(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The raw tensors of a checkpoint file, loaded safely, with wrappers and prefixes removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:  # safetensors raises its own (Rust) error types
            raise FeatstoreError(f"{path.name!r} is not a readable safetensors file ({e})", "pass a valid .safetensors, .pth or .pt checkpoint") from e
    else:
        obj = _torch_load(path, trust)
    return normalize_state_dict(obj, path.name)


def _torch_load(path: Path, trust: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # weights_only names the global it refused; anything else is garbage
            raise FeatstoreError(f"{path.name!r} is not a PyTorch checkpoint", "pass a .pth/.pt/.safetensors file saved by torch.save or safetensors") from e
        if not trust:
            raise FeatstoreError(
                f"{path.name!r} needs arbitrary code to load (it pickles more than tensors), refused",
                "pass --trust-checkpoint only if you trust its source, or re-save it as a plain state dict / safetensors",
            ) from e
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # garbage bytes make the unpickler fail in arbitrary ways
        raise FeatstoreError(f"{path.name!r} is not a PyTorch checkpoint ({type(e).__name__})", "pass a .pth/.pt/.safetensors file saved by torch.save or safetensors") from e


def normalize_state_dict(obj, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap nested dicts until a flat tensor dict remains, then strip MoCo and common prefixes."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    if hasattr(obj, "state_dict") and isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise FeatstoreError(f"{name!r} holds a {type(obj).__name__}, not a state dict", "save the model with torch.save(model.state_dict(), path)")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise FeatstoreError(f"{name!r} holds no tensors", "pass the checkpoint of a trained model")
    moco = next((p for p in MOCO_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if moco is not None:
        sd = {k[len(moco):]: v for k, v in sd.items() if k.startswith(moco)}
    sd = {k: v for k, v in sd.items() if not k.startswith(MOCO_DROPPED)}
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            # strip a prefix that most keys share (a DINO teacher is backbone.* plus head.*)
            with_prefix = sum(k.startswith(prefix) for k in sd)
            if with_prefix and with_prefix >= len(sd) / 2:
                sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
                changed = True
    return sd


def load_weights(model: nn.Module, path: str | Path, arch: str = "", trust: bool = False) -> LoadReport:
    """Load ``path`` into ``model``; raise when backbone parameters are missing or shapes differ."""
    sd = read_checkpoint(path, trust=trust)
    sd = _timm_filter(sd, model, arch)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model_keys = set(shapes)
    dropped = [k for k in sd if k not in model_keys and k.split(".")[0] in HEAD_NAMES]
    for k in dropped:
        del sd[k]
    if not model_keys & set(sd):
        sample = ", ".join(sorted(sd)[:3])
        raise FeatstoreError(
            f"weights {Path(path).name!r} do not fit {arch or type(model).__name__}: no parameter names match (file has e.g. {sample})",
            "check --model matches the checkpoint's architecture",
        )
    mismatched = [
        f"{k} {tuple(v.shape)} vs {shapes[k]}"
        for k, v in sd.items()
        if k in model_keys and tuple(v.shape) != shapes[k]
    ]
    if mismatched:
        raise FeatstoreError(
            f"weights {Path(path).name!r} do not fit {arch or type(model).__name__}: shape mismatch for {len(mismatched)} tensors, e.g. {mismatched[0]}",
            "check --model matches the checkpoint's architecture (size, patch size, depth)",
        )
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    report = LoadReport(str(path), loaded=len(sd) - len(result.unexpected_keys), missing=missing,
                        unexpected=list(result.unexpected_keys), dropped_heads=len(dropped))
    if report.unexpected:
        shown = ", ".join(report.unexpected[:3])
        raise FeatstoreError(
            f"weights {Path(path).name!r} do not fit {arch or type(model).__name__}: {len(report.unexpected)} tensors have no place in it, e.g. {shown}",
            "check --model matches the checkpoint (a deeper or different variant?)",
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FeatstoreError(
            f"weights {Path(path).name!r} lack {len(missing)} backbone parameters of {arch or type(model).__name__}: {shown}",
            "check --model matches the checkpoint, or that the file holds the whole backbone",
        )
    return report


def _timm_filter(sd: dict, model: nn.Module, arch: str) -> dict:
    """timm's own converter for the model family (DINOv2 originals, position-embedding resampling)."""
    if not arch.startswith("timm:"):
        return sd
    import importlib

    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    try:
        return fn(sd, model)
    except Exception:  # a foreign layout timm does not know: load as-is and let the key check speak
        return sd
