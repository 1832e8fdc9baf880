"""Named schedules: TiedResNet, TiedSE / TiedGC, Deep Roots root-N, root/column/tree."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import tieify
from tieify._presets import describe_preset, get_preset, list_presets

ROOTS = {  # DESIGN §2: groups for res2/res3/res4/res5
    2: (2, 1, 1, 1),
    4: (4, 2, 1, 1),
    8: (8, 4, 2, 1),
    16: (16, 8, 4, 2),
    32: (32, 16, 8, 4),
    64: (64, 32, 16, 8),
}


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return torchvision.models.resnet50()


def test_list_presets() -> None:
    names = list_presets()
    for n in ("tiedresnet", "tiedresnet-b4", "tiedse", "tiedgc", "root-2", "root-64", "B-tree"):
        assert n in names
    assert "3x3 convs grouped 8/4/2/1" in describe_preset("root-8")
    assert "from 2 to 16" in describe_preset("B-tree-2-16")
    with pytest.raises(KeyError, match="unknown preset 'nope'; known presets: B-column"):
        get_preset("nope", nn.Linear(2, 2))
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("root-3", nn.Linear(2, 2))


@pytest.mark.parametrize("n", sorted(ROOTS))
def test_deep_roots_resnet50(resnet50: nn.Module, n: int) -> None:
    kw = get_preset(f"root-{n}", resnet50)
    p = tieify.plan(resnet50, **kw)
    for i, g in enumerate(ROOTS[n]):
        convs = [lp for lp in p.layers if lp.stage == f"layer{i + 1}" and lp.name.endswith("conv2")]
        assert convs and all(lp.groups == g for lp in convs), (n, i)
    # only the 3x3 bottleneck convs are grouped; conv1 and all 1x1 convs stay dense
    assert all(lp.name.endswith("conv2") for lp in p.layers if lp.groups != lp.orig_groups)
    assert p.layer("conv1").groups == 1


def test_deep_roots_applied(resnet50: nn.Module) -> None:
    tied = tieify.tieify(resnet50, **get_preset("root-16", resnet50))
    assert tied.layer1[0].conv2.groups == 16 and tied.layer4[2].conv2.groups == 2
    x = torch.randn(1, 3, 32, 32)
    assert tied.eval()(x).shape == (1, 1000)


def test_tiedresnet(resnet50: nn.Module) -> None:
    p = tieify.plan(resnet50, **get_preset("tiedresnet-b4", resnet50))
    assert {lp.name.rsplit(".", 1)[-1] for lp in p.tied()} == {"conv2"}
    assert len(p.tied()) == 16 and {lp.B for lp in p.tied()} == {4}
    p = tieify.plan(resnet50, **get_preset("tiedresnet", resnet50))
    assert [p.layer(f"layer{i}.0.conv2").B for i in (1, 2, 3, 4)] == [2, 4, 8, 8]


def test_tiedse_and_tiedgc() -> None:
    model = torchvision.models.mobilenet_v3_small()
    kw = get_preset("tiedse", model)
    tied = tieify.tieify(model, **kw)
    plan = tied.tieify_plan
    assert plan.tied() and all(lp.attention == "SE" and lp.B == 8 for lp in plan.tied())
    se_before = sum(model.get_submodule(lp.name).weight.numel() for lp in plan.tied())
    se_after = sum(tied.get_submodule(lp.name).weight.numel() for lp in plan.tied())
    assert se_before == 64 * se_after
    assert get_preset("tiedgc", model) == {"B": None}  # no GC branch: nothing to tie


@pytest.mark.parametrize("shape", ["root", "column", "tree"])
def test_topologies(resnet50: nn.Module, shape: str) -> None:
    kw = get_preset(f"groups-{shape}", resnet50)
    values = list(kw["groups"].values())
    assert len(values) == 16  # the 3x3 convs (the stem is never grouped)
    if shape == "root":
        assert values[0] == 8 and values[-1] == 4 and values == sorted(values, reverse=True)
    elif shape == "column":
        assert set(values) == {4}
    else:
        assert values[0] == 4 and values[-1] == 8 and values == sorted(values)
    kw = get_preset(f"B-{shape}-2-8", resnet50)
    bs = list(kw["B"].values())
    assert all(b in (2, 4, 8) for b in bs)
    p = tieify.plan(resnet50, **kw)
    assert len(p.tied()) == len(bs)
