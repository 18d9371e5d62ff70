"""Hugging Face transformers model folders (``config.json`` + ``model.safetensors``), run by transformers.

The architecture comes from ``config.json`` (``architectures`` names the class; sizes, patch,
registers, layer scale and MLP type are the config's), the weights are loaded by transformers'
own ``from_pretrained`` from the local folder only (its key renames between releases included:
transformers 5 renames the attention keys that hub files and ``save_pretrained`` still write), and
the features are those of transformers' forward: position embeddings are resampled for another
crop size by each model's own ``interpolate_pos_encoding``.

Which runs: ``Dinov2Model``, ``ViTModel``, ``ViTMAE*`` and ``IJepaModel`` folders with a plain config
are converted into their timm twin (hf_to_timm.py), which
took 8–11% less CPU time per image than transformers' forward (benchmarks/bench_hf_runtime.py,
RESULTS.md #28) and needs no transformers import; every other layout is run by transformers itself,
which keeps the features exactly transformers' at every size with nothing to keep in step with its
key renames. transformers is imported only when it runs a folder.

Views, as transformers defines the outputs: ``cls`` is the normed CLS token (``pooler_output``
for DINOv2, CLIP's post-layernormed CLS), ``avgpool`` the mean of the final normed patch tokens
(register tokens excluded), ``cls4`` the normed CLS of the last 4 layers; CLIP adds ``proj``
(the projected image embedding, when the folder has the projection) and SigLIP gives ``pooled``
(its attention-pooling head's output, the image embedding).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FeatstoreError
from ..home import file_sha256
from ..preprocess import Preprocess
from .hf_preprocess import default_preprocess, read_preprocessor_config


@dataclass(frozen=True)
class Layout:
    """How featstore runs one kind of transformers checkpoint."""

    model_class: str  # the transformers class built and run
    views: tuple[str, ...]
    interpolate_flag: bool = True  # forward takes interpolate_pos_encoding (DINOv2's always interpolates)
    init_kwargs: tuple[tuple[str, Any], ...] = ()  # e.g. no pooler built
    sub_config: str = ""  # the part of config.json the vision model is built from (CLIPModel's vision_config)


_VIT_VIEWS = ("cls", "avgpool", "cls4")
_NO_POOLER = (("add_pooling_layer", False),)
# config.json "architectures"[0] -> how it is run
LAYOUTS: dict[str, Layout] = {
    "Dinov2Model": Layout("Dinov2Model", _VIT_VIEWS, interpolate_flag=False),
    "Dinov2WithRegistersModel": Layout("Dinov2WithRegistersModel", _VIT_VIEWS, interpolate_flag=False),
    "ViTModel": Layout("ViTModel", _VIT_VIEWS, init_kwargs=_NO_POOLER),  # DINO v1 on the hub; its pooler is a tanh head: dropped
    "ViTMAEModel": Layout("ViTMAEModel", _VIT_VIEWS),
    "ViTMAEForPreTraining": Layout("ViTMAEModel", _VIT_VIEWS),  # the encoder only: the decoder is dropped
    "IJepaModel": Layout("IJepaModel", ("avgpool",), init_kwargs=_NO_POOLER),  # no CLS token
    "CLIPVisionModel": Layout("CLIPVisionModel", ("cls", "avgpool")),
    "CLIPVisionModelWithProjection": Layout("CLIPVisionModelWithProjection", ("cls", "avgpool", "proj")),
    "CLIPModel": Layout("CLIPVisionModelWithProjection", ("cls", "avgpool", "proj"), sub_config="vision_config"),
    "SiglipVisionModel": Layout("SiglipVisionModel", ("pooled", "avgpool")),
    "SiglipModel": Layout("SiglipVisionModel", ("pooled", "avgpool"), sub_config="vision_config"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# what a dropped key's first component is, for the load report
_DROPPED_NAMES = {
    "text_model": "text tower",
    "text_projection": "text projection",
    "logit_scale": "logit scale",
    "logit_bias": "logit bias",
    "pooler": "pooler",
    "decoder": "decoder",
    "embeddings.mask_token": "mask token",
}


@dataclass(frozen=True)
class TransformersFolder:
    """A transformers model folder, read without importing torch or transformers."""

    path: Path
    config: dict
    architecture: str  # as config.json names it
    layout: Layout
    weights: tuple[Path, ...]  # the weight files (shards in order); empty only under random init
    preprocess: Preprocess
    preprocessing_source: str
    notes: tuple[str, ...] = ()
    fetch_hint: str = ""  # how to get the folder again (a hub model's download command)
    extra_inputs: tuple[str, ...] = field(default=())  # files besides the folder's whose change changes the model (a hub ref)

    @property
    def vision_config(self) -> dict:
        return self.config.get(self.layout.sub_config, {}) if self.layout.sub_config else self.config

    @property
    def model_type(self) -> str:
        return str(self.vision_config.get("model_type") or self.config.get("model_type") or "")

    @property
    def image_size(self) -> int:
        size = self.vision_config.get("image_size", 224)
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def arch(self) -> str:
        return f"hf:{self.architecture}"

    def config_sha256(self) -> str:
        return hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()

    def weights_sha256(self) -> str:
        digests = [file_sha256(p) for p in self.weights]
        if len(digests) == 1:
            return digests[0]
        return hashlib.sha256(" ".join(digests).encode()).hexdigest()  # shards: the digest of their digests

    def inputs(self) -> list[str]:
        """Every file the resolution read: their stamps keep the up-to-date memo true."""
        files = [self.path / "config.json", self.path / "preprocessor_config.json", *self.weights]
        return [str(p) for p in files] + list(self.extra_inputs)

    def details(self) -> dict:
        """Provenance recorded with the encoder (and part of the cache key)."""
        return {
            "layout": self.layout.model_class,
            "config_sha256": self.config_sha256(),
            "preprocessing_source": self.preprocessing_source,
            **({"preprocessing_notes": list(self.notes)} if self.notes else {}),
        }


def is_transformers_folder(path: str | os.PathLike) -> bool:
    """Any folder (--weights DIR can only mean one; read_folder says what it lacks), or a weights file
    beside a config.json that names a layout featstore runs (the model.safetensors of a folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return True
    if p.is_file() and p.name in WEIGHT_FILES[::2] and (p.parent / "config.json").is_file():
        try:
            return _architecture(json.loads((p.parent / "config.json").read_text())) in LAYOUTS
        except (OSError, ValueError):
            return False
    return False


def _architecture(config: Any) -> str:
    names = config.get("architectures") if isinstance(config, dict) else None
    return str(names[0]) if isinstance(names, list) and names else ""


def read_folder(
    path: str | Path, random_init: bool = False, fetch_hint: str = "", extra_inputs: tuple[str, ...] = ()
) -> TransformersFolder:
    """The folder's layout, weight files and preprocessing, or a one-line error naming what is wrong."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent  # model.safetensors given: its folder
    path = path.resolve()
    again = fetch_hint or "pass the folder transformers' save_pretrained wrote (config.json + model.safetensors)"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FeatstoreError(f"{str(path)!r} has no config.json, so it is not a transformers model folder", again)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise FeatstoreError(f"{config_file} is not readable JSON ({e})", again) from e
    architecture = _architecture(config)
    if architecture not in LAYOUTS:
        named = f"architecture {architecture!r}" if architecture else "no architecture (config.json lacks 'architectures')"
        raise FeatstoreError(
            f"{config_file} names {named}, which featstore does not run",
            f"transformers folders featstore runs: {', '.join(LAYOUTS)}",
        )
    layout = LAYOUTS[architecture]
    if not isinstance(config.get("model_type"), str):
        raise FeatstoreError(f"{config_file} has no 'model_type'", again)
    if layout.sub_config and not isinstance(config.get(layout.sub_config), dict):
        raise FeatstoreError(f"{config_file}: {architecture} without a {layout.sub_config!r} section", again)
    weights: tuple[Path, ...] = ()
    if not random_init:
        weights = _weight_files(path, again)
    folder = TransformersFolder(path, config, architecture, layout, weights, Preprocess(), "", (), fetch_hint, extra_inputs)
    pre_file = path / "preprocessor_config.json"
    if pre_file.is_file():
        pre, source, notes = read_preprocessor_config(pre_file)
    else:
        pre, source = default_preprocess(folder.model_type, folder.image_size)
        source, notes = f"no preprocessor_config.json: {source}", []
    return TransformersFolder(path, config, architecture, layout, weights, pre, source, tuple(notes), fetch_hint, extra_inputs)


def _weight_files(path: Path, again: str) -> tuple[Path, ...]:
    for name in WEIGHT_FILES:
        f = path / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return (f,)
        try:
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise FeatstoreError(f"{f} is not a readable shard index ({e})", again) from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FeatstoreError(f"{path} lacks {len(missing)} of the {len(shards)} shards its index names, e.g. {missing[0]}", again)
        return tuple(path / s for s in shards)
    raise FeatstoreError(f"{str(path)!r} has a config.json but no weights ({' / '.join(WEIGHT_FILES[::2])})", again)


def dropped_text(keys: list[str]) -> str:
    """``dropped text tower (text_model.*, 68 tensors), …`` for the load report."""
    groups = Counter(k.split(".", 1)[0] if not k.startswith("embeddings.mask_token") else "embeddings.mask_token" for k in keys)
    if not groups:
        return "dropped nothing"
    parts = []
    for k, n in sorted(groups.items()):
        spelled = f"{k}.*" if any(u.startswith(k + ".") for u in keys) else k
        parts.append(f"{_DROPPED_NAMES.get(k, k)} ({spelled}, {n} tensor{'s' if n > 1 else ''})")
    return "dropped " + ", ".join(parts)


# ---------------------------------------------------------------- building (imports transformers)


def build_model(folder: TransformersFolder, random_init: bool = False, log: Callable[[str], None] = lambda s: None) -> TransformersViews:
    """The views module of the folder's model, its weights loaded (or random init); logs the load report."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise FeatstoreError(
            f"{folder.path} is a transformers model folder, and transformers is not installed",
            "pip install 'featstore[hf]' (transformers 5)",
        ) from e
    cls = getattr(transformers, folder.layout.model_class)
    try:
        config = _config(transformers, folder)
    except Exception as e:  # transformers' config classes validate their values in their own ways
        raise FeatstoreError(
            f"{folder.path / 'config.json'} is not a valid {folder.architecture} config ({type(e).__name__}: {str(e)[:200]})",
            folder.fetch_hint or "repair config.json or download the folder again",
        ) from e
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # transformers' own load table and bars: featstore reports the load itself
    hf_logging.disable_progress_bar()
    try:
        if random_init:
            torch.manual_seed(0)
            model = cls(config, **dict(folder.layout.init_kwargs))
            report = f"{folder.architecture} [run as {folder.layout.model_class}] from {folder.path.name}/config.json: random init"
        else:
            model, report = _load(cls, config, folder)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    log("; ".join([report, f"preprocessing from {folder.preprocessing_source}", *folder.notes]))
    return TransformersViews(model.eval(), folder.layout, folder.architecture)


def _config(transformers, folder: TransformersFolder):
    config_cls = transformers.AutoConfig.for_model(folder.config["model_type"]).__class__
    config = config_cls.from_dict(folder.config)
    if folder.layout.sub_config:
        vision = getattr(config, folder.layout.sub_config)
        if hasattr(config, "projection_dim"):  # CLIPModel keeps the projection width at the top level
            vision.projection_dim = config.projection_dim
        config = vision
    if folder.layout.model_class == "ViTMAEModel":
        config.mask_ratio = 0.0  # MAE's random masking off: the encoder sees every patch
    return config


def _load(cls, config, folder: TransformersFolder):
    try:
        model, info = cls.from_pretrained(
            str(folder.path),
            config=config,
            local_files_only=True,
            dtype=torch.float32,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # mismatches come back in the loading info and are refused below, by name
            **dict(folder.layout.init_kwargs),
        )
    except Exception as e:  # a damaged weights file: safetensors and torch raise their own types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise FeatstoreError(
            f"transformers cannot load the weights in {folder.path} ({type(e).__name__}: {first})",
            folder.fetch_hint or "check the folder's weights file (download it again)",
        ) from e
    label = folder.architecture + (f" [run as {folder.layout.model_class}]" if folder.layout.model_class != folder.architecture else "")
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, have, want = mismatched[0]
        raise FeatstoreError(
            f"weights in {folder.path} do not fit its config.json ({label}): {len(mismatched)} tensors differ in shape, "
            f"e.g. {key} {tuple(have)} in the file vs {tuple(want)} from config.json",
            "config.json and the weights come from different models: " + (folder.fetch_hint or "download the folder again"),
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FeatstoreError(
            f"weights in {folder.path} lack {len(missing)} parameters of {label}: {shown}",
            "the folder's weights do not hold the whole model: " + (folder.fetch_hint or "download the folder again"),
        )
    if info.get("error_msgs"):
        raise FeatstoreError(f"weights in {folder.path} do not load into {label}: {info['error_msgs'][0][:200]}", folder.fetch_hint or None)
    unexpected = sorted(info.get("unexpected_keys") or [])
    # only the parts the vision encoder does not run may be left behind (a text tower, a decoder, a
    # pooler); anything else is the network itself that config.json has no place for: layers beyond
    # its num_hidden_layers, register tokens under a config without them (a truncated network, silently)
    unplaced = [k for k in unexpected if not any(k == d or k.startswith(d + ".") for d in _DROPPED_NAMES)]
    if unplaced:
        raise FeatstoreError(
            f"weights in {folder.path} have {len(unplaced)} tensors with no place in {label}, e.g. {unplaced[0]}",
            "config.json and the weights come from different models: " + (folder.fetch_hint or "download the folder again"),
        )
    text = f"weights {folder.path.name}: {label}, loaded {len(model.state_dict())} tensors by transformers; "
    text += dropped_text(unexpected)
    if folder.layout.model_class == "ViTMAEModel":
        text += "; MAE random masking off (mask_ratio 0)"
    return model, text


class TransformersViews(nn.Module):
    """``forward(pixels) -> {view: (B, D)}`` from one forward of a transformers vision model."""

    def __init__(self, model, layout: Layout, architecture: str):
        super().__init__()
        self.model = model
        self.layout = layout
        self.architecture = architecture
        config = model.config
        self.prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # CLS + registers, excluded from avgpool

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = self.layout.model_class
        kwargs: dict[str, Any] = {}
        if self.layout.interpolate_flag:
            kwargs["interpolate_pos_encoding"] = True  # a no-op at the native size, transformers' resampling at others
        if kind == "ViTMAEModel":
            # mask_ratio 0 keeps every patch, but MAE still shuffles them by random noise: identity order instead
            patch = self.model.config.patch_size
            n = (x.shape[-2] // patch) * (x.shape[-1] // patch)
            kwargs["noise"] = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
        want_cls4 = "cls4" in self.layout.views
        out = self.model(pixel_values=x, output_hidden_states=want_cls4, **kwargs)
        seq = out.last_hidden_state
        if kind.startswith("CLIP"):
            # CLIP's last_hidden_state is before post_layernorm, which it applies to the CLS only (pooler_output)
            post = getattr(self.model, "vision_model", self.model).post_layernorm  # transformers 5's CLIPVisionModel is the tower itself
            views = {"cls": post(seq[:, 0]), "avgpool": post(seq[:, 1:]).mean(dim=1)}
            if "proj" in self.layout.views:
                views["proj"] = out.image_embeds
            return views
        if kind == "SiglipVisionModel":
            views = {"avgpool": seq.mean(dim=1)}  # no CLS: every token is a patch; post_layernorm already applied
            if out.pooler_output is not None:
                views = {"pooled": out.pooler_output, **views}
            return views
        if kind == "IJepaModel":
            return {"avgpool": seq.mean(dim=1)}
        views = {"cls": seq[:, 0], "avgpool": seq[:, self.prefix :].mean(dim=1)}
        if want_cls4:
            norm = self.model.layernorm
            views["cls4"] = torch.cat([norm(h[:, 0]) for h in out.hidden_states[1:][-4:]], dim=-1)
        return views
