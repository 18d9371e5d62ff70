"""Hugging Face transformers folders (--weights DIR, --model hf:ORG/NAME): featstore's stored features
equal transformers' own forward on the same preprocessed pixels, for every layout, at the
checkpoint's native size and at another one (position embeddings resampled by transformers'
interpolate_pos_encoding), with registers; malformed folders are one-line errors.

The models are random-init transformers models built from the official config classes at small
sizes and written by save_pretrained (hub-style key names), never downloaded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from featstore.errors import FeatstoreError  # noqa: E402
from featstore.extraction import ExtractConfig, extract  # noqa: E402
from featstore.loaders.dataloader import build_transform  # noqa: E402
from featstore.loaders.decode import open_rgb  # noqa: E402
from featstore.preprocess import Preprocess  # noqa: E402
from featstore.store import FeatureStore  # noqa: E402

T = transformers
SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
F16_LEVEL = 1e-3  # relative difference of a row: float16 storage rounds to ~5e-4


def _save(model, folder: Path, processor=None) -> Path:
    torch.manual_seed(0)
    with torch.no_grad():  # random init gives tiny position embeddings: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def _dinov2(**kw):
    return T.Dinov2Model(T.Dinov2Config(**SMALL, image_size=56, patch_size=14, layerscale_value=0.5, **kw))


# layout -> (model to save, a processor to save or None, native crop, another crop)
LAYOUTS = {
    # no processor saved: DINOv2's evaluation crop, 224 (its config's image_size is its pretraining's)
    "Dinov2Model": (lambda: _dinov2(), None, 224, 42),  # converted to timm: fewer patches, resampled without antialias
    "Dinov2Model-swiglu": (lambda: _dinov2(use_swiglu_ffn=True), None, 224, 70),  # ViT-g's MLP: run by transformers
    "Dinov2WithRegistersModel": (
        lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**SMALL, image_size=56, patch_size=14, num_register_tokens=4)),
        lambda: T.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=3),
        56,
        42,  # fewer patches: transformers resamples with antialias here
    ),
    "ViTModel": (lambda: T.ViTModel(T.ViTConfig(**SMALL, image_size=64, patch_size=16, layer_norm_eps=1e-6)), None, 64, 48),
    "ViTMAEForPreTraining": (
        lambda: T.ViTMAEForPreTraining(
            T.ViTMAEConfig(
                **SMALL, image_size=64, patch_size=16, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_intermediate_size=32
            )
        ),
        None,
        64,
        80,
    ),
    "IJepaModel": (lambda: T.IJepaModel(T.IJepaConfig(**SMALL, image_size=56, patch_size=14)), None, 56, 70),
    "CLIPModel": (
        lambda: T.CLIPModel(
            T.CLIPConfig(vision_config=dict(**SMALL, image_size=64, patch_size=16), text_config=dict(**SMALL), projection_dim=24)
        ),
        lambda: T.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        64,
        48,
    ),
    "CLIPVisionModel": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, image_size=64, patch_size=16)), None, 64, 80),
    "SiglipModel": (
        lambda: T.SiglipModel(T.SiglipConfig(vision_config=dict(**SMALL, image_size=64, patch_size=16), text_config=dict(**SMALL))),
        lambda: T.SiglipImageProcessor(size={"height": 64, "width": 64}),
        64,
        48,
    ),
    "SiglipVisionModel": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL, image_size=64, patch_size=16)), None, 64, 80),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (make, processor, _, _) in LAYOUTS.items():
        out[name] = _save(make(), root / name, processor() if processor else None)
    return out


def reference_views(name: str, folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The views as transformers' own models give them (loaded by from_pretrained, run on ``x``)."""
    with torch.inference_mode():
        if name.startswith("Dinov2"):
            model = (T.Dinov2WithRegistersModel if "Registers" in name else T.Dinov2Model).from_pretrained(folder).eval()
            out = model(pixel_values=x, output_hidden_states=True)
            prefix = 1 + model.config.num_register_tokens if "Registers" in name else 1
            seq = out.last_hidden_state
            cls4 = torch.cat([model.layernorm(h)[:, 0] for h in out.hidden_states[-4:]], dim=-1)
            return {"cls": out.pooler_output, "avgpool": seq[:, prefix:].mean(1), "cls4": cls4}
        if name == "ViTModel":
            model = T.ViTModel.from_pretrained(folder).eval()
            out = model(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True)
            seq = out.last_hidden_state
            cls4 = torch.cat([model.layernorm(h)[:, 0] for h in out.hidden_states[-4:]], dim=-1)
            return {"cls": seq[:, 0], "avgpool": seq[:, 1:].mean(1), "cls4": cls4}
        if name == "ViTMAEForPreTraining":
            # the pretraining model's own encoder, masking off, patches in MAE's random order (CLS and the mean do not depend on it)
            model = T.ViTMAEForPreTraining.from_pretrained(folder, mask_ratio=0.0).eval()
            out = model.vit(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True)
            seq = out.last_hidden_state
            cls4 = torch.cat([model.vit.layernorm(h)[:, 0] for h in out.hidden_states[-4:]], dim=-1)
            return {"cls": seq[:, 0], "avgpool": seq[:, 1:].mean(1), "cls4": cls4}
        if name == "IJepaModel":
            out = T.IJepaModel.from_pretrained(folder).eval()(pixel_values=x, interpolate_pos_encoding=True)
            return {"avgpool": out.last_hidden_state.mean(1)}
        if name.startswith("CLIP"):
            full = name == "CLIPModel"
            model = (T.CLIPModel if full else T.CLIPVisionModel).from_pretrained(folder).eval()
            vision = getattr(model, "vision_model", model)  # transformers 5's CLIPVisionModel is the tower itself
            out = vision(pixel_values=x, interpolate_pos_encoding=True)
            views = {"cls": out.pooler_output, "avgpool": vision.post_layernorm(out.last_hidden_state[:, 1:]).mean(1)}
            if full:
                views["proj"] = model.get_image_features(pixel_values=x, interpolate_pos_encoding=True).pooler_output
            return views
        full = name == "SiglipModel"
        model = (T.SiglipModel if full else T.SiglipVisionModel).from_pretrained(folder).eval()
        out = getattr(model, "vision_model", model)(pixel_values=x, interpolate_pos_encoding=True)
        pooled = model.get_image_features(pixel_values=x, interpolate_pos_encoding=True).pooler_output if full else out.pooler_output
        return {"pooled": pooled, "avgpool": out.last_hidden_state.mean(1)}


def pixels(store: FeatureStore, split: str, root: Path) -> torch.Tensor:
    """The store's images preprocessed as its provenance says (the torch loader's transform), normalized."""
    pre = Preprocess.from_dict(store.attrs["preprocessing"])
    transform = build_transform(pre)
    x = torch.stack([transform(open_rgb(str(root / p))) for p in store.paths(split)]).float() / 255
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    return (x - mean) / std


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest row-wise relative difference."""
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def run_extract(tmp_path: Path, data: Path, size: int | None = None, **kw) -> FeatureStore:
    sizes = dict(image_size=size, resize=size) if size else {}
    out = tmp_path / f"s{size}.zarr"
    extract(ExtractConfig(dataset=str(data), out=str(out), loader="torch", workers=0, batch_size=8, **sizes, **kw), progress=False)
    return FeatureStore.open(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_stored_features_equal_transformers_forward(name, folders, small_folder, tmp_path):
    _, _, native, other = LAYOUTS[name]
    for size in (None, other):  # the folder's own preprocessing (native crop), then another crop size
        store = run_extract(tmp_path, small_folder, size, model="m", weights=str(folders[name]))
        assert store.attrs["preprocessing"]["image_size"] == (size or native)
        ref = reference_views(name, folders[name], pixels(store, "val", small_folder))
        assert sorted(store.views) == sorted(ref), (store.views, list(ref))
        for view, want in ref.items():
            got = np.asarray(store.features("val", view), dtype=np.float32)
            assert got.dtype == np.float32 and got.shape == tuple(want.shape)
            assert relative(got, want.numpy()) < F16_LEVEL, (name, size, view, relative(got, want.numpy()))
            assert np.std(want.numpy(), axis=0).mean() > 1e-3  # the images give different features: the check can fail


@pytest.mark.slow
def test_registers_are_excluded_from_avgpool_and_recorded(folders, small_folder, tmp_path):
    folder = folders["Dinov2WithRegistersModel"]
    store = run_extract(tmp_path, small_folder, model="dinov2-reg", weights=str(folder))
    x = pixels(store, "val", small_folder)
    with torch.inference_mode():
        seq = T.Dinov2WithRegistersModel.from_pretrained(folder).eval()(pixel_values=x).last_hidden_state.numpy()
    got = np.asarray(store.features("val", "avgpool"), dtype=np.float32)
    assert relative(got, seq[:, 5:].mean(1)) < F16_LEVEL  # CLS + 4 registers left out
    assert relative(got, seq[:, 1:].mean(1)) > 10 * F16_LEVEL  # registers in would be another feature
    enc = store.attrs["encoder"]
    assert enc["arch"] == "hf:Dinov2WithRegistersModel" and enc["weights_path"] == str(folder)
    assert enc["details"]["layout"] == "Dinov2WithRegistersModel"
    assert enc["details"]["preprocessing_source"] == "preprocessor_config.json (BitImageProcessor)"
    assert store.attrs["preprocessing"]["resize"] == 64 and store.attrs["preprocessing"]["image_size"] == 56
    from featstore.home import file_sha256

    assert enc["weights_sha256"] == file_sha256(folder / "model.safetensors")


def test_load_report_names_layout_and_what_was_dropped(folders):
    from featstore.models.encoders import build_encoder, resolve_encoder

    expected = {
        "CLIPModel": ("CLIPVisionModelWithProjection", ["text tower (text_model.*", "text projection (text_projection.*", "logit_scale"]),
        "SiglipModel": ("SiglipVisionModel", ["text tower (text_model.*", "logit_bias"]),
        "ViTMAEForPreTraining": ("ViTMAEForPreTraining [converted to timm", ["decoder (decoder.*", "random masking off"]),
        "ViTModel": ("ViTModel [converted to timm", ["pooler (pooler.*, 2 tensors)"]),
        "IJepaModel": ("IJepaModel [converted to timm", ["dropped nothing"]),
        "Dinov2Model": ("converted to timm VisionTransformer", ["dropped mask token (embeddings.mask_token, 1 tensor)"]),
        "Dinov2Model-swiglu": ("Dinov2Model, loaded", ["by transformers", "dropped nothing"]),
    }
    for name, (layout, needles) in expected.items():
        logs: list[str] = []
        spec = resolve_encoder("m", weights=folders[name], preprocess_overrides={})
        build_encoder(spec, log=logs.append)
        assert len(logs) == 1 and layout in logs[0], logs
        for needle in needles:
            assert needle in logs[0], (needle, logs[0])


def test_model_safetensors_file_inside_a_folder_loads_the_folder(folders):
    """The issue's report: `--model dino --weights dinov2-small/model.safetensors` said "no parameter names match"."""
    from featstore.models.encoders import build_encoder, resolve_encoder

    spec = resolve_encoder("dino", weights=folders["Dinov2Model"] / "model.safetensors")
    assert spec.arch == "hf:Dinov2Model" and spec.weights_path == str(folders["Dinov2Model"])
    encoder = build_encoder(spec)
    size = spec.preprocess.image_size  # no processor saved: DINOv2's evaluation crop, 224
    with torch.inference_mode():
        out = encoder(torch.zeros(1, 3, size, size))
    # the global views; the timm twin also gives patch-token views (#24), stored only when asked for
    assert set(out) == {"cls", "avgpool", "cls4", "patch", "patch4"} and out["cls4"].shape == (1, 128)
    assert out["patch"].shape[:3] == (1, size // 14, size // 14) and out["patch4"].shape[-1] == 4 * out["patch"].shape[-1]


def test_preprocessor_config_is_read_and_overridable(folders):
    from featstore.models.encoders import resolve_encoder

    clip = resolve_encoder("m", weights=folders["CLIPModel"])
    assert clip.preprocess == Preprocess(64, 64, "bicubic", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    siglip = resolve_encoder("m", weights=folders["SiglipModel"], preprocess_overrides=dict(image_size=48, interpolation="bilinear"))
    assert (siglip.preprocess.image_size, siglip.preprocess.resize, siglip.preprocess.interpolation) == (48, 48, "bilinear")
    assert siglip.preprocess.mean == (0.5, 0.5, 0.5)
    assert any("stretching" in n for n in siglip.details["preprocessing_notes"])  # SigLIP resizes to 64x64: said, not hidden
    vit = resolve_encoder("m", weights=folders["ViTModel"])  # no preprocessor_config.json: the DINO evaluation's
    assert (vit.preprocess.image_size, vit.preprocess.resize) == (64, 73)
    assert vit.details["preprocessing_source"].startswith("no preprocessor_config.json")
    # DINOv2 as Dinov2Model.save_pretrained leaves it (config image_size 56 here, 518 on the hub): its evaluation's 224/256
    dinov2 = resolve_encoder("m", weights=folders["Dinov2Model"])
    assert (dinov2.preprocess.image_size, dinov2.preprocess.resize) == (224, 256)
    assert "resize 256 / crop 224" in dinov2.details["preprocessing_source"]


def test_preprocessor_rescale_and_normalize_flags(tmp_path):
    from featstore.models.hf_preprocess import read_preprocessor_config

    f = tmp_path / "preprocessor_config.json"
    f.write_text(json.dumps({"size": {"shortest_edge": 256}, "crop_size": 224, "do_center_crop": True, "resample": 2,
                             "do_rescale": False, "image_mean": [127.5, 127.5, 127.5], "image_std": [127.5, 127.5, 127.5]}))  # fmt: skip
    pre, _, notes = read_preprocessor_config(f)
    # the model sees (x - 127.5) / 127.5 of 0..255 pixels: (x/255 - 0.5) / 0.5 of featstore's
    assert (pre.image_size, pre.resize, pre.interpolation) == (224, 256, "bilinear")
    assert pre.mean == pytest.approx((0.5,) * 3) and pre.std == pytest.approx((0.5,) * 3) and notes
    f.write_text(json.dumps({"size": 224, "do_normalize": False, "resample": 1}))
    pre, _, notes = read_preprocessor_config(f)
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0) and pre.interpolation == "bicubic"
    assert any("LANCZOS" in n for n in notes)
    # an integer size: a square to ViT's processors (stretching: said), the shorter side to CLIP's
    f.write_text(json.dumps({"feature_extractor_type": "ViTFeatureExtractor", "size": 64}))
    assert any("resizes to 64x64 (stretching" in n for n in read_preprocessor_config(f)[2])
    f.write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", "size": 64, "crop_size": 64}))
    assert not any("stretching" in n for n in read_preprocessor_config(f)[2])
    # one number for every channel, as transformers reads it; what it cannot read names the file
    f.write_text(json.dumps({"size": {"shortest_edge": 64}, "image_mean": 0.5, "image_std": 0.25}))
    pre = read_preprocessor_config(f)[0]
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.25, 0.25, 0.25)
    for bad, needle in (({"size": {"shortest_edge": "64px"}}, "size {'shortest_edge': '64px'}"),
                        ({"image_mean": [0.5, 0.5]}, "image_mean [0.5, 0.5] is not 3 numbers")):  # fmt: skip
        f.write_text(json.dumps(bad))
        with pytest.raises(FeatstoreError, match=re.escape(f"{f}: {needle}")):
            read_preprocessor_config(f)


# ---------------------------------------------------------------- malformed folders: one line each


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def _cli_error(capsys, *args) -> str:
    from featstore.cli import cli
    from featstore.console import run_cli

    code = run_cli(cli, "featstore", [str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_malformed_folders_are_one_line_errors(folders, tmp_path, capsys, small_folder):
    base = ["extract", "--model", "m", "--dataset", small_folder, "--out", tmp_path / "o.zarr", "--loader", "torch", "--no-progress"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in _cli_error(capsys, *base, "--weights", empty)
    bad = _copy(folders["CLIPVisionModel"], tmp_path)  # run by transformers: its loader's refusals
    (bad / "config.json").unlink()
    assert "has no config.json" in _cli_error(capsys, *base, "--weights", bad)

    (bad / "config.json").write_text("{not json")
    assert "not readable JSON" in _cli_error(capsys, *base, "--weights", bad)

    cfg = json.loads((folders["CLIPVisionModel"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"]}))
    line = _cli_error(capsys, *base, "--weights", bad)
    assert "'BertModel'" in line and "Dinov2Model" in line

    (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "model_type"}))
    assert "has no 'model_type'" in _cli_error(capsys, *base, "--weights", bad)

    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64, "intermediate_size": 128}))
    line = _cli_error(capsys, *base, "--weights", bad)
    assert "differ in shape" in line and "(32,) in the file vs (64,) from config.json" in line, line

    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    line = _cli_error(capsys, *base, "--weights", bad)
    assert "lack" in line and "layers.4" in line, line
    # fewer layers in config.json than in the weights: transformers leaves the rest as "unexpected";
    # the store was a truncated network ("dropped encoder (encoder.*, 16 tensors)"), now refused
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] - 1}))
    line = _cli_error(capsys, *base, "--weights", bad)
    last = cfg["num_hidden_layers"] - 1
    assert "tensors with no place in CLIPVisionModel, e.g. encoder.layers." in line and f"layers.{last}." in line, line

    dino = _copy(folders["Dinov2Model"], tmp_path / "dino")  # the timm twin's loader: the same refusals
    dcfg = json.loads((dino / "config.json").read_text())
    (dino / "config.json").write_text(json.dumps({**dcfg, "hidden_size": 64}))
    line = _cli_error(capsys, *base, "--weights", dino)
    assert "differ in shape" in line and "cls_token (1, 1, 32) in the file vs (1, 1, 64) from config.json" in line, line
    (dino / "config.json").write_text(json.dumps({**dcfg, "num_hidden_layers": 5}))
    assert "lack" in _cli_error(capsys, *base, "--weights", dino)
    (dino / "config.json").write_text(json.dumps({**dcfg, "num_hidden_layers": 3}))
    assert "no place in Dinov2Model, e.g. blocks.3." in _cli_error(capsys, *base, "--weights", dino)
    (dino / "config.json").write_text(json.dumps(dcfg))
    (dino / "model.safetensors").write_bytes(b"garbage")
    assert "not a readable safetensors file" in _cli_error(capsys, *base, "--weights", dino)

    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"garbage")
    assert "cannot load the weights" in _cli_error(capsys, *base, "--weights", bad)

    (bad / "model.safetensors").unlink()
    assert "no weights" in _cli_error(capsys, *base, "--weights", bad)
    # a transformers model.safetensors alone (no config.json beside it) under a preset: no --model fits it
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(folders["Dinov2Model"] / "model.safetensors", loose / "model.safetensors")
    line = _cli_error(capsys, *base[:2], "dinov2-s", *base[3:], "--weights", loose / "model.safetensors")
    assert "no parameter names match" in line and "a Hugging Face transformers state dict: pass its folder with config.json" in line, line
    assert not (tmp_path / "o.zarr").exists()  # nothing written


# ---------------------------------------------------------------- hf:ORG/NAME from a local hub cache


def _snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> Path:
    """A hub-cache snapshot as huggingface_hub lays it out: files are links into blobs/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in source.iterdir():
        blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hfhome" / "hub"
    cache.mkdir(parents=True)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))  # HF_HOME/hub, as huggingface_hub finds it
    return cache


OLD, NEW = "a" * 40, "b" * 40


@pytest.mark.slow
def test_hub_model_resolves_offline_by_refs_and_revision(folders, hub, small_folder, tmp_path):
    _snapshot(hub, "acme/tiny", OLD, folders["Dinov2Model"], refs=("v1",))
    _snapshot(hub, "acme/tiny", NEW, folders["Dinov2Model-swiglu"], refs=("main",))
    main = run_extract(tmp_path / "m", small_folder, model="hf:acme/tiny")
    v1 = run_extract(tmp_path / "v1", small_folder, model="hf:acme/tiny@v1")
    by_commit = run_extract(tmp_path / "c", small_folder, model="hf:acme/tiny@aaaaaaa")
    for store, name in ((main, "Dinov2Model-swiglu"), (v1, "Dinov2Model"), (by_commit, "Dinov2Model")):
        ref = reference_views(name, folders[name], pixels(store, "val", small_folder))
        assert relative(np.asarray(store.features("val", "cls"), dtype=np.float32), ref["cls"].numpy()) < F16_LEVEL
    enc = main.attrs["encoder"]
    assert enc["name"] == "hf:acme/tiny" and enc["weights_path"] is None
    assert enc["details"]["hub"]["commit"] == NEW and enc["details"]["hub"]["repo_id"] == "acme/tiny"
    assert v1.attrs["encoder"]["details"]["hub"]["commit"] == OLD
    assert enc["details"]["runtime"] == "transformers"  # SwiGLU: no timm twin
    assert v1.attrs["encoder"]["details"]["runtime"] == "timm VisionTransformer (converted)"


@pytest.mark.slow
def test_hub_model_rerun_sees_a_new_download(folders, hub, small_folder, tmp_path):
    """The torch-free up-to-date memo stamps refs/main: a newer download is a new store, not "up to date"."""
    _snapshot(hub, "acme/tiny", OLD, folders["Dinov2Model"], refs=("main",))
    config = ExtractConfig(model="hf:acme/tiny", dataset=str(small_folder), loader="torch", workers=0)
    first = extract(config, progress=False)
    assert extract(config, progress=False).status == "up to date"
    _snapshot(hub, "acme/tiny", NEW, folders["Dinov2Model-swiglu"], refs=("main",))
    second = extract(config, progress=False)
    assert second.status == "created" and second.store != first.store
    store = FeatureStore.open(second.store)
    assert store.attrs["encoder"]["details"]["hub"]["commit"] == NEW


def test_hub_cache_location_rules(tmp_path, monkeypatch):
    from featstore.models.hub_cache import hub_cache_dir

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub_cache_dir() == tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert hub_cache_dir() == tmp_path / "hubcache"


def test_hub_resolution_rules(hub, tmp_path):
    from featstore.errors import FeatstoreError
    from featstore.models.hub_cache import resolve_hub_model

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    _snapshot(hub, "acme/tiny", OLD, src, refs=("v1",))
    _snapshot(hub, "acme/tiny", NEW, src, refs=("main",))
    assert resolve_hub_model("hf:acme/tiny").commit == NEW
    assert resolve_hub_model("hf:acme/tiny@v1").commit == OLD
    assert resolve_hub_model(f"hf:acme/tiny@{OLD}").folder == hub / "models--acme--tiny" / "snapshots" / OLD
    (hub / "models--acme--tiny" / "refs" / "main").unlink()  # a cache copied by hand: the newest snapshot
    import os

    os.utime(hub / "models--acme--tiny" / "snapshots" / OLD, (2e9, 2e9))
    assert resolve_hub_model("hf:acme/tiny").commit == OLD
    with pytest.raises(FeatstoreError) as e:
        resolve_hub_model("hf:acme/absent")
    assert "not in the Hugging Face cache" in e.value.message and "hf download acme/absent" in str(e.value.hint)
    assert "huggingface-cli download acme/absent" in str(e.value.hint)
    with pytest.raises(FeatstoreError) as e:
        resolve_hub_model("hf:acme/tiny@v2")
    assert "'v2'" in e.value.message and "v1" in e.value.message and "--revision v2" in str(e.value.hint)


def test_hub_model_not_in_cache_is_one_line_error_naming_the_download(hub, capsys, small_folder, tmp_path):
    line = _cli_error(capsys, "extract", "--model", "hf:facebook/dinov2-small", "--dataset", small_folder, "--out", tmp_path / "o.zarr")
    assert "'facebook/dinov2-small' is not in the Hugging Face cache" in line and "hf download facebook/dinov2-small" in line
    line = _cli_error(capsys, "extract", "--model", "hf:facebook/dinov2-small@v9", "--dataset", small_folder)
    assert "--revision v9" in line
    line = _cli_error(capsys, "extract", "--model", "hf:not a name", "--dataset", small_folder)
    assert "not a hub model name" in line


def test_hub_snapshot_without_weights_names_the_download(hub, folders, capsys, small_folder, tmp_path):
    src = tmp_path / "partial"
    src.mkdir()
    shutil.copy(folders["Dinov2Model"] / "config.json", src / "config.json")  # an interrupted download: config only
    _snapshot(hub, "acme/partial", NEW, src, refs=("main",))
    line = _cli_error(capsys, "extract", "--model", "hf:acme/partial", "--dataset", small_folder, "--out", tmp_path / "o.zarr")
    assert "no weights" in line and "hf download acme/partial" in line


# ---------------------------------------------------------------- start-up stays light


@pytest.mark.slow
def test_transformers_is_imported_only_when_it_runs_a_folder(folders):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import featstore.cli\n"
        "from featstore.models.encoders import build_encoder, resolve_encoder\n"
        "build_encoder(resolve_encoder('resnet18', random_init=True))\n"
        "print('transformers' in sys.modules)\n"
        "build_encoder(resolve_encoder('m', weights=sys.argv[1]))  # converted to timm: no transformers either\n"
        "print('transformers' in sys.modules)\n"
        "build_encoder(resolve_encoder('m', weights=sys.argv[2]))  # run by transformers\n"
        "print('transformers' in sys.modules)\n"
    )
    args = [sys.executable, "-c", code, str(folders["Dinov2Model"]), str(folders["SiglipVisionModel"])]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr
