"""Named models people look for: the published self-supervised backbones, each built with the
architecture its weights need and the preprocessing of its authors' own evaluation.

Every preset names the weights file it expects (in ``$FEATSTORE_WEIGHTS``), where that file is
published, and the evaluation code its preprocessing and settings come from (``source``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

# How the authors' own model resamples position embeddings for another grid (checkpoints.py applies it):
#   "dino"  DINO / DINOv2 / iBOT interpolate_pos_encoding: bicubic, scale_factor (grid + 0.1) / old, no antialias
#   "dinov2-reg"  DINOv2 with registers: the same function built by hub/backbones.py dinov2_*_reg with
#           interpolate_offset=0.0, interpolate_antialias=True: bicubic to the new size, antialiased
#   "scale" MSN / I-JEPA: bicubic, scale_factor sqrt(new tokens / old tokens), no antialias
#   "size"  MAE util/pos_embed.py: bicubic to the new size, align_corners=False, no antialias
#   "timm"  timm's resample_abs_pos_embed (antialiased)
POS_EMBED_RULES = ("dino", "dinov2-reg", "scale", "size", "timm")


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # "timm:<name>" or "tv:<name>"
    preprocess: Preprocess
    weights_file: str  # the file name looked up in the weights folder
    weights_url: str  # where the authors publish it
    description: str
    source: str  # the authors' evaluation code the preprocessing and settings come from
    dim: int  # width of the backbone's output (ViT embed dim, CNN pooled features)
    timm_kwargs: dict = field(default_factory=dict)
    pos_embed: str = "timm"

    def __post_init__(self):
        if self.pos_embed not in POS_EMBED_RULES:  # a typo here would otherwise resample like another codebase
            raise ValueError(f"preset {self.name!r}: unknown pos_embed rule {self.pos_embed!r} (one of {', '.join(POS_EMBED_RULES)})")

    @property
    def class_token(self) -> bool:
        """False for a model built without a CLS token (I-JEPA), which has only avgpool."""
        return self.timm_kwargs.get("class_token", True)

    @property
    def family(self) -> str:
        return "cnn" if self.arch.startswith("tv:resnet") else "vit"

    def views(self) -> dict[str, int]:
        if self.family == "cnn":
            return {"pool": self.dim}
        if not self.class_token:
            return {"avgpool": self.dim}
        return {"cls": self.dim, "avgpool": self.dim, "cls4": 4 * self.dim}


_BICUBIC = Preprocess(224, 256, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
_BILINEAR = Preprocess(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
# SimCLR's TF models take [0, 1] pixels (no mean/std): simclr/data_util.py center-crops 0.875 and resizes bicubic
_SIMCLR = Preprocess(224, 256, "bicubic", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

_DINOV2_SRC = "facebookresearch/dinov2 dinov2/data/transforms.py make_classification_eval_transform (256 bicubic, crop 224); hub/backbones.py (interpolate_offset=0.1)"
_DINOV2_REG_SRC = (
    "facebookresearch/dinov2 dinov2/data/transforms.py make_classification_eval_transform (256 bicubic, crop 224); "
    "hub/backbones.py dinov2_*_reg (interpolate_offset=0.0, interpolate_antialias=True)"
)
_DINO_SRC = "facebookresearch/dino eval_linear.py (Resize(256, interpolation=3), CenterCrop(224)); vision_transformer.py"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{1}_pretrain.pth"
_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
_IBOT_URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/{0}/checkpoint_teacher.pth"
_TV_SRC = "{0} (Resize(256), CenterCrop(224), bilinear, ImageNet mean/std)"


def dinov2_rule(registers: bool) -> str:
    """hub/backbones.py builds the register models with another resampling than the plain ones."""
    return "dinov2-reg" if registers else "dino"


def _dinov2(name: str, size: str, letter: str, dim: int, reg: bool) -> Preset:
    base = f"dinov2_vit{letter}14"
    full = base + ("_reg4" if reg else "")
    arch = f"timm:vit_{size}_patch14{'_reg4' if reg else ''}_dinov2"
    return Preset(
        name,
        arch,
        _BICUBIC,
        f"{full}_pretrain.pth",
        _DINOV2_URL.format(base, full),
        f"DINOv2 ViT-{letter.upper() if letter != 'g' else 'g'}/14{' with 4 registers' if reg else ''}",
        _DINOV2_REG_SRC if reg else _DINOV2_SRC,
        dim,
        pos_embed=dinov2_rule(reg),
    )


def _dino(name: str, arch: str, file: str, description: str, dim: int) -> Preset:
    return Preset(name, arch, _BICUBIC, f"{file}.pth", _DINO_URL.format(file), description, _DINO_SRC, dim, pos_embed="dino")


_PRESET_LIST = [
    _dinov2("dino", "small", "s", 384, False),
    _dinov2("dino-b", "base", "b", 768, False),
    _dinov2("dino-l", "large", "l", 1024, False),
    _dinov2("dino-g", "giant", "g", 1536, False),
    _dinov2("dino-reg4", "small", "s", 384, True),
    _dinov2("dino-b-reg4", "base", "b", 768, True),
    _dinov2("dino-l-reg4", "large", "l", 1024, True),
    _dinov2("dino-g-reg4", "giant", "g", 1536, True),
    _dino("dinov1", "timm:vit_small_patch16_224", "dino_deitsmall16_pretrain", "DINO ViT-S/16", 384),
    _dino("dinov1-s8", "timm:vit_small_patch8_224", "dino_deitsmall8_pretrain", "DINO ViT-S/8", 384),
    _dino("dinov1-b16", "timm:vit_base_patch16_224", "dino_vitbase16_pretrain", "DINO ViT-B/16", 768),
    _dino("dinov1-b8", "timm:vit_base_patch8_224", "dino_vitbase8_pretrain", "DINO ViT-B/8", 768),
    _dino("dinov1-r50", "tv:resnet50", "dino_resnet50_pretrain", "DINO ResNet-50", 2048),
    # MoCo v3's vits.py: vit_small has 12 heads (timm's has 6), same tensor shapes: the preset carries it
    Preset(
        "mocov3-vits",
        "timm:vit_small_patch16_224",
        _BILINEAR,
        "vit-s-300ep.pth.tar",
        "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
        "MoCo v3 ViT-S/16 (12 heads)",
        "facebookresearch/moco-v3 vits.py (vit_small: 12 heads); main_lincls.py (Resize(256), CenterCrop(224))",
        384,
        {"num_heads": 12},
    ),
    Preset(
        "mocov3-vitb",
        "timm:vit_base_patch16_224",
        _BILINEAR,
        "vit-b-300ep.pth.tar",
        "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
        "MoCo v3 ViT-B/16",
        "facebookresearch/moco-v3 vits.py; main_lincls.py (Resize(256), CenterCrop(224))",
        768,
    ),
    Preset(
        "mocov3-r50",
        "tv:resnet50",
        _BILINEAR,
        "r-50-1000ep.pth.tar",
        "https://dl.fbaipublicfiles.com/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar",
        "MoCo v3 ResNet-50 (1000 ep)",
        _TV_SRC.format("facebookresearch/moco-v3 main_lincls.py"),
        2048,
    ),
    *[
        Preset(
            f"mae-{s}",
            f"timm:vit_{size}_patch{p}_224",
            _BICUBIC,
            f"mae_pretrain_vit_{size}.pth",
            f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{size}.pth",
            f"MAE ViT-{s.upper()}/{p}",
            "facebookresearch/mae main_linprobe.py (Resize(256, interpolation=3), CenterCrop(224), --cls_token); models_vit.py",
            dim,
            pos_embed="size",
        )
        for s, size, p, dim in (("b", "base", 16, 768), ("l", "large", 16, 1024), ("h", "huge", 14, 1280))
    ],
    *[
        Preset(
            f"ibot-{s}",
            f"timm:vit_{size}_patch16_224",
            _BICUBIC,
            f"ibot_{folder}_checkpoint_teacher.pth",
            _IBOT_URL.format(folder),
            f"iBOT ViT-{s.upper()}/16 (teacher)",
            "bytedance/ibot evaluation/eval_linear.py (Resize(256, interpolation=3), CenterCrop(224)); models/vision_transformer.py",
            dim,
            pos_embed="dino",
        )
        for s, size, folder, dim in (("s", "small", "vits_16", 384), ("b", "base", "vitb_16", 768), ("l", "large", "vitl_16", 1024))
    ],
    *[
        Preset(
            f"msn-{s}",
            f"timm:vit_{size}_patch16_224",
            _BILINEAR,
            file,
            f"https://dl.fbaipublicfiles.com/msn/{file}",
            f"MSN ViT-{s.upper()}/16 (target encoder)",
            "facebookresearch/msn logistic_eval.py (Resize(256), CenterCrop(224); loads checkpoint['target_encoder']); src/deit.py",
            dim,
            pos_embed="scale",
        )
        for s, size, file, dim in (
            ("s", "small", "vits16_800ep.pth.tar", 384),
            ("b", "base", "vitb16_600ep.pth.tar", 768),
            ("l", "large", "vitl16_600ep.pth.tar", 1024),
        )
    ],
    Preset(
        "ijepa-h14",
        "timm:vit_huge_patch14_224",
        _BILINEAR,
        "IN1K-vit.h.14-300e.pth.tar",
        "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar",
        "I-JEPA ViT-H/14 (target encoder, no CLS token)",
        "facebookresearch/ijepa src/models/vision_transformer.py (no CLS token; paper: average-pooled target encoder); "
        "src/helper.py load_checkpoint; crop 224 from 256 as MSN's logistic_eval.py",
        1280,
        {"class_token": False, "global_pool": "avg", "fc_norm": False},
        pos_embed="scale",
    ),
    Preset(
        "simclr-r50",
        "tv:resnet50",
        _SIMCLR,
        "simclr_resnet50-1x.pth",
        "https://github.com/tonylins/simclr-converter",
        "SimCLR v1 ResNet-50 (1x) (TF weights converted)",
        "google-research/simclr data_util.py preprocess_for_eval (center crop 0.875, bicubic, no mean/std); tonylins/simclr-converter",
        2048,
    ),
    Preset(
        "byol-r50",
        "tv:resnet50",
        _BICUBIC,
        "byol_resnet50.pth",
        "https://github.com/deepmind/deepmind-research/tree/master/byol",
        "BYOL ResNet-50 (JAX weights converted)",
        "deepmind-research/byol utils/dataset.py preprocess_for_eval (crop 224/256, bicubic)",
        2048,
    ),
    Preset(
        "swav-r50",
        "tv:resnet50",
        _BILINEAR,
        "swav_800ep_pretrain.pth.tar",
        "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
        "SwAV ResNet-50 (800 ep)",
        _TV_SRC.format("facebookresearch/swav eval_linear.py"),
        2048,
    ),
    Preset(
        "barlowtwins-r50",
        "tv:resnet50",
        _BILINEAR,
        "barlowtwins_resnet50.pth",
        "https://dl.fbaipublicfiles.com/barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth",
        "Barlow Twins ResNet-50",
        _TV_SRC.format("facebookresearch/barlowtwins evaluate.py"),
        2048,
    ),
    Preset(
        "vicreg-r50",
        "tv:resnet50",
        _BILINEAR,
        "vicreg_resnet50.pth",
        "https://dl.fbaipublicfiles.com/vicreg/resnet50.pth",
        "VICReg ResNet-50",
        _TV_SRC.format("facebookresearch/vicreg evaluate.py"),
        2048,
    ),
    Preset(
        "mocov2-r50",
        "tv:resnet50",
        _BILINEAR,
        "moco_v2_800ep_pretrain.pth.tar",
        "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        "MoCo v2 ResNet-50 (800 ep)",
        _TV_SRC.format("facebookresearch/moco main_lincls.py"),
        2048,
    ),
    Preset(
        "resnet50",
        "tv:resnet50",
        # this file is torchvision's IMAGENET1K_V2 weights, evaluated at Resize(232) (resnet.py: resize_size=232), not 256
        Preprocess(224, 232, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
        "resnet50-11ad3fa6.pth",
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        "torchvision ResNet-50 (supervised, IMAGENET1K_V2)",
        "torchvision ResNet50_Weights.IMAGENET1K_V2 (Resize(232), CenterCrop(224), bilinear, ImageNet mean/std)",
        2048,
    ),
    Preset(
        "resnet18",
        "tv:resnet18",
        _BILINEAR,
        "resnet18-f37072fd.pth",
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "torchvision ResNet-18 (supervised)",
        _TV_SRC.format("torchvision references/classification"),
        512,
    ),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def _aliases() -> dict[str, str]:
    out = {
        "dinov2": "dino",
        "dinov2-s": "dino",
        "dinov2_reg4": "dino-reg4",
        "dinov2-s_reg4": "dino-reg4",
        "dino-vits16": "dinov1",
        "dino-vits8": "dinov1-s8",
        "dino-vitb16": "dinov1-b16",
        "dino-vitb8": "dinov1-b8",
        "dino-resnet50": "dinov1-r50",
    }
    for x in "blg":
        out[f"dinov2-{x}"] = f"dino-{x}"
        out[f"dinov2-{x}_reg4"] = f"dino-{x}-reg4"  # timm spells the register variants _reg4
    # the torch.hub names of the authors' repositories (dinov2/hubconf.py, dino/hubconf.py)
    for x, preset in (("s", "dino"), ("b", "dino-b"), ("l", "dino-l"), ("g", "dino-g")):
        out[f"dinov2_vit{x}14"] = preset
        out[f"dinov2_vit{x}14_reg"] = f"{preset}-reg4"
    out.update(dino_vits16="dinov1", dino_vits8="dinov1-s8", dino_vitb16="dinov1-b16", dino_vitb8="dinov1-b8", dino_resnet50="dinov1-r50")
    return out


ALIASES: dict[str, str] = _aliases()


def find_preset(name: str) -> Preset | None:
    """The preset called ``name`` (or one of its aliases), else None."""
    return PRESETS.get(ALIASES.get(name, name))


def aliases_of(name: str) -> list[str]:
    return sorted(a for a, target in ALIASES.items() if target == name)


def preset_table() -> list[dict]:
    """One row per preset, for ``featstore models``."""
    return [
        {
            "name": p.name,
            "aliases": aliases_of(p.name),
            "architecture": f"{p.description} [{p.arch}]",
            "views": p.views(),
            "weights_file": p.weights_file,
            "weights_url": p.weights_url,
            "preprocessing": p.preprocess.to_dict(),
            "source": p.source,
        }
        for p in PRESETS.values()
    ]
