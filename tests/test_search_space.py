"""Search spaces: decisions per model, choices restricted to divisors, roots, user spaces."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import torchvision
import yaml
from torch import nn

from tieify import RecipeError
from tieify.search._cifar_resnet import cifar_resnet
from tieify.search._space import (
    Decision,
    apply_assignment,
    build_space,
    discover_layers,
    replay,
)


def test_per_stage_on_torchvision_resnet18() -> None:
    space = build_space("per_stage", torchvision.models.resnet18(num_classes=10))
    assert [d.name for d in space.decisions] == ["B_layer1", "B_layer2", "B_layer3", "B_layer4"]
    assert all(d.choices == (1, 2, 4, 8) for d in space.decisions)
    layer4 = space.decisions[3].layers
    assert "layer4.0.downsample.0" in layer4 and "fc" not in layer4
    bs, gs = space.assignment({"B_layer1": 1, "B_layer2": 2, "B_layer3": 4, "B_layer4": 8})
    assert gs == {} and bs["layer4.1.conv2"] == 8 and "layer1.0.conv1" not in bs


def test_per_layer_restricts_choices_to_divisors() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3),
        nn.Conv2d(12, 12, 3, groups=12),
        nn.Conv2d(12, 24, 1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )
    layers = discover_layers(net)
    # depthwise conv skipped; 3 input channels allow only 1
    assert [(la.name, la.valid) for la in layers] == [("0", (1,)), ("2", (1, 2, 4)), ("4", (1, 2))]
    space = build_space("per_layer", net)
    assert [(d.name, d.choices) for d in space.decisions] == [("B_2", (1, 2, 4)), ("B_4", (1, 2))]
    # without named stages, layers fall into depth quarters
    assert [la.stage for la in layers] == ["depth1", "depth2", "depth3"]


def test_uniform_space_and_suggest_is_seeded() -> None:
    space = build_space("uniform", cifar_resnet())
    (d,) = space.decisions
    assert d.name == "B" and d.choices == (1, 2, 4, 8) and len(d.layers) == 8  # 2 + 3 + 3 convs
    picks = []
    for _ in range(2):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
        picks.append([space.suggest(study.ask()) for _ in range(5)])
    assert picks[0] == picks[1]


@pytest.mark.parametrize(
    "topology, kind, first, last",
    [("root", "B", 8, 2), ("column", "B", 2, 2), ("tree", "B", 2, 8), ("root", "groups", 8, 2)],
)
def test_roots_topologies(topology: str, kind: str, first: int, last: int) -> None:
    space = build_space("roots", cifar_resnet(width=16))
    assert [d.name for d in space.decisions] == ["topology", "kind", "range"]
    bs, gs = space.assignment({"topology": topology, "kind": kind, "range": "2-8"})
    got = bs if kind == "B" else gs
    assert (gs if kind == "B" else bs) == {}
    values = list(got.values())
    # the schedule runs over depth, from the first to the last decided layer
    assert values[0] == first and values[-1] == last
    assert values == sorted(values, reverse=topology == "root")
    assert "conv1" not in got and "fc" not in got  # stem and head stay dense
    if kind == "groups":  # only the spatial (3x3) convolutions are grouped: the root modules
        assert "layer2.0.downsample.0" not in got and "layer2.0.conv1" in got
    else:
        assert "layer2.0.downsample.0" in got


def test_grouping_keeps_block_diagonal_weights() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    mask = torch.block_diag(*[torch.ones(2, 2)] * 4)[:, :, None, None]
    with torch.no_grad():
        conv.weight.mul_(mask)
    net = nn.Sequential(conv)
    grouped, plan = apply_assignment(net, {}, {"0": 4})
    x = torch.randn(2, 8, 5, 5)
    assert grouped[0].groups == 4 and grouped[0].weight.shape == (8, 2, 3, 3)
    torch.testing.assert_close(grouped(x), net(x))
    torch.testing.assert_close(replay(net, plan)(x), net(x))


def test_tied_assignment_and_replay() -> None:
    net = cifar_resnet(width=8).eval()
    tied, plan = apply_assignment(net, {"layer2.0.conv2": 4})
    again = replay(net, plan)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(again(x), tied(x))
    n_dense = sum(p.numel() for p in net.parameters())
    n_tied = sum(p.numel() for p in tied.parameters())
    assert n_dense - n_tied == 16 * 16 * 9 - (16 * 16 * 9) // 16
    assert isinstance(net.layer2[0].conv2, nn.Conv2d)  # the input model is untouched


def test_custom_yaml_and_callable_spaces(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "type": "custom",
                "decisions": [
                    {"name": "early", "layers": ["layer1.*", "layer2.*"], "choices": [1, 2]},
                    {"name": "late", "layers": "layer3.*"},
                ],
            }
        )
    )
    space = build_space(str(path), cifar_resnet())
    assert [(d.name, d.choices) for d in space.decisions] == [
        ("early", (1, 2)),
        ("late", (1, 2, 4, 8)),
    ]
    bs, _ = space.assignment({"early": 2, "late": 4})
    assert bs["layer1.0.conv1"] == 2 and bs["layer3.0.conv2"] == 4

    mod = tmp_path / "myspace.py"
    mod.write_text(
        "def space(layers, choices):\n"
        "    convs = [l.name for l in layers if l.name.endswith('conv2')]\n"
        "    return [{'name': 'second', 'layers': convs, 'choices': [1, 4]}]\n"
    )
    space = build_space(f"{mod}:space", cifar_resnet())
    (d,) = space.decisions
    assert d == Decision("second", (1, 4), ("layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"))


def test_space_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="unknown search space 'diag'.*per_stage"):
        build_space("diag", cifar_resnet())
    bad = tmp_path / "b.yaml"
    bad.write_text("type: custom\nlayerz: 1\n")
    with pytest.raises(RecipeError, match="unknown search-space key 'layerz'"):
        build_space(str(bad), cifar_resnet())
    bad.write_text("type: custom\ndecisions: [{name: a, layers: ['nothing.*']}]\n")
    with pytest.raises(RecipeError, match="match no layer"):
        build_space(str(bad), cifar_resnet())
    with pytest.raises(RecipeError, match="no decision"):
        build_space("per_stage", nn.Sequential(nn.Conv2d(3, 5, 3)))
    with pytest.raises(RecipeError, match="cannot import"):
        build_space("no_such_module_xyz:fn", cifar_resnet())
