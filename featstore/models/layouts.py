"""The checkpoint layouts of the self-supervised codebases, as key rules.

Each rule names the codebase file its key names come from. A rule picks the copy of the network
that the authors' own evaluation loads, drops momentum copies and heads, and strips wrappers, so
that the remaining keys are those of a plain timm / torchvision backbone.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import FeatstoreError

# Top-level entries holding the network the authors evaluate, tried before any other entry
EVALUATED_ENTRIES = (
    # msn src/msn_train.py and ijepa src/train.py save {'encoder', 'target_encoder', ...}; their evals
    # (msn logistic_eval.py load_pretrained, the I-JEPA paper) use the target encoder
    ("target_encoder", "MSN and I-JEPA evaluate the target encoder"),
    # dino main_dino.py / ibot main_ibot.py save {'student', 'teacher', ...}; dinov2 train.py do_test
    # saves {'teacher': ...}; their eval_linear.py use --checkpoint_key teacher
    ("teacher", "DINO, iBOT and DINOv2 evaluate the teacher"),
)
# Wrapper entries, in the order tried (Lightning 'state_dict', MAE/DINOv2 'model', SimCLRv2 'resnet', …)
WRAPPER_ENTRIES = ("state_dict", "model", "model_state_dict", "module", "net", "network", "encoder", "resnet", "student")

# First key components that are momentum / target copies or training-only parts, never the evaluated network
MOMENTUM_COPIES = frozenset(
    {
        "momentum_backbone",
        "momentum_projector",  # solo-learn solo/methods/base.py, byol.py, mocov3.py
        "backbone_momentum",
        "projection_head_momentum",  # lightly examples/pytorch/byol.py
        "target_net",  # mmpretrain mmpretrain/models/selfsup/byol.py (CosineEMA of backbone+neck)
        "encoder_k",
        "momentum_encoder",  # mmpretrain moco.py, mmselfsup 0.x moco.py, moco main_moco.py, moco-v3 moco/builder.py
        "queue",
        "queue_ptr",  # MoCo v1/v2 moco/builder.py
        "online_predictor",  # byol-pytorch byol_pytorch.py
    }
)
# Module names of heads and training-only parameters: dropped when the model has no such module
HEAD_NAMES = frozenset(
    {
        "fc",
        "head",
        "heads",
        "classifier",
        "projector",
        "predictor",
        "projection_head",
        "prediction_head",
        "projection",
        "prediction",
        "head_dist",
        "mask_token",
        "queue",
        "queue_ptr",
        "neck",  # mmselfsup / mmpretrain necks (projection MLPs)
        "dino_head",
        "ibot_head",  # dinov2 dinov2/train/ssl_meta_arch.py
        "masked_embed",  # ibot models/vision_transformer.py (masked-patch token)
        "prototypes",  # swav src/resnet50.py, msn src/msn_train.py
        # MAE's decoder is not part of the encoder (mae models_mae.py), nor an autoencoder's
        # (encoder.* + decoder.*, as examples/ssl_study/autoencoder.py saves it)
        "decoder",
        "decoder_embed",
        "decoder_blocks",
        "decoder_norm",
        "decoder_pred",
        "decoder_pos_embed",
    }
)
# Prefixes stripped when most keys share them
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "learner.")

# Provenance: what an architecture name in a checkpoint means in the codebase that wrote it:
# (embed dim, heads, depth) of the ViT it builds
MOCOV3_VITS = {"vit_small": (384, 12, 12), "vit_base": (768, 12, 12)}  # moco-v3 vits.py (arch saved by main_moco.py)
DINO_VITS = {  # dino vision_transformer.py, ibot models/vision_transformer.py (args.arch, args.patch_size)
    "vit_tiny": (192, 3, 12),
    "vit_small": (384, 6, 12),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 16, 24),
}
MAE_VITS = {"base": (768, 12, 12), "large": (1024, 16, 24), "huge": (1280, 16, 32)}  # mae models_mae.py / models_vit.py
PRESET_FOR: dict[tuple[str, str, int | None], str] = {
    ("MoCo v3", "vit_small", 16): "mocov3-vits",
    ("MoCo v3", "vit_base", 16): "mocov3-vitb",
    ("DINO/iBOT", "vit_small", 16): "dinov1 or ibot-s",
    ("DINO/iBOT", "vit_small", 8): "dinov1-s8",
    ("DINO/iBOT", "vit_base", 16): "dinov1-b16 or ibot-b",
    ("DINO/iBOT", "vit_base", 8): "dinov1-b8",
    ("DINO/iBOT", "vit_large", 16): "ibot-l",
    ("MAE", "base", 16): "mae-b",
    ("MAE", "large", 16): "mae-l",
    ("MAE", "huge", 14): "mae-h",
}


@dataclass
class Provenance:
    """What the checkpoint says about the network it was trained as."""

    codebase: str = ""  # "MoCo v3", "DINO/iBOT", "MAE", "torchvision"
    arch: str = ""
    patch_size: int | None = None
    vit: tuple[int, int, int] | None = None  # (embed dim, heads, depth)
    size: str = ""  # the architecture's size name in that codebase (vit_small, base, …)

    @classmethod
    def of(cls, obj) -> Provenance:
        if not isinstance(obj, dict):
            return cls()
        args = obj.get("args")
        get = (lambda k: getattr(args, k, None)) if not isinstance(args, dict) else args.get
        arch = obj.get("arch")
        if isinstance(arch, str):
            if arch in MOCOV3_VITS:  # moco-v3 main_moco.py save_checkpoint({'arch': args.arch, ...})
                return cls("MoCo v3", arch, 16, MOCOV3_VITS[arch], arch)
            return cls("torchvision", arch)  # MoCo v1/v2 main_moco.py saves the torchvision name
        if args is not None:
            if isinstance(get("arch"), str):  # dino main_dino.py / ibot main_ibot.py save_dict['args']
                a = str(get("arch"))
                patch = get("patch_size")
                if a in DINO_VITS:
                    return cls("DINO/iBOT", a, int(patch) if patch else 16, DINO_VITS[a], a)
                return cls("torchvision", a)
            m = re.fullmatch(r"(?:mae_)?vit_(base|large|huge)_patch(\d+)", str(get("model") or ""))
            if m:  # mae main_pretrain.py / main_linprobe.py save args.model
                return cls("MAE", str(get("model")), int(m.group(2)), MAE_VITS[m.group(1)], m.group(1))
        return cls()

    @classmethod
    def of_mocov3_vit(cls, sd: dict) -> Provenance:
        """A base_encoder / momentum_encoder layout without 'arch' is still MoCo v3 (moco-v3 moco/builder.py),
        whose ViTs all have 12 heads (vits.py): width, depth and patch come from the tensors."""
        if "blocks.0.attn.qkv.weight" not in sd or "patch_embed.proj.weight" not in sd:
            return cls()
        dim = sd["blocks.0.attn.qkv.weight"].shape[1]
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        size = {384: "vit_small", 768: "vit_base"}.get(dim, f"ViT (dim {dim})")
        return cls("MoCo v3", size, sd["patch_embed.proj.weight"].shape[-1], (dim, 12, depth), size)

    def check(self, model: nn.Module, arch: str, name: str, label: str = "") -> None:
        """Refuse a model that contradicts the checkpoint's own record of its architecture."""
        label = label or arch or type(model).__name__
        if self.vit is not None and hasattr(model, "blocks") and hasattr(model, "patch_embed"):
            blocks: Any = model.blocks
            have = (getattr(model, "embed_dim", None), _heads(model), len(blocks))
            patch = getattr(model.patch_embed, "patch_size", (None,))[0]
            if have != self.vit or (self.patch_size and patch != self.patch_size):
                suggestion = PRESET_FOR.get((self.codebase, self.size, self.patch_size))
                raise FeatstoreError(
                    f"weights {name!r} were trained as {self.codebase} {self.arch} ({self.vit[1]} heads, dim {self.vit[0]}, "
                    f"depth {self.vit[2]}, patch {self.patch_size}) but {label} has {have[1]} heads, dim {have[0]}, "
                    f"depth {have[2]}, patch {patch}",
                    f"use --model {suggestion}" if suggestion else "use a --model built as the checkpoint's architecture",
                )
        if self.codebase == "torchvision" and re.fullmatch(r"(wide_)?resnet\d+(_\d+)?|resnext\S+", self.arch):
            base = arch.split(":", 1)[-1].split(".")[0]
            if re.fullmatch(r"(wide_)?resnet\d+(_\d+)?|resnext\S+", base) and base != self.arch:
                raise FeatstoreError(
                    f"weights {name!r} were trained as {self.arch} but the model is {label}",
                    f"use --model tv:{self.arch} or the preset for this checkpoint",
                )


def _heads(model: nn.Module) -> int | None:
    blocks: Any = model.blocks
    attn = getattr(blocks[0], "attn", None) if len(blocks) else None
    return getattr(attn, "num_heads", None)


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    provenance: Provenance = field(default_factory=Provenance)
    taken: str = ""  # which copy of the network was taken, and why
    placeholders: list[str] = field(default_factory=list)  # pickled classes loaded as inert placeholders


def normalize_checkpoint(obj, name: str = "checkpoint") -> Checkpoint:
    """Unwrap nested dicts to the evaluated network's flat tensor dict; drop copies; strip prefixes."""
    provenance = Provenance.of(obj)
    obj, taken = _unwrap(obj, name)
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise FeatstoreError(f"{name!r} holds no tensors", "pass the checkpoint of a trained model")
    sd, copy_taken = _select_copy(sd)
    if not provenance.codebase and "'base_encoder'" in copy_taken:
        provenance = Provenance.of_mocov3_vit(sd)
    return Checkpoint(sd, provenance, taken or copy_taken)


def _is_tensor_dict(v) -> bool:
    return isinstance(v, dict) and bool(v) and any(isinstance(x, torch.Tensor) for x in v.values())


def _unwrap(obj, name: str) -> tuple[dict, str]:
    taken = ""
    for _ in range(5):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, dict):
            break
        evaluated = next(((k, why) for k, why in EVALUATED_ENTRIES if isinstance(obj.get(k), (dict, nn.Module))), None)
        if evaluated is not None:
            taken = taken or f"{evaluated[0]!r} ({evaluated[1]})"
            obj = obj[evaluated[0]]
            continue
        wrapper = next((k for k in WRAPPER_ENTRIES if isinstance(obj.get(k), (dict, nn.Module)) and obj[k]), None)
        if wrapper is not None and not (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
            if wrapper == "student":  # said, as every copy taken is: the authors evaluate the teacher, absent here
                taken = taken or "'student' (the file has no 'teacher', the copy DINO, iBOT and DINOv2 evaluate)"
            obj = obj[wrapper]
            continue
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        # one entry of another name holding the tensors, e.g. {"resnet18_parameters": {...}, "epoch": 9}
        holders = [k for k, v in obj.items() if _is_tensor_dict(v) or isinstance(v, nn.Module)]
        if len(holders) != 1:
            break
        obj = obj[holders[0]]
        taken = taken or f"{holders[0]!r} (the only entry holding tensors)"
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise FeatstoreError(
            f"{name!r} holds a {type(obj).__name__}, not a state dict", "save the model with torch.save(model.state_dict(), path)"
        )
    return obj, taken


def _firsts(sd: dict) -> Counter:
    return Counter(k.split(".", 1)[0] for k in sd)


def _keep(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _select_copy(sd: dict) -> tuple[dict, str]:
    """Pick the evaluated copy among flat keys; drop momentum copies; strip shared wrapper prefixes."""
    taken = ""
    for _ in range(8):
        firsts = _firsts(sd)
        before = len(sd), next(iter(sd))
        if "teacher" in firsts:
            # dinov2 dinov2/train/ssl_meta_arch.py: model.state_dict() holds student.* and teacher.*
            sd, taken = _keep(sd, "teacher."), "'teacher' (DINO, iBOT and DINOv2 evaluate the teacher)"
        elif "online_encoder" in firsts:
            # byol-pytorch byol_pytorch.py: BYOL keeps net, online_encoder.net (the same module),
            # online_encoder.projector, online_predictor and the EMA target_encoder; BYOL evaluates the online net
            sd = _keep(sd, "net.") if "net" in firsts else _keep(sd, "online_encoder.net.")
            taken = "the online network 'net' (BYOL evaluates the online encoder; target_encoder is its EMA)"
        elif "encoder_q" in firsts or "base_encoder" in firsts:
            if "backbone" in firsts:
                # mmselfsup 0.x mmselfsup/models/algorithms/moco.py: encoder_q = Sequential(backbone, neck),
                # self.backbone = encoder_q[0] (saved twice); keep backbone.*
                sd = {k: v for k, v in sd.items() if not k.startswith(("encoder_q.", "encoder_k."))}
            else:
                query = "encoder_q" if "encoder_q" in firsts else "base_encoder"
                # moco main_moco.py (encoder_q / encoder_k), moco-v3 moco/builder.py (base_encoder / momentum_encoder)
                sd = _keep(sd, query + ".")
                taken = f"the query encoder {query!r} (MoCo evaluates it; the momentum encoder is dropped)"
        sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] not in MOMENTUM_COPIES} or sd
        for prefix in WRAPPER_PREFIXES:
            # strip a prefix that most keys share (a DINO teacher is backbone.* plus head.*)
            with_prefix = sum(k.startswith(prefix) for k in sd)
            if with_prefix and with_prefix >= len(sd) / 2:
                sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
                break
        if not sd:
            raise FeatstoreError("the checkpoint holds no backbone tensors", "pass the checkpoint of a trained model")
        if (len(sd), next(iter(sd))) == before:
            break
    return sd, taken


_CHUNKED = re.compile(r"blocks\.(\d+)\.(\d+)\.(.*)")


def rename_for_model(sd: dict, model_keys, children: list[str]) -> tuple[dict, list[str]]:
    """Renames whose target depends on the model: DINOv2 block chunks, Sequential child numbering."""
    model_keys = set(model_keys)
    notes = []
    if not any(_CHUNKED.match(k) for k in model_keys) and any(_CHUNKED.match(k) for k in sd):
        # dinov2 models/vision_transformer.py with block_chunks > 0: blocks.<chunk>.<index>.*, where the
        # index is global (chunks are padded with nn.Identity)
        sd = {(_CHUNKED.sub(r"blocks.\2.\3", k) if _CHUNKED.match(k) else k): v for k, v in sd.items()}
        notes.append("block chunks blocks.C.I.* renamed blocks.I.*")
    firsts = {k.split(".", 1)[0] for k in sd} - HEAD_NAMES
    numbered = firsts and all(f.isdigit() for f in firsts) and not any(k.split(".", 1)[0].isdigit() for k in model_keys)
    # lightly examples: backbone = nn.Sequential(*list(resnet.children())[:-1]) numbers the children
    if numbered and max(int(f) for f in firsts) < len(children):
        sd = {
            (children[int(k.split(".", 1)[0])] + "." + k.split(".", 1)[1] if k.split(".", 1)[0].isdigit() else k): v for k, v in sd.items()
        }
        notes.append("Sequential child numbers renamed to the model's children")
    return sd, notes
