"""Checkpoints that pickle the training script's own objects load their tensors with inert placeholders,
running none of the pickled code; a malicious pickle runs nothing (issue 23 item 7).

The files are written as research code writes them: by a separate Python process whose ``__main__``
defines the config dataclass, enum, EasyDict-style dict and network (so this process cannot import
them), with an OmegaConf DictConfig (Hydra / Lightning ``hyper_parameters``) and argparse args beside.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from featstore.errors import FeatstoreError
from featstore.models.checkpoints import load_checkpoint, load_weights
from featstore.models.safe_unpickle import Placeholder

pytest.importorskip("omegaconf")

TRAINING_SCRIPT = textwrap.dedent(
    """
    import argparse, dataclasses, enum, sys
    from pathlib import Path

    import torch, torchvision
    from omegaconf import OmegaConf

    out = Path(sys.argv[1])

    @dataclasses.dataclass
    class TrainConfig:
        arch: str = "resnet18"
        lr: float = 0.03
        crops: tuple = (2, 6)

    class Mode(enum.Enum):
        PRETRAIN = 1
        FINETUNE = 2

    class AttrDict(dict):  # easydict.EasyDict / addict style
        def __getattr__(self, k):
            return self[k]

    class SlottedStats:
        __slots__ = ("epoch", "best")
        def __init__(self):
            self.epoch, self.best = 99, 61.2

    class Net(torch.nn.Module):  # the script's own wrapper around a torchvision backbone
        def __init__(self):
            super().__init__()
            self.backbone = torchvision.models.resnet18(weights=None)
            self.backbone.fc = torch.nn.Identity()
            self.head = torch.nn.Linear(512, 10)

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.backbone.bn1.running_mean.uniform_(-1, 1)
    cfg = OmegaConf.create({"model": {"arch": "resnet18", "dim": 512}, "optim": {"lr": 0.03}})
    extras = {
        "config": TrainConfig(),
        "mode": Mode.PRETRAIN,
        "hparams": AttrDict(lr=0.1, arch="resnet18"),
        "hyper_parameters": cfg,
        "args": argparse.Namespace(arch="resnet18", epochs=100),
        "stats": SlottedStats(),
    }
    torch.save({"state_dict": net.backbone.state_dict(), **extras}, out / "research.pth")
    torch.save({"state_dict": net.backbone.state_dict(), **extras}, out / "research_p4.pth", pickle_protocol=4)
    torch.save({"model": net.backbone.state_dict(), **extras}, out / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(net, out / "whole_model.pth")
    torch.save({"epoch": 3, "model": net}, out / "whole_model_in_dict.pth")
    torch.save(net.state_dict(), out / "net_state_dict.pth")  # the reference tensors, plain
    """
)


@pytest.fixture(scope="module")
def research_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("research")
    script = out / "train.py"
    script.write_text(TRAINING_SCRIPT)
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True, timeout=120)
    return out


def reference(research_files: Path, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    sd = torch.load(research_files / "net_state_dict.pth", weights_only=True)
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["research.pth", "research_p4.pth", "legacy.pth"])
def test_script_classes_load_as_placeholders_with_the_exact_tensors(research_files, name):
    ckpt = load_checkpoint(research_files / name)  # no --trust-checkpoint: nothing runs
    expected = reference(research_files)
    assert set(ckpt.tensors) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ckpt.tensors[k], v), k
    assert "__main__.TrainConfig" in ckpt.placeholders and "__main__.Mode" in ckpt.placeholders
    assert "__main__.AttrDict" in ckpt.placeholders and "__main__.SlottedStats" in ckpt.placeholders
    assert "omegaconf.dictconfig.DictConfig" in ckpt.placeholders
    assert not any(n.startswith(("torch.", "collections.")) for n in ckpt.placeholders), ckpt.placeholders


@pytest.mark.slow
def test_placeholders_keep_the_pickled_data_and_run_nothing(research_files):
    from featstore.models.safe_unpickle import inert_load

    obj, names = inert_load(research_files / "research.pth", [])
    config, mode, hparams, stats = obj["config"], obj["mode"], obj["hparams"], obj["stats"]
    assert isinstance(config, Placeholder) and type(config).pickled_as == "__main__.TrainConfig"
    assert (config.arch, config.lr, config.crops) == ("resnet18", 0.03, (2, 6))  # the dataclass's state, as data
    assert mode.placeholder_args == (1,)  # Mode(1), not called
    assert hparams.placeholder_items == {"lr": 0.1, "arch": "resnet18"}
    assert (stats.epoch, stats.best) == (99, 61.2)  # slot state
    assert isinstance(obj["hyper_parameters"], Placeholder)
    assert "argparse.Namespace" in names  # inert_load was given an empty allow-list: Namespace too is a placeholder
    assert repr(config) == "<inert placeholder for __main__.TrainConfig>"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["whole_model.pth", "whole_model_in_dict.pth"])
def test_a_pickled_module_of_the_scripts_class_gives_its_state_dict(research_files, name):
    """torch.save(model) of a class defined in __main__: the parameters and persistent buffers come out
    under their state_dict names, read from the placeholders, with no module code run."""
    import torchvision

    ckpt = load_checkpoint(research_files / name)
    expected = torch.load(research_files / "net_state_dict.pth", weights_only=True)
    # the wrapper prefix stripped as for any backbone/head checkpoint; the head is dropped at load below
    assert set(ckpt.tensors) == {k.removeprefix("backbone.") for k in expected}
    assert "__main__.Net" in ckpt.placeholders and "torchvision.models.resnet.ResNet" in ckpt.placeholders
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    report = load_weights(model, research_files / name, arch="tv:resnet18")
    assert "missing 0, unexpected 0" in report.summary() and "inert placeholders (no code run)" in report.summary()
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, expected["backbone." + k]), k


@pytest.mark.slow
def test_trust_falls_back_to_placeholders_when_the_classes_cannot_be_imported(research_files):
    """Before issue 23 --trust-checkpoint failed on a class of the training script's __main__."""
    ckpt = load_checkpoint(research_files / "research.pth", trust=True)
    assert set(ckpt.tensors) == set(reference(research_files)) and "__main__.TrainConfig" in ckpt.placeholders


@pytest.mark.slow
def test_the_load_report_names_the_placeholders(research_files):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()  # as featstore builds it
    report = load_weights(model, research_files / "research.pth", arch="tv:resnet18")
    text = report.summary()
    n = len(load_checkpoint(research_files / "research.pth").placeholders)
    assert f"inert placeholders (no code run) for {n} pickled classes: __main__.AttrDict, __main__.Mode" in text, text
    assert f"and {n - 4} more" in text


# ---------------------------------------------------------------- malicious pickles: nothing runs


class _SystemCall:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _evil_module(tmp_path: Path, marker: Path) -> str:
    """An importable module whose function, __setstate__, __init__ and __reduce__ would each write ``marker``."""
    (tmp_path / "evil_hooks.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            MARK = Path({str(marker)!r})

            def write_marker(*args):
                MARK.write_text("ran")

            class Config:
                def __init__(self, *args):
                    MARK.write_text("init ran")
                def __setstate__(self, state):
                    MARK.write_text("setstate ran")
                def __reduce__(self):
                    return (Config, (1,), {{"a": 1}})
            """
        )
    )
    return "evil_hooks"


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("call", ["os.system", "subprocess.call", "builtins.exec", "builtins.eval"])
def test_a_pickled_system_call_is_refused_and_nothing_runs(tmp_path, call, trust, protocol):
    marker = tmp_path / "MARKER"
    fn = {
        "os.system": (os.system, f"touch {marker}"),
        "subprocess.call": (subprocess.call, ["touch", str(marker)]),
        "builtins.exec": (exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": (eval, f"open({str(marker)!r}, 'w').close()"),
    }[call]
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _SystemCall(*fn)}, path, pickle_protocol=protocol)
    with pytest.raises(FeatstoreError, match="which no checkpoint needs: refused, nothing was run") as e:
        load_checkpoint(path, trust=trust)
    assert call.split(".")[1] in e.value.message
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_importable_hooks_are_never_imported_or_run(tmp_path, monkeypatch, protocol):
    """A class whose __init__/__setstate__ and a function whose call would write the marker, all in a
    module this process can import: the file loads, the placeholders are named, the marker never appears."""
    marker = tmp_path / "MARKER"
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _evil_module(tmp_path, marker)
    import evil_hooks

    path = tmp_path / "hooks.pth"
    torch.save(
        {
            "state_dict": {"w": torch.arange(3.0)},
            "cfg": evil_hooks.Config.__new__(evil_hooks.Config),
            "cb": _SystemCall(evil_hooks.write_marker, 1),
        },
        path,
        pickle_protocol=protocol,
    )
    assert not marker.exists()
    monkeypatch.delitem(sys.modules, name)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.tensors["w"], torch.arange(3.0))
    assert ckpt.placeholders == ["evil_hooks.Config", "evil_hooks.write_marker"]
    assert not marker.exists() and name not in sys.modules  # not even imported


@dataclasses.dataclass
class _OnlyConfig:
    x: int = 1


def test_placeholders_only_and_no_tensors_names_them(tmp_path):
    torch.save({"cfg": _OnlyConfig()}, tmp_path / "cfg.pth")
    with pytest.raises(FeatstoreError, match=r"holds no tensors outside the objects it pickles.*_OnlyConfig") as e:
        load_checkpoint(tmp_path / "cfg.pth")
    assert "--trust-checkpoint" in e.value.hint
