"""transformers ViT folders converted into the timm ViT featstore already runs: ``Dinov2Model``,
``ViTModel`` (DINO v1 on the hub), ``ViTMAEModel`` / ``ViTMAEForPreTraining`` (the encoder) and
``IJepaModel``.

The timm twin took 8–11% less CPU time per image than transformers' forward of the same networks
(benchmarks/bench_hf_runtime.py, RESULTS.md #28), and needs no transformers import. The conversion
is exact: the keys are renamed (q, k and v concatenated into timm's qkv), and the position
embeddings are resampled once at load time as these models' ``interpolate_pos_encoding`` does at
every forward (bicubic to the new grid, ``align_corners=False``, no antialias: the "size" rule of
checkpoints.py). MAE's encoder sees every patch in order (its random masking, at ratio 0, only
shuffles them). Any other config (SwiGLU MLP, another activation, a .bin file) and the layouts
with no exact twin built (DINOv2 with registers, whose resampling antialiases; CLIP; SigLIP) are
run by transformers itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from ..errors import FeatstoreError
from .transformers_folder import TransformersFolder, dropped_text

# transformers' file key (hub files and save_pretrained's, and transformers 5's own names) -> timm's
_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = re.compile(r"(?:encoder\.layers?|layers)\.(\d+)\.(.+)")
_IN_LAYER = {
    "norm1": "norm1",  # DINOv2
    "norm2": "norm2",
    "layernorm_before": "norm1",  # ViT, ViTMAE, I-JEPA
    "layernorm_after": "norm2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
}
_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}


# the layouts with a twin -> (file key prefix of the encoder, tensors the twin does not need, note for the report)
TWINS = {
    "Dinov2Model": ("", ("embeddings.mask_token",), ""),
    "ViTModel": ("", ("pooler", "embeddings.mask_token"), ""),
    "ViTMAEModel": ("", (), "MAE's random masking off (every patch, in order)"),
    "ViTMAEForPreTraining": ("vit.", ("decoder",), "MAE's random masking off (every patch, in order)"),
    "IJepaModel": ("", ("pooler", "embeddings.mask_token"), ""),
}


def timm_twin(folder: TransformersFolder) -> dict[str, Any] | None:
    """The timm VisionTransformer arguments of the folder's network, or None when transformers must run it."""
    c = folder.config
    dinov2 = folder.architecture == "Dinov2Model"
    dim = int(c.get("hidden_size", 768))
    ratio = float(c.get("mlp_ratio", 4)) if dinov2 else int(c.get("intermediate_size", 4 * dim)) / dim
    plain = (
        folder.architecture in TWINS
        and c.get("hidden_act", "gelu") == "gelu"
        and not c.get("use_swiglu_ffn", False)
        and int(c.get("num_channels", 3)) == 3
        and isinstance(c.get("patch_size", 16), int)
        and (dinov2 or int(dim * ratio) == int(c.get("intermediate_size", 4 * dim)))
        and all(p.suffix == ".safetensors" for p in folder.weights)
    )
    if not plain:
        return None
    ijepa = folder.architecture == "IJepaModel"
    return dict(
        patch_size=int(c.get("patch_size", 14 if dinov2 else 16)),
        embed_dim=dim,
        depth=int(c.get("num_hidden_layers", 12)),
        num_heads=int(c.get("num_attention_heads", 12)),
        mlp_ratio=ratio,  # both make int(hidden * mlp_ratio) units
        qkv_bias=bool(c.get("qkv_bias", True)),
        init_values=float(c.get("layerscale_value", 1.0)) if dinov2 else None,
        norm_layer=partial(nn.LayerNorm, eps=float(c.get("layer_norm_eps", 1e-6 if dinov2 else 1e-12))),
        act_layer=nn.GELU,  # transformers' "gelu" is the exact erf GELU, as nn.GELU()
        num_classes=0,
        class_token=not ijepa,  # I-JEPA has none: avgpool only
        global_pool="avg" if ijepa else "token",
        fc_norm=False,  # the final norm stays on the tokens (forward_features), as transformers' layernorm
    )


def convert(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(timm state dict, the file's keys with no place in it)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    other = []
    for key, value in sd.items():
        if key in _EMBEDDINGS:
            out[_EMBEDDINGS[key]] = value
            continue
        m = _LAYER.fullmatch(key)
        if m is None:
            other.append(key)
            continue
        block, rest = m.groups()
        name, _, leaf = rest.rpartition(".")
        if name in _QKV:
            qkv.setdefault((block, leaf), {})[_QKV[name]] = value
        elif name in _IN_LAYER:
            out[f"blocks.{block}.{_IN_LAYER[name]}.{leaf}"] = value
        elif rest in _IN_LAYER:  # the layer-scale parameters have no leaf name
            out[f"blocks.{block}.{_IN_LAYER[rest]}"] = value
        else:
            other.append(key)
    for (block, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise FeatstoreError(f"layer {block} of the file lacks {sorted({'q', 'k', 'v'} - set(parts))} {leaf}", None)
        out[f"blocks.{block}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out, other


def build_twin(folder: TransformersFolder, image_size: int, random_init: bool, log: Callable[[str], None]) -> nn.Module:
    """The timm ViT of a Dinov2Model folder, its weights converted (the caller wraps it for views)."""
    from timm.models.vision_transformer import VisionTransformer

    from .checkpoints import resample_pos_embed

    kwargs = timm_twin(folder)
    assert kwargs is not None
    label = f"{folder.architecture} [converted to timm VisionTransformer]"
    if random_init:
        torch.manual_seed(0)
        model = VisionTransformer(img_size=image_size, **kwargs)
        log(f"{label} from {folder.path.name}/config.json: random init")
        return model
    with torch.device("meta"):
        model = VisionTransformer(img_size=image_size, **kwargs)
    model = model.to_empty(device="cpu")  # every tensor is replaced below; a missing one is refused
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in folder.weights:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own (Rust) error types
            raise FeatstoreError(
                f"{f.name!r} in {folder.path} is not a readable safetensors file ({e})",
                folder.fetch_hint or "check the folder's weights file (download it again)",
            ) from e
    prefix, droppable, note = TWINS[folder.architecture]
    if prefix:  # a pretraining model's file: the encoder under its prefix, the rest (the decoder) dropped
        sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
    sd, other = convert(sd)
    # the model's grid: transformers resamples at each forward with this rule; here once, at load time
    sd, resampled = resample_pos_embed(sd, model, "size")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [k for k in sd if k in shapes and tuple(sd[k].shape) != shapes[k]]
    if bad:
        k = bad[0]
        raise FeatstoreError(
            f"weights in {folder.path} do not fit its config.json ({folder.architecture}): {len(bad)} tensors differ in shape, "
            f"e.g. {k} {tuple(sd[k].shape)} in the file vs {shapes[k]} from config.json",
            "config.json and the weights come from different models: " + (folder.fetch_hint or "download the folder again"),
        )
    missing = sorted(shapes.keys() - sd.keys())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FeatstoreError(
            f"weights in {folder.path} lack {len(missing)} parameters of {folder.architecture}: {shown}",
            "the folder's weights do not hold the whole model: " + (folder.fetch_hint or "download the folder again"),
        )
    dropped = [k for k in other if any(k == d or k.startswith(d + ".") for d in droppable)]
    unplaced = [k for k in sd if k not in shapes] + [k for k in other if k not in dropped]
    if unplaced:
        raise FeatstoreError(
            f"weights in {folder.path} have {len(unplaced)} tensors with no place in {folder.architecture}, e.g. {unplaced[0]}",
            "config.json and the weights come from different models: " + (folder.fetch_hint or "download the folder again"),
        )
    model.load_state_dict(sd)
    log(
        "; ".join(
            [f"weights {folder.path.name}: {label}, loaded {len(sd)} tensors", dropped_text(dropped), *([note] if note else []), *resampled]
        )
    )
    return model
