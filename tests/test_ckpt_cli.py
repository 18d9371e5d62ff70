"""Checkpoints and presets through the command line: wrong files are one clean `error:` line each,
removed heads and --ignore-keys are reported, presets and aliases are listed and built as documented."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

import pytest
import timm
import torch
import torchvision
from torch import nn

from featstore.cli import cli
from featstore.console import run_cli
from featstore.models.encoders import PATCH_VIEWS, build_encoder, resolve_encoder
from featstore.models.presets import ALIASES, PRESETS

FAST = ["--image-size", "32", "--resize", "32", "--loader", "torch", "--workers", "0", "--no-progress", "--dtype", "float32"]


def run(capsys, *args) -> tuple[int, str, str]:
    code = run_cli(cli, "featstore", [str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def extract_with(capsys, small_folder, tmp_path, model, weights, *extra):
    out = tmp_path / "out.zarr"
    result = run(capsys, "extract", "--model", model, "--weights", weights, "--dataset", small_folder, "--out", out, *FAST, *extra)
    return (*result, out)


def _resnet18_sd() -> dict:
    torch.manual_seed(3)
    return torchvision.models.resnet18(weights=None).state_dict()


# ---------------------------------------------------------------- adversarial files: one line each


def test_missing_backbone_tensor(capsys, small_folder, tmp_path):
    sd = _resnet18_sd()
    del sd["layer3.0.conv1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    code, _, err, out = extract_with(capsys, small_folder, tmp_path, "resnet18", tmp_path / "partial.pth")
    assert code == 1 and not out.exists()
    assert_one_line_error(err, "lack 1 backbone parameters", "layer3.0.conv1.weight")


def test_extra_block(capsys, small_folder, tmp_path):
    torch.manual_seed(4)
    sd = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32).state_dict()
    sd.update({k.replace("blocks.11.", "blocks.12."): v for k, v in sd.items() if k.startswith("blocks.11.")})
    torch.save({"teacher": sd}, tmp_path / "deeper.pth")
    code, _, err, out = extract_with(capsys, small_folder, tmp_path, "dinov1", tmp_path / "deeper.pth")
    assert code == 1 and not out.exists()
    assert_one_line_error(err, "tensors have no place in it", "blocks.12.")


def test_resnet18_file_for_resnet50(capsys, small_folder, tmp_path):
    torch.save({"state_dict": _resnet18_sd()}, tmp_path / "r18.pth")
    code, _, err, out = extract_with(capsys, small_folder, tmp_path, "resnet50", tmp_path / "r18.pth")
    assert code == 1 and not out.exists()
    assert_one_line_error(err, "shape mismatch", "the file is a ResNet-18, the model a ResNet-50")


def test_cifar_stem_resnet_for_imagenet_resnet(capsys, small_folder, tmp_path):
    """solo-learn solo/methods/base.py for CIFAR: conv1 = Conv2d(3, 64, kernel_size=3, stride=1, padding=2), maxpool = Identity."""
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    model.maxpool = nn.Identity()
    torch.save({"state_dict": {"backbone." + k: v for k, v in model.state_dict().items()}}, tmp_path / "cifar.ckpt")
    code, _, err, out = extract_with(capsys, small_folder, tmp_path, "resnet18", tmp_path / "cifar.ckpt")
    assert code == 1 and not out.exists()
    assert_one_line_error(err, "conv1 is 3x3, the model's 7x7", "CIFAR-stem")


def test_checkpoint_pickling_a_missing_module_loads_with_placeholders(capsys, small_folder, tmp_path, monkeypatch):
    """mmengine checkpoints pickle mmengine objects (message_hub: HistoryBuffer). Without the module the
    tensors still load, with and without --trust-checkpoint: the object is an inert placeholder, named
    in the report (before issue 23: "needs arbitrary code", and with the flag "module not installed")."""
    (tmp_path / "fake_mmengine_logging.py").write_text("class HistoryBuffer:\n    def __init__(self):\n        self.data = [1, 2]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_mmengine_logging

    path = tmp_path / "epoch_200.pth"
    torch.save({"meta": {}, "state_dict": _resnet18_sd(), "message_hub": fake_mmengine_logging.HistoryBuffer()}, path)
    monkeypatch.delitem(sys.modules, "fake_mmengine_logging")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    for extra in ([], ["--trust-checkpoint", "--overwrite"]):
        code, _, err, out = extract_with(capsys, small_folder, tmp_path, "resnet18", path, *extra)
        assert code == 0 and out.exists(), err
        assert "missing 0, unexpected 0" in err
        assert "inert placeholders (no code run) for 1 pickled classes: fake_mmengine_logging.HistoryBuffer" in err


def test_training_args_load_without_trust(capsys, small_folder, tmp_path):
    """argparse.Namespace (DINO/MAE/iBOT 'args') and numpy scalars are data: no --trust-checkpoint needed."""
    import numpy as np

    args = argparse.Namespace(arch="resnet18", lr=np.float64(0.03), crops=np.array([2, 6]))
    torch.save({"state_dict": _resnet18_sd(), "args": args, "best_acc1": np.float32(61.2)}, tmp_path / "ckpt.pth")
    code, _, err, out = extract_with(capsys, small_folder, tmp_path, "resnet18", tmp_path / "ckpt.pth")
    assert code == 0, err
    assert "loaded 120 tensors, missing 0, unexpected 0, dropped head/projection 2" in err


# ---------------------------------------------------------------- item 7: heads of other names


def test_identity_head_dropped_and_ignore_keys_reported(capsys, small_folder, tmp_path):
    (tmp_path / "net.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.linear = nn.Linear(8, 10)

            def forward(self, x):
                return self.linear(self.body(x))

        def build():
            net = Net()
            net.linear = nn.Identity()  # features, not logits
            return net
    """)
    )
    torch.manual_seed(5)
    supervised = nn.Module()
    supervised.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    supervised.linear = nn.Linear(8, 10)
    sd = {**supervised.state_dict(), "aux_logits.weight": torch.zeros(3, 8), "aux_logits.bias": torch.zeros(3)}
    torch.save({"net": sd}, tmp_path / "supervised.pth")
    model = f"{tmp_path / 'net.py'}:build"
    code, _, err, _ = extract_with(capsys, small_folder, tmp_path, model, tmp_path / "supervised.pth")
    assert_one_line_error(err, "2 tensors have no place in it", "aux_logits", "--ignore-keys")
    code, _, err, out = extract_with(
        capsys, small_folder, tmp_path, model, tmp_path / "supervised.pth", "--ignore-keys", "aux_logits.*", "--ignore-keys", "nothing.*"
    )
    assert code == 0, err
    assert "loaded 2 tensors, missing 0, unexpected 0, dropped head/projection 2, ignored by --ignore-keys 2" in err
    assert "--ignore-keys matched nothing: nothing.*" in err
    from featstore.store import FeatureStore

    feats = FeatureStore.open(out).features("val", "features")
    assert feats.shape[1] == 8  # the body's features, the Identity head's input


# ---------------------------------------------------------------- presets and names


def test_aliases_resolve_to_their_preset():
    assert resolve_encoder("dinov2", random_init=True).name == "dino"
    spec = resolve_encoder("dinov2-b_reg4", random_init=True)
    assert spec.name == "dino-b-reg4" and spec.arch == "timm:vit_base_patch14_reg4_dinov2"
    assert resolve_encoder("dinov2-g", random_init=True).arch == "timm:vit_giant_patch14_dinov2"
    assert resolve_encoder("dinov1", random_init=True).arch == "timm:vit_small_patch16_224"
    # the authors' torch.hub names
    assert resolve_encoder("dinov2_vitb14", random_init=True).name == "dino-b"
    assert resolve_encoder("dinov2_vitl14_reg", random_init=True).arch == "timm:vit_large_patch14_reg4_dinov2"
    assert resolve_encoder("dino_vitb8", random_init=True).name == "dinov1-b8"
    for alias, target in ALIASES.items():
        assert target in PRESETS and alias not in PRESETS
        if "_reg4" in alias:  # timm has the register variant this alias names
            assert timm.is_model(PRESETS[target].arch[5:])


def test_torchvision_presets_preprocess_as_their_weights_file_says():
    """A torchvision preset's file is one of torchvision's weights enums: its evaluation transform
    (resize, crop, interpolation, mean, std) is the preset's. resnet50-11ad3fa6.pth is IMAGENET1K_V2,
    evaluated at Resize(232), where the preset said 256."""
    from torchvision.models import get_model_weights

    for preset in (p for p in PRESETS.values() if p.arch.startswith("tv:") and p.weights_url.startswith("https://download.pytorch.org")):
        (weights,) = [w for w in get_model_weights(preset.arch[3:]) if w.url == preset.weights_url]
        t = weights.transforms()
        pre = preset.preprocess
        assert (pre.image_size, pre.resize) == (t.crop_size[0], t.resize_size[0]), (preset.name, weights)
        assert pre.interpolation == t.interpolation.value and list(pre.mean) == list(t.mean) and list(pre.std) == list(t.std)


def test_suggestions_listed_once(capsys, tmp_path):
    code, _, err = run(capsys, "extract", "--model", "resnet19", "--random-init", "--out", tmp_path / "o.zarr")
    assert code == 2
    hint = err[err.index("(did you mean") :]
    assert hint.count("resnet18") == 1, err


def test_missing_preset_weights_name_the_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATSTORE_WEIGHTS", str(tmp_path))
    code, _, err = run(capsys, "extract", "--model", "mocov3-vits", "--out", tmp_path / "o.zarr")
    assert code == 1
    assert_one_line_error(err, "no weights for 'mocov3-vits'", "vit-s-300ep.pth.tar", str(tmp_path))


def test_models_command_lists_every_preset(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name, preset in PRESETS.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert preset.weights_file in line and preset.arch in line
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["mocov3-vits"]["views"] == {"cls": 384, "avgpool": 384, "cls4": 1536}
    assert rows["ijepa-h14"]["views"] == {"avgpool": 1280}
    assert "dinov2" in rows["dino"]["aliases"] and rows["msn-s"]["source"].startswith("facebookresearch/msn")
    assert all(r["weights_url"].startswith("https://") and r["source"] for r in rows.values())


@pytest.mark.slow
def test_presets_build_the_listed_architecture_and_views():
    """Every distinct preset architecture, built on the meta device (no memory, any size): the views and
    dims `featstore models` lists; MoCo v3 ViT-S has 12 heads, DINO's 6."""
    seen = set()
    for name, preset in PRESETS.items():
        key = (preset.arch, json.dumps(preset.timm_kwargs, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        spec = resolve_encoder(name, random_init=True)
        with torch.device("meta"):
            encoder = build_encoder(spec)
            out = encoder(torch.zeros(1, 3, spec.preprocess.image_size, spec.preprocess.image_size))
        # the global views `featstore models` lists; patch-token views (#24) are stored only when asked for
        assert {k: v.shape[1] for k, v in out.items() if k not in PATCH_VIEWS} == preset.views(), name
        assert all(out[k].ndim == 4 for k in PATCH_VIEWS if k in out), name
        if name == "mocov3-vits":
            assert encoder.backbone.blocks[0].attn.num_heads == 12
        if name == "dinov1":
            assert encoder.backbone.blocks[0].attn.num_heads == 6


def test_model_with_buffers_outside_its_state_dict_loads_equal(tmp_path):
    """Weights about to load skip the random init (meta build), except where non-persistent buffers
    (EVA-02's rotary tables) need it: those models are built normally and give the source's features."""
    torch.manual_seed(6)
    source = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, img_size=56).eval()
    torch.save(source.state_dict(), tmp_path / "eva.pth")
    spec = resolve_encoder("eva02_tiny_patch14_224", weights=tmp_path / "eva.pth", preprocess_overrides=dict(image_size=56, resize=56))
    encoder = build_encoder(spec)
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x)["cls"], source.forward_features(x)[:, 0], rtol=1e-5, atol=1e-5)
