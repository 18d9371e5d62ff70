"""Published SSL checkpoint layouts load into the network their authors evaluated, with its features.

Each checkpoint is written with the key names, nesting, copies and metadata of the codebase that
saves it (the file each rule comes from is cited), loaded through the public API
(``resolve_encoder`` + ``build_encoder``, as ``featstore extract`` does), and its features are
compared with a reference model holding the same tensors. Every other copy in a file (momentum,
student, online/target) holds different values, so taking the wrong one changes the features.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from featstore.errors import FeatstoreError
from featstore.models.checkpoints import load_weights, resample_pos_embed
from featstore.models.encoders import build_encoder, pos_embed_rule, resolve_encoder
from featstore.models.presets import PRESETS

IMAGES = {s: torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(s)) for s in (32, 56, 224)}


def features(model: str, path, size: int, **kw) -> tuple[dict[str, torch.Tensor], str]:
    """Features of ``IMAGES[size]`` through the encoder featstore builds for ``model`` + ``path``."""
    spec = resolve_encoder(model, weights=path, preprocess_overrides=dict(image_size=size, resize=size))
    logs: list[str] = []
    encoder = build_encoder(spec, log=logs.append, **kw)
    with torch.inference_mode():
        return encoder(IMAGES[size]), logs[0]


def perturbed(sd: dict, seed: int) -> dict:
    """Same keys and shapes, other values (a constant per copy): a momentum / student copy."""
    return {k: (torch.full_like(v, 0.01 * seed) if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


# ---------------------------------------------------------------- ResNet layouts (ResNet-18 at 32 px)


@pytest.fixture(scope="module")
def r18():
    """A ResNet-18 with non-trivial BatchNorm statistics and its reference pooled features."""
    torch.manual_seed(123)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    body = nn.Sequential(*list(model.children())[:-1])
    with torch.inference_mode():
        expected = body(IMAGES[32]).flatten(1)
    return model, expected


class _Mlp(nn.Module):
    def __init__(self, dims=(512, 8, 4)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.BatchNorm1d(dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2]))


def _solo(model, method: str) -> dict:
    """solo-learn solo/methods/base.py (backbone, classifier; BaseMomentumMethod: momentum_backbone) and
    solo/methods/{simclr,byol,mocov3}.py (projector, predictor, momentum_projector): a Lightning checkpoint."""
    m = nn.Module()
    m.backbone = copy.deepcopy(model)
    m.backbone.fc = nn.Identity()
    m.projector = _Mlp().net
    if method != "simclr":
        m.momentum_backbone = copy.deepcopy(m.backbone)
        m.momentum_projector = _Mlp().net
    if method == "byol":
        m.predictor = _Mlp((4, 8, 4)).net
    m.classifier = nn.Linear(512, 10)
    sd = m.state_dict()
    if method != "simclr":
        sd.update(prefixed("momentum_backbone.", perturbed(m.backbone.state_dict(), 1)))
    return {
        "epoch": 9,
        "global_step": 90,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": sd,
        "optimizer_states": [],
        "lr_schedulers": [],
        "callbacks": {},
    }


def _lightly_byol(model) -> dict:
    """lightly examples/pytorch/byol.py: backbone = nn.Sequential(*list(resnet.children())[:-1]),
    projection_head / prediction_head, backbone_momentum / projection_head_momentum (deep copies)."""
    m = nn.Module()
    m.backbone = nn.Sequential(*list(copy.deepcopy(model).children())[:-1])
    m.projection_head = _Mlp().net
    m.prediction_head = _Mlp((4, 8, 4)).net
    m.backbone_momentum = copy.deepcopy(m.backbone)
    m.projection_head_momentum = copy.deepcopy(m.projection_head)
    sd = m.state_dict()
    sd.update(prefixed("backbone_momentum.", perturbed(m.backbone.state_dict(), 2)))
    return sd


class _EMA(nn.Module):
    """mmengine BaseAveragedModel (CosineEMA, ExponentialMovingAverage): .module plus a 'steps' buffer."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.register_buffer("steps", torch.tensor(0))


def _mmpretrain(model, method: str) -> dict:
    """mmpretrain mmpretrain/models/selfsup/byol.py (target_net = CosineEMA(Sequential(backbone, neck)))
    and moco.py (encoder_k = ExponentialMovingAverage(Sequential(backbone, neck)), queue, queue_ptr)."""
    m = nn.Module()
    m.backbone = copy.deepcopy(model)
    m.backbone.fc = nn.Identity()
    m.neck = _Mlp().net
    m.head = nn.Module()
    m.head.predictor = _Mlp((4, 8, 4)).net
    momentum = nn.Sequential(copy.deepcopy(m.backbone), copy.deepcopy(m.neck))
    momentum[0].load_state_dict(perturbed(m.backbone.state_dict(), 3))
    if method == "byol":
        m.target_net = _EMA(momentum)
    else:
        m.encoder_k = _EMA(momentum)
        m.register_buffer("queue", torch.randn(4, 16))
        m.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    return {"meta": {"epoch": 200, "mmengine_version": "0.10.3"}, "state_dict": m.state_dict()}


def _mmselfsup0_moco(model) -> dict:
    """mmselfsup 0.x mmselfsup/models/algorithms/moco.py: encoder_q = Sequential(backbone, neck),
    encoder_k a copy, self.backbone = encoder_q[0] (saved a second time), queue, queue_ptr."""
    m = nn.Module()
    backbone = copy.deepcopy(model)
    backbone.fc = nn.Identity()
    m.encoder_q = nn.Sequential(backbone, _Mlp().net)
    m.encoder_k = copy.deepcopy(m.encoder_q)
    m.encoder_k[0].load_state_dict(perturbed(backbone.state_dict(), 4))
    m.backbone = m.encoder_q[0]
    m.register_buffer("queue", torch.randn(4, 16))
    m.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    return {"meta": {}, "state_dict": m.state_dict()}


def _byol_pytorch(model) -> dict:
    """byol-pytorch byol_pytorch.py: BYOL holds net, online_encoder = NetWrapper(net) (the same module:
    saved twice), online_encoder.projector.net, online_predictor.net, target_encoder (deepcopy of the
    online encoder); examples/lightning/train.py wraps it as self.learner in a LightningModule."""
    learner = nn.Module()
    learner.net = copy.deepcopy(model)  # byol-pytorch hooks the avgpool: fc stays in the module
    learner.online_encoder = nn.Module()
    learner.online_encoder.net = learner.net
    learner.online_encoder.projector = _Mlp()
    learner.online_predictor = _Mlp((4, 8, 4))
    learner.target_encoder = copy.deepcopy(learner.online_encoder)
    learner.target_encoder.net.load_state_dict(perturbed(model.state_dict(), 5))
    lightning = nn.Module()
    lightning.learner = learner
    return {"epoch": 3, "state_dict": lightning.state_dict()}


def _sthalles(model) -> dict:
    """sthalles/SimCLR models/resnet_simclr.py (self.backbone = resnet; backbone.fc = Sequential(Linear,
    ReLU, fc)) saved by simclr.py: {'epoch', 'arch', 'state_dict', 'optimizer'}."""
    m = nn.Module()
    m.backbone = copy.deepcopy(model)
    m.backbone.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    return {"epoch": 100, "arch": "resnet18", "state_dict": m.state_dict(), "optimizer": {"state": {}, "param_groups": []}}


def _moco_v2(model) -> dict:
    """moco main_moco.py: {'epoch', 'arch', 'state_dict': DDP(MoCo) with module.encoder_q / encoder_k
    (fc an MLP with --mlp), module.queue, module.queue_ptr}."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    mlp = {
        "fc.0.weight": torch.randn(512, 512),
        "fc.0.bias": torch.zeros(512),
        "fc.2.weight": torch.randn(8, 512),
        "fc.2.bias": torch.zeros(8),
    }
    state = {
        **prefixed("module.encoder_q.", {**sd, **mlp}),
        **prefixed("module.encoder_k.", {**perturbed(sd, 6), **mlp}),
        "module.queue": torch.randn(8, 16),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    return {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {}}


CNN_LAYOUTS = {
    "solo-learn simclr": partial(_solo, method="simclr"),
    "solo-learn byol": partial(_solo, method="byol"),
    "solo-learn mocov3": partial(_solo, method="mocov3"),
    "lightly byol": _lightly_byol,
    "mmpretrain byol": partial(_mmpretrain, method="byol"),
    "mmpretrain moco": partial(_mmpretrain, method="moco"),
    "mmselfsup 0.x moco": _mmselfsup0_moco,
    "byol-pytorch lightning": _byol_pytorch,
    "sthalles simclr": _sthalles,
    "moco v2": _moco_v2,
    # swav main_swav.py saves the DDP state: module.* with module.projection_head.* and module.prototypes.weight
    "swav": lambda m: {
        **prefixed("module.", {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}),
        "module.projection_head.0.weight": torch.randn(8, 512),
        "module.prototypes.weight": torch.randn(16, 8),
    },
    # mmselfsup tools/model_converters/extract_backbone_weights.py: {'state_dict': backbone keys}
    "mmselfsup extracted": lambda m: {"state_dict": {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}},
    # a single entry of another name holding the tensors
    "single unknown key": lambda m: {"resnet18_parameters": m.state_dict(), "epoch": 4},
}


@pytest.mark.parametrize("layout", list(CNN_LAYOUTS))
def test_cnn_layout_gives_reference_features(layout, r18, tmp_path):
    model, expected = r18
    path = tmp_path / "ckpt.pth"
    torch.save(CNN_LAYOUTS[layout](model), path)
    out, report = features("resnet18", path, 32)
    torch.testing.assert_close(out["pool"], expected, rtol=1e-5, atol=1e-5)
    assert "missing 0, unexpected 0" in report


# ---------------------------------------------------------------- ViT layouts (ViT-S/16, 32 px: a 2x2 grid)


def _vit_s(**kw) -> nn.Module:
    torch.manual_seed(11)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, **kw).eval()
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def vit_s():
    """DINO's / iBOT's / MSN's ViT-S/16 (embed 384, 6 heads, qkv_bias, LayerNorm eps 1e-6) = timm's, at 32 px."""
    model = _vit_s()
    return model, _vit_features(model, IMAGES[32])


def _vit_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        tokens = model.forward_features(x)
    n = model.num_prefix_tokens
    return {"cls": tokens[:, 0], "avgpool": tokens[:, n:].mean(1)} if n else {"avgpool": tokens.mean(1)}


def _assert_views(out: dict, ref: dict) -> None:
    for view, value in ref.items():
        torch.testing.assert_close(out[view], value, rtol=1e-4, atol=1e-4)


def _dino_args(arch="vit_small", patch_size=16) -> argparse.Namespace:
    return argparse.Namespace(arch=arch, patch_size=patch_size, out_dim=65536, lr=0.0005, epochs=100)


@pytest.mark.slow
def test_dino_full_checkpoint_takes_teacher_without_trust(vit_s, tmp_path):
    """dino main_dino.py save_dict = {'student': DDP state (module.backbone.*, module.head.*), 'teacher'
    (backbone.*, head.*), 'optimizer', 'epoch', 'args': Namespace, 'dino_loss'}; eval_linear.py takes 'teacher'."""
    model, ref = vit_s
    sd = model.state_dict()
    head = {"head.mlp.0.weight": torch.randn(16, 384), "head.last_layer.weight_g": torch.ones(8, 1)}
    ckpt = {
        "student": prefixed("module.", {**prefixed("backbone.", perturbed(sd, 8)), **head}),
        "teacher": {**prefixed("backbone.", sd), **head},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": _dino_args(),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    out, report = features("dinov1", tmp_path / "checkpoint.pth", 32)
    _assert_views(out, ref)
    assert "took 'teacher'" in report and "dropped head/projection 2" in report
    # the args say DINO vit_small (6 heads): MoCo v3's 12-head ViT-S is refused
    with pytest.raises(
        FeatstoreError, match=r"trained as DINO/iBOT vit_small \(6 heads.*but mocov3-vits \[timm:vit_small_patch16_224\] has 12 heads"
    ):
        features("mocov3-vits", tmp_path / "checkpoint.pth", 32)
    # a file holding the student alone loads it, and says so (the evaluated copy is the teacher)
    torch.save({k: v for k, v in ckpt.items() if k != "teacher"}, tmp_path / "student.pth")
    _, report = features("dinov1", tmp_path / "student.pth", 32)
    assert "took 'student' (the file has no 'teacher'" in report


def test_ibot_checkpoint_takes_teacher_and_drops_masked_embed(vit_s, tmp_path):
    """ibot main_ibot.py save_dict = {'student', 'teacher', 'optimizer', 'epoch', 'args', 'ibot_loss'};
    models/vision_transformer.py holds masked_embed; the iBOTHead is 'head'."""
    model, ref = vit_s
    sd = {**model.state_dict(), "masked_embed": torch.zeros(1, 384)}
    head = {"head.mlp.0.weight": torch.randn(16, 384), "head.last_layer2.weight_g": torch.ones(8, 1)}
    ckpt = {
        "student": prefixed("module.backbone.", perturbed(sd, 9)),
        "teacher": {**prefixed("backbone.", sd), **head},
        "epoch": 800,
        "args": _dino_args(),
        "ibot_loss": {"center": torch.zeros(1, 16)},
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    out, report = features("ibot-s", tmp_path / "checkpoint.pth", 32)
    _assert_views(out, ref)
    assert "took 'teacher'" in report and "dropped head/projection 3" in report


def test_msn_takes_target_encoder(vit_s, tmp_path):
    """msn src/msn_train.py save_dict = {'encoder', 'opt', 'prototypes', 'target_encoder', 'epoch', …},
    both DDP states (module.*) of src/deit.py with fc = the projection MLP; logistic_eval.py loads
    checkpoint['target_encoder']."""
    model, ref = vit_s
    sd = model.state_dict()
    fc = {"fc.fc1.weight": torch.randn(16, 384), "fc.bn1.weight": torch.ones(16), "fc.fc3.weight": torch.randn(8, 16)}
    ckpt = {
        "encoder": prefixed("module.", {**perturbed(sd, 10), **fc}),
        "opt": {"state": {}, "param_groups": []},
        "prototypes": torch.randn(32, 8),
        "target_encoder": prefixed("module.", {**sd, **fc}),
        "epoch": 800,
        "loss": 1.0,
        "batch_size": 32,
        "world_size": 8,
        "lr": 0.001,
        "temperature": 0.1,
    }
    torch.save(ckpt, tmp_path / "vits16_800ep.pth.tar")
    out, report = features("msn-s", tmp_path / "vits16_800ep.pth.tar", 32)
    _assert_views(out, ref)
    assert "took 'target_encoder' (MSN and I-JEPA evaluate the target encoder)" in report


@pytest.mark.slow
def test_ijepa_takes_target_encoder_no_cls(tmp_path):
    """ijepa src/train.py save_dict = {'encoder', 'predictor', 'target_encoder', 'opt', 'scaler', …};
    src/models/vision_transformer.py has no CLS token; the paper evaluates the average-pooled target encoder.
    A ViT-S of that layout stands in for the ViT-H/14 preset (same key names)."""
    from featstore.models.checkpoints import load_weights

    model = _vit_s(class_token=False, global_pool="avg", fc_norm=False)
    sd = model.state_dict()
    ckpt = {
        "encoder": prefixed("module.", perturbed(sd, 12)),
        "predictor": {"module.predictor_embed.weight": torch.randn(8, 384)},
        "target_encoder": prefixed("module.", sd),
        "opt": {},
        "scaler": None,
        "epoch": 300,
        "loss": 0.1,
        "batch_size": 16,
        "world_size": 8,
        "lr": 0.001,
    }
    path = tmp_path / "ijepa.pth.tar"
    torch.save(ckpt, path)
    target = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, class_token=False, global_pool="avg", fc_norm=False
    )
    report = load_weights(target, path, arch="timm:vit_small_patch16_224")
    _assert_views(_vit_features(target.eval(), IMAGES[32]), _vit_features(model, IMAGES[32]))
    assert "target_encoder" in report.taken


def _mocov3_vit_small() -> nn.Module:
    """moco-v3 vits.py vit_small: VisionTransformerMoCo(patch_size=16, embed_dim=384, depth=12, num_heads=12,
    mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)), a timm VisionTransformer."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(13)
    return VisionTransformer(
        img_size=32,
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=12,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
    ).eval()


@pytest.mark.slow
def test_mocov3_vits_has_12_heads_and_wrong_heads_are_refused(tmp_path):
    """moco-v3 main_moco.py save_checkpoint({'epoch', 'arch', 'state_dict': DDP(MoCo_ViT) with
    module.base_encoder (head = projection MLP), module.momentum_encoder, module.predictor, 'optimizer', 'scaler'})."""
    model = _mocov3_vit_small()
    sd = model.state_dict()
    head = {"head.0.weight": torch.randn(16, 384), "head.1.weight": torch.ones(16), "head.3.weight": torch.randn(8, 16)}
    ckpt = {
        "epoch": 300,
        "arch": "vit_small",
        "state_dict": {
            **prefixed("module.base_encoder.", {**sd, **head}),
            **prefixed("module.momentum_encoder.", {**perturbed(sd, 14), **head}),
            "module.predictor.0.weight": torch.randn(16, 8),
        },
        "optimizer": {"state": {}, "param_groups": []},
        "scaler": {"scale": 65536.0},
    }
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save(ckpt, path)
    out, report = features("mocov3-vits", path, 32)
    _assert_views(out, _vit_features(model, IMAGES[32]))
    assert "query encoder 'base_encoder'" in report
    # timm's vit_small has 6 heads: the same tensor shapes, other features; the file's 'arch' says so
    with pytest.raises(FeatstoreError) as e:
        features("vit_small_patch16_224", path, 32)
    assert "trained as MoCo v3 vit_small (12 heads" in e.value.message and "has 6 heads" in e.value.message
    assert e.value.hint == "use --model mocov3-vits"
    # without 'arch' the base_encoder layout still says MoCo v3, whose ViTs have 12 heads
    del ckpt["arch"]
    torch.save(ckpt, path)
    with pytest.raises(FeatstoreError, match=r"trained as MoCo v3 vit_small \(12 heads.*has 6 heads"):
        features("dinov1", path, 32)


@pytest.mark.slow
def test_mae_checkpoint_drops_decoder_without_trust(vit_s, tmp_path):
    """mae main_pretrain.py misc.save_model: {'model': models_mae.py state (encoder keys as timm's, mask_token,
    decoder_*), 'optimizer', 'epoch', 'scaler', 'args'}; main_linprobe.py evaluates the normed CLS token.
    A ViT-S with MAE's key names stands in for ViT-B/L/H (the same names)."""
    model, ref = vit_s
    sd = {
        **model.state_dict(),
        "mask_token": torch.zeros(1, 1, 384),
        "decoder_embed.weight": torch.randn(8, 384),
        "decoder_pos_embed": torch.zeros(1, 5, 8),
        "decoder_blocks.0.norm1.weight": torch.ones(8),
        "decoder_norm.weight": torch.ones(8),
        "decoder_pred.weight": torch.randn(768, 8),
    }
    args = argparse.Namespace(mask_ratio=0.75, norm_pix_loss=True, input_size=224)
    torch.save({"model": sd, "optimizer": {}, "epoch": 799, "scaler": {"scale": 1.0}, "args": args}, tmp_path / "checkpoint-799.pth")
    out, report = features("vit_small_patch16_224", tmp_path / "checkpoint-799.pth", 32)
    _assert_views(out, ref)
    assert "missing 0, unexpected 0" in report
    # provenance: args.model names the MAE ViT it was trained as
    args.model = "mae_vit_base_patch16"
    torch.save({"model": {"decoder_norm.weight": torch.ones(8)}, "args": args}, tmp_path / "mae-base.pth")
    with pytest.raises(FeatstoreError, match=r"trained as MAE mae_vit_base_patch16 \(12 heads, dim 768") as e:
        features("dinov1", tmp_path / "mae-base.pth", 32)
    assert e.value.hint == "use --model mae-b"


# ---------------------------------------------------------------- DINOv2: DINOv2's own interpolation

# facebookresearch/dinov2 at commit b8931f7bf91576930313be2c6d6af376033b35f0, transcribed (the authors' files are
# Apache-2.0 but are not copied into this repository): hub/backbones.py _make_dinov2_model's defaults, and what
# each hub function passes on top of them to dinov2/models/vision_transformer.py DinoVisionTransformer.
HUB_DEFAULTS = dict(
    img_size=518,
    patch_size=14,
    init_values=1.0,
    ffn_layer="mlp",
    block_chunks=0,
    num_register_tokens=0,
    interpolate_antialias=False,
    interpolate_offset=0.1,
)
_HUB_REG = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
HUB_BACKBONES = {
    "dinov2_vits14": dict(arch_name="vit_small"),
    "dinov2_vitb14": dict(arch_name="vit_base"),
    "dinov2_vitl14": dict(arch_name="vit_large"),
    "dinov2_vitg14": dict(arch_name="vit_giant2", ffn_layer="swiglufused"),
    "dinov2_vits14_reg": dict(arch_name="vit_small", **_HUB_REG),
    "dinov2_vitb14_reg": dict(arch_name="vit_base", **_HUB_REG),
    "dinov2_vitl14_reg": dict(arch_name="vit_large", **_HUB_REG),
    "dinov2_vitg14_reg": dict(arch_name="vit_giant2", ffn_layer="swiglufused", **_HUB_REG),
}


def hub_kwargs(hub_name: str) -> dict:
    """The DinoVisionTransformer keyword arguments hub/backbones.py ``hub_name()`` builds with."""
    return {**HUB_DEFAULTS, **HUB_BACKBONES[hub_name]}


def hub_name_of(weights_file: str) -> str:
    """hub/utils.py _make_dinov2_model_name spells the file dinov2_vits14_reg4_pretrain.pth, the function dinov2_vits14_reg."""
    return weights_file.removesuffix("_pretrain.pth").replace("_reg4", "_reg")


class DinoVisionTransformerPositions:
    """dinov2/models/vision_transformer.py DinoVisionTransformer, the part that resamples: __init__ keeps
    interpolate_offset / interpolate_antialias / patch_size as given, interpolate_pos_encoding as written there."""

    def __init__(self, pos_embed: torch.Tensor, *, patch_size=16, interpolate_antialias=False, interpolate_offset=0.1, **_):
        self.pos_embed = pos_embed
        self.patch_size = patch_size
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

    def interpolate_pos_encoding(self, x, w, h):
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_size
        h0 = h // self.patch_size
        M = int(math.sqrt(N))  # Recover the number of patches in each dimension
        assert N == M * M
        kwargs = {}
        if self.interpolate_offset:
            sx = float(w0 + self.interpolate_offset) / M
            sy = float(h0 + self.interpolate_offset) / M
            kwargs["scale_factor"] = (sx, sy)
        else:
            kwargs["size"] = (w0, h0)
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def dinov2_interpolate_pos_encoding(pos_embed: torch.Tensor, w: int, h: int, hub_name: str = "dinov2_vits14") -> torch.Tensor:
    """The position embedding the authors' model built by ``hub_name()`` adds to a w x h input."""
    kw = hub_kwargs(hub_name)
    tokens = torch.zeros(1, 1 + (w // kw["patch_size"]) * (h // kw["patch_size"]), pos_embed.shape[-1])
    return DinoVisionTransformerPositions(pos_embed, **kw).interpolate_pos_encoding(tokens, w, h)


def dinov2_reference(sd: dict, blocks: nn.Module, x: torch.Tensor, hub_name: str = "dinov2_vits14") -> dict[str, torch.Tensor]:
    """DinoVisionTransformer.prepare_tokens_with_masks + forward_features on the original tensors
    (cls_token, pos_embed with the CLS position, register_tokens inserted after the position embedding),
    with transformer blocks and final norm holding the same tensors."""
    B, nc, w, h = x.shape
    t = nn.functional.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1)
    t = t + dinov2_interpolate_pos_encoding(sd["pos_embed"], w, h, hub_name)
    registers = sd.get("register_tokens")
    if registers is not None:
        t = torch.cat((t[:, :1], registers.expand(B, -1, -1), t[:, 1:]), dim=1)
    with torch.inference_mode():
        for blk in blocks.blocks:
            t = blk(t)
        t = blocks.norm(t)
    n_reg = 0 if registers is None else registers.shape[1]
    return {"cls": t[:, 0], "avgpool": t[:, 1 + n_reg :].mean(1)}


@functools.cache
def _dinov2_blocks() -> nn.Module:
    torch.manual_seed(16)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518).eval()


@functools.cache
def _dinov2_hub_state(reg: bool) -> tuple[dict, nn.Module]:
    """The tensors of dinov2 hub/backbones.py dinov2_vits14[_reg4] (img_size=518, block_chunks=0):
    cls_token, pos_embed (1, 1 + 37*37, D), register_tokens, mask_token, patch_embed, blocks.I (ls1/ls2), norm."""
    blocks = _dinov2_blocks()
    sd = dict(blocks.state_dict())
    g = torch.Generator().manual_seed(17)
    sd["pos_embed"] = torch.randn(sd["pos_embed"].shape, generator=g)  # a rough embedding: resampling differences show
    sd["cls_token"] = torch.randn(sd["cls_token"].shape, generator=g)
    sd["mask_token"] = torch.zeros(1, 384)
    if reg:
        sd["register_tokens"] = torch.randn(1, 4, 384, generator=g)
    return sd, blocks


@pytest.mark.slow
@pytest.mark.parametrize("reg", [False, True], ids=["hub", "reg4"])
def test_dinov2_at_224_gives_dinov2s_own_features(reg, tmp_path):
    sd, blocks = _dinov2_hub_state(reg)
    name = f"dinov2_vits14{'_reg4' if reg else ''}_pretrain.pth"
    torch.save(sd, tmp_path / name)
    out, report = features("dinov2_reg4" if reg else "dinov2", tmp_path / name, 224)
    hub = hub_name_of(name)  # the register model is built with offset 0 and antialiasing (issue 23)
    ref = dinov2_reference(sd, blocks, IMAGES[224], hub)
    _assert_views(out, ref)
    assert f"37x37 -> 16x16 as {'DINOv2-reg' if reg else 'DINO'}'s interpolate_pos_encoding" in report
    # the other DINOv2 rule (what the register presets used before issue 23) gives other features: this test
    # can fail. timm's resample_abs_pos_embed (bicubic to the size, antialiased) is the register models' rule
    # and differs from the plain models'.
    from timm.layers import resample_abs_pos_embed

    timm_pe = resample_abs_pos_embed(sd["pos_embed"], (16, 16), num_prefix_tokens=1)
    ours = dinov2_interpolate_pos_encoding(sd["pos_embed"], 224, 224, hub)
    other = dinov2_interpolate_pos_encoding(sd["pos_embed"], 224, 224, "dinov2_vits14" if reg else "dinov2_vits14_reg")
    assert (other - ours).abs().max() > 0.1
    assert ((timm_pe - ours).abs().max() < 1e-5) if reg else ((timm_pe - ours).abs().max() > 0.1)


class _Grid(nn.Module):
    """A ViT as far as the resampling sees it: a patch grid."""

    def __init__(self, grid):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.grid_size = grid


DINOV2_PRESETS = sorted(n for n, p in PRESETS.items() if p.arch.endswith("_dinov2"))


@pytest.mark.parametrize("name", DINOV2_PRESETS)
@pytest.mark.parametrize("size", [224, 98, 602])
def test_every_dinov2_preset_resamples_as_the_hub_model_it_names(name, size):
    """Each DINOv2 preset (and the timm name it builds) resamples its 37x37 embedding as the authors' model
    built by the hub/backbones.py function of its weights file: the *_reg models with offset 0 + antialias."""
    preset = PRESETS[name]
    hub = hub_name_of(preset.weights_file)
    assert hub in HUB_BACKBONES
    g = torch.Generator().manual_seed(len(name))
    pe = torch.randn(1, 1 + 37 * 37, preset.dim, generator=g)
    grid = (size // 14, size // 14)
    expected = dinov2_interpolate_pos_encoding(pe, size, size, hub)
    for rule in (preset.pos_embed, pos_embed_rule(preset.arch, None)):
        sd, notes = resample_pos_embed({"pos_embed": pe}, _Grid(grid), rule)
        torch.testing.assert_close(sd["pos_embed"], expected, rtol=0, atol=1e-5)
        assert notes == [
            f"position embeddings 37x37 -> {grid[0]}x{grid[1]} as {'DINOv2-reg' if hub.endswith('_reg') else 'DINO'}'s interpolate_pos_encoding"
            + (" (offset 0, antialiased)" if hub.endswith("_reg") else "")
        ]


@pytest.mark.slow
def test_dinov2_training_checkpoint_block_chunks_teacher(tmp_path):
    """dinov2 dinov2/train/ssl_meta_arch.py: student / teacher = ModuleDict(backbone, dino_head, ibot_head);
    train.py saves the fvcore Checkpointer's {'model': model.state_dict(), 'optimizer', 'iteration'};
    models/vision_transformer.py with block_chunks=4 names blocks blocks.<chunk>.<global index>.*."""
    sd, blocks = _dinov2_hub_state(reg=False)
    chunked = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{i}." + k.split(".", 2)[2]
        chunked[k] = v
    heads = {"dino_head.mlp.0.weight": torch.randn(16, 384), "ibot_head.mlp.0.weight": torch.randn(16, 384)}
    model = {
        **prefixed("student.backbone.", perturbed(chunked, 17)),
        **prefixed("student.", heads),
        **prefixed("teacher.backbone.", chunked),
        **prefixed("teacher.", heads),
    }
    torch.save({"model": model, "optimizer": {"state": {}}, "iteration": 12500}, tmp_path / "model_0012499.rank_0.pth")
    out, report = features("dino", tmp_path / "model_0012499.rank_0.pth", 56)
    _assert_views(out, dinov2_reference(sd, blocks, IMAGES[56]))
    assert "took 'teacher'" in report and "block chunks" in report and "dropped head/projection 2" in report
    # train.py do_test saves the teacher alone: {'teacher': teacher.state_dict()}
    torch.save({"teacher": {**prefixed("backbone.", chunked), **heads}}, tmp_path / "teacher_checkpoint.pth")
    out, _ = features("dino", tmp_path / "teacher_checkpoint.pth", 56)
    _assert_views(out, dinov2_reference(sd, blocks, IMAGES[56]))


def test_reg4_file_for_the_plain_model_names_the_register_tokens(tmp_path):
    sd, _ = _dinov2_hub_state(reg=True)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    with pytest.raises(FeatstoreError) as e:
        features("dino", tmp_path / "dinov2_vits14_reg4_pretrain.pth", 56)
    assert "register_tokens" in e.value.message and "lack" not in e.value.message and "_reg4" in e.value.hint


def test_register_stores_have_their_own_cache_key():
    """Stores of the register presets extracted with the plain models' resampling (before issue 23) hold
    other features: the cache fields name the rule, so they are not reused; the plain presets' keys stay."""
    from featstore.job import cache_fields
    from featstore.manifest import Manifest, SplitManifest

    manifest = Manifest("m", Path("/m"), ("a",), {"all": SplitManifest("all", ("a/1.jpg",), np.zeros(1, np.int32))})
    cpu = torch.device("cpu")
    reg = cache_fields(resolve_encoder("dino-reg4", random_init=True), "torch", None, "float16", manifest, cpu)
    plain = cache_fields(resolve_encoder("dino", random_init=True), "torch", None, "float16", manifest, cpu)
    timm_reg = cache_fields(resolve_encoder("vit_small_patch14_reg4_dinov2", random_init=True), "torch", None, "float16", manifest, cpu)
    assert reg["pos_embed"] == timm_reg["pos_embed"] == "dinov2-reg" and "pos_embed" not in plain


def test_a_checkpoint_of_another_patch_size_is_refused(tmp_path):
    """DINO's ViT-S/8 file (a plain state dict, no args to check) given to a ViT-S/16 preset: timm's
    checkpoint filter resampled the 8×8 patch kernel to 16×16 and the 28×28 position grid followed,
    so another network loaded with "missing 0, unexpected 0". Refused, as the authors' loaders do."""
    small8 = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(small8.state_dict(), path)
    target = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    with pytest.raises(FeatstoreError, match="the file's patches are 8×8 pixels, the model's 16×16"):
        load_weights(target, path, arch="timm:vit_small_patch16_224", pos_embed="dino", model_name="dinov1")


def test_layer_scale_of_a_checkpoint_is_never_dropped_as_a_head(tmp_path):
    """A ViT with layer-scale (DINOv2's blocks: ls1, ls2) into one without: timm holds those as
    nn.Identity, and every key under an Identity was dropped as "head/projection". They are the
    backbone's: unexpected, refused. A head removed as an Identity is still dropped."""
    scaled = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, init_values=1.0, img_size=32)
    path = tmp_path / "scaled.pth"
    torch.save(scaled.state_dict(), path)
    plain = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32)
    with pytest.raises(FeatstoreError, match=r"24 tensors have no place in it, e\.g\. blocks\.0\.ls1\.gamma"):
        load_weights(plain, path, arch="timm:vit_small_patch16_224")
    headed = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=32)
    torch.save(headed.state_dict(), path)
    report = load_weights(plain, path, arch="timm:vit_small_patch16_224")
    assert sorted(report.dropped) == ["head.bias", "head.weight"] and not report.missing
