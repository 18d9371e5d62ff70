"""Encoders by name: presets users know (``dino``, ``resnet50``, …), any timm model, torchvision
models (``tv:resnet50``) and a user's own builder (``file.py:build`` / ``pkg.module:build``).

A preset carries the preprocessing of its reference evaluation, the way timm's ``pretrained_cfg``
does; every value can be overridden by the caller. All views come from one forward pass.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import FeatstoreError, UsageError
from ..home import file_sha256, weights_dir
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .hf_to_timm import build_twin, timm_twin
from .hub_cache import is_hub_name, resolve_hub_model
from .presets import PRESETS, Preset, dinov2_rule, find_preset
from .transformers_folder import TransformersFolder, build_model, is_transformers_folder, read_folder

_TV_PRE = Preprocess(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class EncoderSpec:
    """What the store records about the encoder; everything needed to rebuild it."""

    name: str  # what the user typed
    arch: str  # "timm:…", "tv:…" or "user:…"
    family: str  # "vit", "cnn" or "custom"
    preprocess: Preprocess
    weights_path: str | None
    weights_sha256: str  # "random-init" when no weights were loaded
    inputs: tuple[str, ...] = ()  # other files the resolution read (a transformers folder's config, a hub ref): stamped by the memo
    details: dict = field(default_factory=dict)  # more provenance (a transformers folder's layout, config digest, hub commit)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "family": self.family,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            **({"details": self.details} if self.details else {}),
        }


def resolve_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    preprocess_overrides: dict | None = None,
) -> EncoderSpec:
    """Check that ``name`` exists and that weights are available, without building the model."""
    if is_hub_name(name) or (weights is not None and is_transformers_folder(weights)):
        return _resolve_transformers(name, weights, random_init, preprocess_overrides or {})
    preset = find_preset(name)
    if preset is not None:
        name = preset.name  # an alias and its preset share stores
    arch, default_pre, preset = _arch_and_preprocess(name)
    pre = default_pre.with_overrides(**(preprocess_overrides or {}))
    if weights is not None and random_init:
        raise UsageError("--weights and --random-init exclude each other", "pass one of them")
    weights_path = None
    if weights is not None:
        weights_path = Path(weights).expanduser()
        if not weights_path.is_file():
            raise UsageError(f"weights file {str(weights)!r} not found", "pass --weights with the path of a .pth/.pt/.safetensors file")
    elif not random_init:
        if preset is not None and (weights_dir() / preset.weights_file).is_file():
            weights_path = weights_dir() / preset.weights_file
        elif preset is not None:
            raise FeatstoreError(
                f"no weights for {name!r}",
                f"download {preset.weights_url} to {weights_dir() / preset.weights_file} or pass --weights FILE; "
                "--random-init runs untrained",
            )
        elif arch.startswith("user:"):
            pass  # a user's builder brings its own weights
        else:
            raise FeatstoreError(
                f"no weights for {name!r}", "pass --weights FILE (.pth/.pt/.safetensors), or --random-init to run untrained"
            )
    sha = file_sha256(weights_path) if weights_path else ("user-builder" if arch.startswith("user:") and not random_init else "random-init")
    return EncoderSpec(name, arch, _family(arch), pre, str(weights_path.resolve()) if weights_path else None, sha)


def _resolve_transformers(name: str, weights: str | os.PathLike | None, random_init: bool, overrides: dict) -> EncoderSpec:
    """``hf:ORG/NAME`` from the local hub cache, or ``--weights DIR`` (a transformers folder): the
    architecture and preprocessing are the folder's, the name is what the user typed."""
    details: dict = {}
    if is_hub_name(name):
        if weights is not None:
            raise UsageError(f"--model {name} brings its own weights", "drop --weights (or pass --weights DIR with another --model name)")
        hub = resolve_hub_model(name)
        folder = read_folder(
            hub.folder, random_init, fetch_hint=f"run {hub.fetch_command}", extra_inputs=(str(hub.ref_file),) if hub.ref_file else ()
        )
        details["hub"] = {
            "repo_id": hub.repo_id,
            "revision": hub.revision,
            "commit": hub.commit,
            "folder": str(hub.folder),
            "chosen": hub.how,
        }
        weights_path = None  # the store goes by the hub name; the snapshot folder is in details
    else:
        if random_init:
            raise UsageError("--weights and --random-init exclude each other", "pass one of them")
        folder = read_folder(cast(str, weights))
        weights_path = str(folder.path)
    sha = "random-init" if random_init else folder.weights_sha256()
    runtime = "timm VisionTransformer (converted)" if timm_twin(folder) is not None else "transformers"
    details = {**folder.details(), "runtime": runtime, **details}
    pre = folder.preprocess.with_overrides(**overrides)
    return EncoderSpec(name, folder.arch, "vit", pre, weights_path, sha, tuple(folder.inputs()), details)


def _transformers_folder(spec: EncoderSpec) -> TransformersFolder:
    """The folder a resolved transformers spec was read from (a hub model's snapshot, not refs/main again)."""
    hub = spec.details.get("hub")
    return read_folder(hub["folder"] if hub else cast(str, spec.weights_path), random_init=spec.weights_sha256 == "random-init")


def _arch_and_preprocess(name: str) -> tuple[str, Preprocess, Preset | None]:
    if name in PRESETS:
        p = PRESETS[name]
        return p.arch, p.preprocess, p
    if name.startswith("tv:"):
        import torchvision

        tv_name = name[3:]
        if tv_name not in torchvision.models.list_models():
            raise UsageError(f"unknown torchvision model {tv_name!r}", _suggest(tv_name, torchvision.models.list_models(), "tv:"))
        return name, _TV_PRE, None
    if ":" in name and _looks_like_builder(name):
        _load_builder(name)  # fail early on a wrong path or name
        return f"user:{name}", Preprocess(), None
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        from .presets import ALIASES

        candidates = list(PRESETS) + list(ALIASES) + timm.list_models()
        raise UsageError(f"unknown model {name!r}", _suggest(name, candidates, ""))
    return f"timm:{name}", _timm_preprocess(name), None


def _suggest(name: str, candidates: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
    if close:
        return "did you mean " + ", ".join(prefix + c for c in close) + "?"
    return "use a preset (featstore models lists them), a timm model name, tv:<torchvision name>, or file.py:build"


def _looks_like_builder(name: str) -> bool:
    target, _, attr = name.rpartition(":")
    return bool(attr) and (target.endswith(".py") or "." in target or "/" in target)


def _family(arch: str) -> str:
    if arch.startswith("user:"):
        return "custom"
    if arch.startswith("tv:"):
        return "vit" if arch[3:].startswith("vit_") else "cnn"
    return "vit" if _is_timm_vit(arch[5:]) else "cnn"


_TIMM_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit", "eva", "beit", "vision_transformer_relpos")


def _is_timm_vit(name: str) -> bool:
    import timm.models

    return timm.models.is_model_in_modules(name.split(".")[0], _TIMM_VIT_MODULES)


def _timm_preprocess(name: str) -> Preprocess:
    """timm's pretrained_cfg for this model (and tag), as our preprocessing."""
    import timm.models

    pretrained = timm.models.get_pretrained_cfg(name)
    cfg: dict[str, Any] = pretrained.to_dict() if pretrained is not None else {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interp = cfg.get("interpolation", "bicubic")
    return Preprocess(
        image_size=size,
        resize=max(size, math.floor(size / crop_pct)),
        interpolation=interp if interp in ("bicubic", "bilinear", "nearest") else "bicubic",
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
    )


def _load_builder(name: str) -> Callable[[], nn.Module]:
    target, _, attr = name.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise UsageError(f"model file {target!r} not found", "pass --model path/to/file.py:function")
            mod_name = "featstore_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(mod_name)  # resolve and build both ask: run the file once
            if module is None:
                spec = importlib.util.spec_from_file_location(mod_name, path)
                if spec is None or spec.loader is None:  # not for a .py file; typed Optional all the same
                    raise UsageError(f"cannot import {target!r}", "pass --model path/to/file.py:function")
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
        else:
            module = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as e:  # the user's code: any error is theirs to see, on one line
        raise UsageError(f"cannot import {target!r}: {type(e).__name__}: {e}", "check the module path in --model") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"{target!r} has no callable {attr!r}", "pass --model module:function where function() returns an nn.Module")
    return fn


class FeatureEncoder(nn.Module):
    """Wraps a backbone so that ``forward`` returns ``{view: (B, D) tensor}`` for every view."""

    def __init__(self, backbone: nn.Module, family: str):
        super().__init__()
        self.backbone = backbone
        self.family = family
        self._block_outputs: list[torch.Tensor] = []
        self._feature_map: torch.Tensor | None = None
        self.patch_layers: dict[str, list[int]] = {}  # patch view → the block indices its tokens come from
        self.wanted: frozenset[str] | None = None  # views to compute (None: all); see only()
        if family == "vit" and hasattr(backbone, "blocks"):
            blocks = list(cast(Any, backbone).blocks)
            for block in blocks[-4:]:
                block.register_forward_hook(lambda _m, _i, out: self._block_outputs.append(out))
            self.patch_layers = {"patch": [len(blocks) - 1], "patch4": list(range(max(0, len(blocks) - 4), len(blocks)))}
        elif family == "cnn" and not hasattr(backbone, "forward_features") and isinstance(getattr(backbone, "avgpool", None), nn.Module):
            # a torchvision CNN: its last feature map is the input of the global pool
            cast(nn.Module, backbone.avgpool).register_forward_hook(lambda _m, i, _o: setattr(self, "_feature_map", i[0]))

    def only(self, views: Any) -> FeatureEncoder:
        """Compute only ``views`` from now on: a view nobody stores costs nothing (patch4 concatenates
        four blocks' tokens, a copy of 4x the tokens per batch)."""
        self.wanted = frozenset(views)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.family == "custom":
            out = self.backbone(x)
            views = dict(out) if isinstance(out, dict) else {"features": out}
            # a (B, C, h, w) map is a patch view, stored channels last as (B, h, w, C)
            return {v: t.permute(0, 2, 3, 1) if t.ndim == 4 else t for v, t in views.items()}
        if self.family == "vit" and hasattr(self.backbone, "forward_features") and hasattr(self.backbone, "blocks"):
            self._block_outputs = []
            vit: Any = self.backbone  # a timm ViT: forward_features, norm, num_prefix_tokens, cls_token
            tokens = vit.forward_features(x)  # final norm applied
            n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
            if getattr(self.backbone, "cls_token", None) is None:  # no CLS token (I-JEPA): patch tokens only
                self._block_outputs = []
                patches = tokens[:, n_prefix:]
                return {"avgpool": patches.mean(dim=1), "patch": patches.unflatten(1, _patch_grid(vit, x, patches.shape[1]))}
            norm = vit.norm
            normed = [norm(h) for h in self._block_outputs[-4:]]
            self._block_outputs = []
            grid = _patch_grid(vit, x, tokens.shape[1] - n_prefix)
            views = {
                "cls": tokens[:, 0],
                "avgpool": tokens[:, n_prefix:].mean(dim=1),  # register tokens are prefix tokens: excluded
                "cls4": torch.cat([h[:, 0] for h in normed], dim=-1),
                # the final patch tokens as a grid (a view of them, no copy)
                "patch": tokens[:, n_prefix:].unflatten(1, grid),
            }
            if self.wanted is None or "patch4" in self.wanted:  # DINOv2's lin.4 tokens (last four blocks, normed): a copy
                views["patch4"] = torch.cat([h[:, n_prefix:] for h in normed], dim=-1).unflatten(1, grid)
            return views
        if self.family == "cnn" and hasattr(self.backbone, "forward_features") and hasattr(self.backbone, "forward_head"):
            cnn: Any = self.backbone  # a timm CNN: forward is forward_head(forward_features(x))
            feature_map = cnn.forward_features(x)
            return {"pool": cnn.forward_head(feature_map).flatten(1), "patch": feature_map.permute(0, 2, 3, 1)}
        self._feature_map = None
        out = self.backbone(x)
        views = {"cls" if self.family == "vit" else "pool": out.flatten(1)}
        if self._feature_map is not None and self._feature_map.ndim == 4:
            views["patch"] = self._feature_map.permute(0, 2, 3, 1)
        self._feature_map = None
        return views


PATCH_VIEWS = ("patch", "patch4")  # patch-token views a preset gives; stored only when asked for (--views)


def _patch_grid(vit: Any, x: torch.Tensor, tokens: int) -> tuple[int, int]:
    """(h, w) of a ViT's patch tokens for input ``x``."""
    size = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if size is not None:
        ph, pw = (size, size) if isinstance(size, int) else size
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        if h * w == tokens:
            return h, w
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise FeatstoreError(f"cannot arrange {tokens} patch tokens in a grid", "this model's patch views are not supported")
    return side, side


def build_encoder(
    spec: EncoderSpec, log: Callable[[str], None] = lambda s: None, trust: bool = False, ignore_keys: tuple[str, ...] | list[str] = ()
) -> FeatureEncoder:
    """Build the backbone (no download ever), load the weights, wrap it for feature views.

    ``ignore_keys``: globs of checkpoint keys to drop (reported), for heads of other names.
    """
    torch.manual_seed(0)  # --random-init is reproducible
    arch = spec.arch
    if arch.startswith("hf:"):  # a transformers folder: its timm twin where there is one, else transformers runs it
        folder, random = _transformers_folder(spec), spec.weights_sha256 == "random-init"
        if timm_twin(folder) is not None:
            return FeatureEncoder(build_twin(folder, spec.preprocess.image_size, random, log).eval(), "vit").eval()
        return FeatureEncoder(build_model(folder, random_init=random, log=log), "custom").eval()
    preset = find_preset(spec.name) if not arch.startswith("user:") else None
    if arch.startswith("timm:"):
        import timm

        kwargs = dict(preset.timm_kwargs) if preset else {}
        if spec.family == "vit":
            # position embeddings sized for the crop; timm's checkpoint filter resamples weights to it
            kwargs["img_size"] = spec.preprocess.image_size
        backbone = _construct(lambda: timm.create_model(arch[5:], pretrained=False, num_classes=0, **kwargs), bool(spec.weights_path))
    elif arch.startswith("tv:"):
        import torchvision

        backbone = _construct(lambda: torchvision.models.get_model(arch[3:], weights=None), bool(spec.weights_path))
        _strip_torchvision_head(backbone)
    else:
        backbone = _load_builder(arch[5:])()
        if not isinstance(backbone, nn.Module):
            raise UsageError(
                f"{arch[5:]!r} returned {type(backbone).__name__}, not an nn.Module", "the builder must return a torch.nn.Module"
            )
    if spec.weights_path:
        from .checkpoints import load_weights

        report = load_weights(
            backbone,
            spec.weights_path,
            arch=arch,
            trust=trust,
            ignore_keys=ignore_keys,
            pos_embed=pos_embed_rule(arch, preset),
            model_name=spec.name,
        )
        log(report.summary())
    return FeatureEncoder(backbone.eval(), spec.family).eval()


def _construct(make: Callable[[], nn.Module], weights_follow: bool) -> nn.Module:
    """``make()``, without its random initialisation when weights are about to replace every tensor.

    Random init is most of a build's time (a ViT-g spends tens of seconds in it on a CPU). The model
    is built on the meta device and allocated uninitialised; load_weights then refuses any missing
    parameter or buffer. A model with buffers outside its state dict (rotary tables, relative position
    indices) needs its init for them, so it is built normally.
    """
    if not weights_follow:
        return make()
    try:
        with torch.device("meta"):
            model = make()
    except Exception:  # a constructor that computes with tensor values (.item(), .tolist()) cannot run on meta
        return make()
    if any(m._non_persistent_buffers_set for m in model.modules()):
        return make()
    model = model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):  # may be absent from a checkpoint; only training reads it
            buffer.zero_()
    return model


def pos_embed_rule(arch: str, preset: Preset | None) -> str:
    """How the authors' code resamples position embeddings: the preset's rule; for any timm dinov2 name,
    that of the DINOv2 model it names (timm spells the register models ``*_reg4_dinov2``)."""
    if preset is not None:
        return preset.pos_embed
    if arch.startswith("timm:") and "dinov2" in arch:
        return dinov2_rule("_reg" in arch)
    return "timm"


def _strip_torchvision_head(model: nn.Module) -> None:
    for attr in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            return


def feature_dims(encoder: FeatureEncoder, preprocess: Preprocess, device: torch.device) -> dict[str, int | tuple[int, ...]]:
    """Dims of every view (D, or (h, w, C) of a patch view), from one forward pass on a blank image."""
    x = torch.zeros(1, 3, preprocess.image_size, preprocess.image_size, device=device)
    with torch.inference_mode():
        out = encoder(x.contiguous(memory_format=torch.channels_last))
    for view, t in out.items():
        if t.ndim not in (2, 4):
            raise FeatstoreError(
                f"view {view!r} has shape {tuple(t.shape)}, not (batch, dim) or (batch, channels, h, w)",
                "the model's forward must return (B, D) features or (B, C, h, w) feature maps",
            )
    return {k: int(v.shape[1]) if v.ndim == 2 else tuple(int(s) for s in v.shape[1:]) for k, v in out.items()}


def select_views(available: dict[str, Any], requested: list[str] | None, family: str | None = None) -> dict[str, Any]:
    """The requested views; by default every global view, and a preset's patch views only when named
    (they are tens of times larger). A user builder's views are all stored."""
    if not requested:
        return {v: d for v, d in available.items() if family == "custom" or v not in PATCH_VIEWS}
    unknown = [v for v in requested if v not in available]
    if unknown:
        raise UsageError(f"unknown view {', '.join(map(repr, unknown))}", f"this model gives: {', '.join(available)}")
    return {v: available[v] for v in requested}
