"""tieify._models: MODEL strings (torchvision, timm:, module:factory, file.py:factory) and
default input sizes."""

from __future__ import annotations

import builtins
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from tieify import ModelResolveError
from tieify._models import default_input_size, resolve_model


def test_torchvision_name_builds_fresh_model_with_kwargs() -> None:
    model = resolve_model("resnet18", num_classes=7)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 7
    other = resolve_model("resnet18", num_classes=7)
    assert model.conv1.weight.data_ptr() != other.conv1.weight.data_ptr()


def test_unknown_torchvision_name_suggests_close_matches() -> None:
    with pytest.raises(ModelResolveError, match=r"resnet5o.*Did you mean resnet50"):
        resolve_model("resnet5o")


def test_timm_name_not_in_torchvision_points_to_timm_prefix() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ModelResolveError, match="use 'timm:ecaresnet26t'"):
        resolve_model("ecaresnet26t")


def test_timm_models() -> None:
    pytest.importorskip("timm")
    model = resolve_model("timm:resnet18d", num_classes=5)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert default_input_size(model) == (3, 224, 224)
    with pytest.raises(ModelResolveError, match=r"timm has no model 'resnet5o'.*resnet50"):
        resolve_model("timm:resnet5o")
    with pytest.raises(ModelResolveError, match="timm has no model ''"):
        resolve_model("timm:")


def test_missing_timm_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModelResolveError, match=r'pip install "tieify\[timm\]"'):
        resolve_model("timm:resnet18")


def test_module_factory() -> None:
    model = resolve_model("torchvision.models:resnet18", num_classes=3)
    assert model.fc.out_features == 3
    layer = resolve_model("torch.nn:Linear", in_features=2, out_features=3)  # a class
    assert isinstance(layer, nn.Linear) and layer.out_features == 3
    block = resolve_model("torchvision.models.resnet:BasicBlock", inplanes=4, planes=4)
    assert isinstance(block, torchvision.models.resnet.BasicBlock)
    dotted = resolve_model("torchvision.models:resnet.resnet18")  # attribute path a.b
    assert isinstance(dotted, torchvision.models.ResNet)  # dotted attribute path


def test_module_factory_errors() -> None:
    with pytest.raises(ModelResolveError, match="cannot import module 'no_such_pkg.models'"):
        resolve_model("no_such_pkg.models:make")
    with pytest.raises(ModelResolveError, match="has no attribute 'resnet_18'.*resnet18"):
        resolve_model("torchvision.models:resnet_18")
    with pytest.raises(ModelResolveError, match="must build an nn.Module.*Tensor"):
        resolve_model("torch:zeros", size=(2,))
    with pytest.raises(ModelResolveError, match="bogus=1.*TypeError"):
        resolve_model("resnet18", bogus=1)
    with pytest.raises(ModelResolveError, match="both parts"):
        resolve_model("torchvision.models:")
    with pytest.raises(ModelResolveError, match="non-empty string"):
        resolve_model("  ")


def _write_net(folder: Path) -> Path:
    (folder / "blocks.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def block(c):
                return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
            """
        )
    )
    net = folder / "net.py"
    net.write_text(
        textwrap.dedent(
            """
            import torch.nn as nn
            from blocks import block  # a sibling module of this file

            class Net(nn.Module):
                default_input_size = (1, 28, 28)

                def __init__(self, width=8):
                    super().__init__()
                    self.stem = nn.Conv2d(1, width, 3, padding=1)
                    self.body = block(width)

                def forward(self, x):
                    return self.body(self.stem(x))

            def make(width=8):
                return Net(width)

            not_a_model = 3
            """
        )
    )
    return net


def test_file_factory(tmp_path: Path) -> None:
    net = _write_net(tmp_path)
    model = resolve_model(f"{net}:make", width=16)
    assert model.stem.out_channels == 16
    assert default_input_size(model) == (1, 28, 28)
    assert str(tmp_path) not in sys.path  # the folder was only added while importing
    cls_model = resolve_model(f"{net}:Net")
    assert cls_model.stem.out_channels == 8
    with pytest.raises(ModelResolveError, match="must name a callable"):
        resolve_model(f"{net}:not_a_model")
    with pytest.raises(ModelResolveError, match="has no attribute 'mak'.*make"):
        resolve_model(f"{net}:mak")
    with pytest.raises(ModelResolveError, match="does not exist"):
        resolve_model(f"{tmp_path / 'missing.py'}:make")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ModelResolveError, match="importing .* failed with RuntimeError: boom"):
        resolve_model(f"{broken}:make")


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet50", (3, 224, 224)),
        ("inception_v3", (3, 299, 299)),
        ("vit_b_16", (3, 224, 224)),
        ("r3d_18", (3, 16, 112, 112)),
    ],
)
def test_default_input_size_torchvision(name: str, size: tuple[int, ...]) -> None:
    model = resolve_model(name)
    assert default_input_size(model, name) == size
    with torch.no_grad():
        model.eval()(torch.randn(1, *size))  # the size actually runs


def test_default_input_size_of_a_vit_built_for_another_size() -> None:
    """A torchvision ViT's position embeddings fix its input: 128×128 for image_size=128,
    found with or without the name (the name's usual 224 would not run)."""
    model = resolve_model("vit_b_32", image_size=128)
    assert default_input_size(model, "vit_b_32") == default_input_size(model) == (3, 128, 128)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 128, 128)).shape == (1, 1000)
        with pytest.raises(AssertionError, match="Wrong image height"):
            model(torch.randn(1, 3, 224, 224))


def test_default_input_size_from_first_conv_and_timm_cfg() -> None:
    assert default_input_size(nn.Sequential(nn.Conv2d(1, 4, 3))) == (1, 224, 224)
    assert default_input_size(nn.Sequential(nn.Conv1d(2, 4, 3))) == (2, 224)
    assert default_input_size(nn.Linear(3, 3)) == (3, 224, 224)
    timm = pytest.importorskip("timm")
    model = timm.create_model("inception_v3", pretrained=False)
    assert default_input_size(model) == (3, 299, 299)
