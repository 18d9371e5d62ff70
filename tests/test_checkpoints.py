"""Checkpoint layouts round-trip: features extracted with --weights equal the in-memory model's."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from featstore.errors import FeatstoreError
from featstore.extraction import ExtractConfig, extract
from featstore.loaders.dataloader import TorchLoader
from featstore.models.checkpoints import load_weights
from featstore.preprocess import Preprocess
from featstore.store import FeatureStore
from tests.helpers import read_checkpoint


def _trained_resnet18() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(123)  # not the seed --random-init uses: equal features prove the weights loaded
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so buffers must load too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _layouts(sd: dict) -> dict[str, object]:
    def prefixed(p):
        return {p + k: v for k, v in sd.items()}

    momentum = {k: torch.zeros_like(v) for k, v in sd.items()}
    return {
        "raw": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
        "teacher": {
            "teacher": {**prefixed("backbone."), "head.mlp.0.weight": torch.ones(4, 4)},
            "student": {**{"backbone." + k: torch.zeros_like(v) for k, v in sd.items()}},
        },
        "module.": prefixed("module."),
        "_orig_mod.": prefixed("_orig_mod."),
        "model.": prefixed("model."),
        "backbone.": {**prefixed("backbone."), "head.weight": torch.ones(2, 2)},
        "autoencoder": {**prefixed("encoder."), "decoder.0.weight": torch.ones(8, 4, 3, 3), "decoder.1.bias": torch.ones(3)},
        "moco_v2": {
            "state_dict": {
                **prefixed("module.encoder_q."),
                **{"module.encoder_k." + k: v for k, v in momentum.items()},
                "queue": torch.zeros(128, 8),
                "queue_ptr": torch.zeros(1),
            }
        },
        "moco_v3": {
            "state_dict": {
                **prefixed("module.base_encoder."),
                **{"module.momentum_encoder." + k: v for k, v in momentum.items()},
                "module.predictor.0.weight": torch.ones(3, 3),
            }
        },
    }


@pytest.fixture(scope="module")
def reference(small_folder):
    model = _trained_resnet18()
    sd = model.state_dict()
    pre = Preprocess(32, 32, "bilinear")
    files = sorted(str(p) for p in (small_folder / "val").rglob("*") if p.is_file())
    (batch,) = list(TorchLoader(pre, torch.device("cpu"), 0).batches(files, [np.arange(len(files))]))
    body = torch.nn.Sequential(*list(model.children())[:-1])  # everything but fc
    with torch.inference_mode():
        expected = body(batch.images).flatten(1).numpy()
    return sd, expected


def _extract(folder, weights, out, **kw):
    extract(
        ExtractConfig(
            model="resnet18",
            dataset=str(folder),
            out=str(out),
            weights=str(weights),
            loader="torch",
            workers=0,
            dtype="float32",
            image_size=32,
            resize=32,
            **kw,
        ),
        progress=False,
    )
    return FeatureStore.open(out).features("val", "pool")[:]


@pytest.mark.parametrize("layout", list(_layouts({"x": torch.zeros(1)})))
def test_layout_round_trip(layout, reference, small_folder, tmp_path):
    sd, expected = reference
    path = tmp_path / "ckpt.pth"
    torch.save(_layouts(sd)[layout], path)
    feats = _extract(small_folder, path, tmp_path / "out.zarr")
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    assert FeatureStore.open(tmp_path / "out.zarr").attrs["encoder"]["weights_sha256"] != "random-init"


def test_safetensors_round_trip(reference, small_folder, tmp_path):
    from safetensors.torch import save_file

    sd, expected = reference
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    np.testing.assert_allclose(_extract(small_folder, path, tmp_path / "out.zarr"), expected, rtol=1e-5, atol=1e-5)


def test_report_counts_and_dropped_heads():
    model = _trained_resnet18()
    sd = model.state_dict()
    import torchvision

    target = torchvision.models.resnet18(weights=None)
    target.fc = torch.nn.Identity()
    path = "/tmp/featstore-report-test.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    try:
        report = load_weights(target, path, arch="tv:resnet18")
    finally:
        os.unlink(path)
    assert report.dropped_heads == 2  # fc.weight, fc.bias
    assert report.loaded == len(sd) - 2 and report.missing == [] and report.unexpected == []
    assert "loaded 120 tensors" in report.summary()
    assert report.summary().endswith("dropped head/projection 2; dropped fc.* (2)")  # named, not just counted


def test_missing_backbone_keys_are_listed(tmp_path):
    import torchvision

    sd = torchvision.models.resnet18(weights=None).state_dict()
    del sd["layer4.1.conv2.weight"], sd["layer4.1.bn2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    target = torchvision.models.resnet18(weights=None)
    target.fc = torch.nn.Identity()
    with pytest.raises(FeatstoreError) as e:
        load_weights(target, path, arch="tv:resnet18")
    assert "lack 2 backbone parameters" in e.value.message and "layer4.1.conv2.weight" in e.value.message


def test_dinov2_original_checkpoint_is_resampled(tmp_path):
    """An original DINOv2 file (518 px position embeddings, mask_token) loads into the 224 px preset."""
    import timm

    from featstore.models.encoders import build_encoder, resolve_encoder

    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    sd = {k: v for k, v in src.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 384)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    spec = resolve_encoder("dino", weights=path, preprocess_overrides=dict(image_size=56, resize=64))
    logs = []
    enc = build_encoder(spec, log=logs.append)
    assert enc.backbone.pos_embed.shape == (1, 1 + 16, 384)
    torch.testing.assert_close(enc.backbone.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    assert "missing 0" in logs[0]


def test_an_unknown_position_embedding_rule_is_an_error_not_maes_rule():
    """A rule outside POS_EMBED_RULES once fell through to MAE's resampling; now it names the known rules."""
    import dataclasses

    from featstore.models.checkpoints import interpolate_patch_pos_embed, resample_pos_embed
    from featstore.models.presets import POS_EMBED_RULES, PRESETS

    patches = torch.randn(1, 8, 4, 4)
    for rule in ("dino", "dinov2-reg", "scale", "size"):
        assert interpolate_patch_pos_embed(patches, (2, 2), rule).shape == (1, 8, 2, 2)
    with pytest.raises(ValueError, match="unknown position-embedding rule 'mea'.*dino, dinov2-reg, scale, size"):
        interpolate_patch_pos_embed(patches, (2, 2), "mea")
    with pytest.raises(ValueError, match="unknown position-embedding rule 'dinov2'"):  # before any early return
        resample_pos_embed({}, torch.nn.Linear(1, 1), "dinov2")
    assert {p.pos_embed for p in PRESETS.values()} <= set(POS_EMBED_RULES)
    with pytest.raises(ValueError, match="unknown pos_embed rule 'mae'"):
        dataclasses.replace(next(iter(PRESETS.values())), pos_embed="mae")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/featstore-pwned",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = "/tmp/featstore-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    torch.save({"model": {"w": torch.zeros(1)}, "evil": _Evil()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(FeatstoreError) as e:
            read_checkpoint(p)
        assert "refused, nothing was run" in e.value.message or "not a PyTorch checkpoint" in e.value.message, e.value.message
    assert not os.path.exists(marker)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(os.urandom(1000))
    with pytest.raises(FeatstoreError, match="not a PyTorch checkpoint"):
        read_checkpoint(path)
