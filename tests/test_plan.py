"""Plans: plain data, JSON round trip with a version, validation, display, candidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import tieify
from tieify import LayerPlan, Plan, PlanError
from tieify._plan import PLAN_VERSION


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.Conv2d(32, 24, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )


def test_plan_decides_without_changing_the_model() -> None:
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = tieify.plan(model, B=4)
    assert [(lp.name, lp.kind, lp.action, lp.B) for lp in p.layers] == [
        ("0", "conv", "leave", 1),
        ("2", "conv", "tie", 4),
        ("3", "depthwise_conv", "leave", 1),
        ("4", "conv", "tie", 4),
        ("7", "linear", "leave", 1),
    ]
    assert [lp.role for lp in p.layers] == ["stem", None, None, None, "head"]
    assert [lp.depth for lp in p.layers] == [0, 1, -1, 2, 3]
    assert p.traced and p.model_type == "torch.nn.modules.container.Sequential"
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_json_round_trip_with_version(tmp_path: Path) -> None:
    p = tieify.plan(torchvision.models.resnet18(), B={"layer4.*": 8, "*": 4}, mixer="concat")
    text = p.to_json()
    assert json.loads(text)["version"] == PLAN_VERSION == 1
    assert Plan.from_json(text) == p
    path = tmp_path / "plan.json"
    p.to_json(path)
    assert Plan.from_json(path) == p
    assert Plan.from_json(str(path)) == p
    assert Plan.from_dict(p.to_dict()) == p


def _dict() -> dict:
    return tieify.plan(_net(), B=4).to_dict()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(version=2), "version` must be 1, but got 2"),
        (lambda d: d.pop("version"), "version` must be 1, but got None"),
        (lambda d: d.pop("layers"), "lacks the keys \\['layers'\\]"),
        (lambda d: d.update(extra=1), "unknown keys \\['extra'\\]"),
        (lambda d: d.update(layers={}), "`layers` must be a list"),
        (lambda d: d["layers"][0].pop("B"), "lacks the keys \\['B'\\]"),
        (lambda d: d["layers"][0].update(colour=1), "unknown keys \\['colour'\\]"),
        (lambda d: d["layers"][0].update(action="shrink"), "`action` must be one of"),
        (lambda d: d["layers"][0].update(B=0), "`B` must be a positive int"),
        (lambda d: d["layers"][0].update(kernel_size="3"), "kernel_size` must be a list"),
        (lambda d: d["layers"][1].update(name="0"), "appears twice"),
        (lambda d: d.update(transfer="svd"), "`transfer` must be 'mean' or None"),
        (lambda d: d["layers"][0].update(mixer="max"), "`mixer` must be None"),
    ],
)
def test_invalid_plans_raise_plan_error(mutate, match) -> None:  # type: ignore[no-untyped-def]
    d = _dict()
    mutate(d)
    with pytest.raises(PlanError, match=match):
        Plan.from_dict(d)


def test_malformed_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="malformed"):
        Plan.from_json("{not json")
    with pytest.raises(PlanError, match="neither JSON text nor an existing file"):
        Plan.from_json(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="must be a JSON object"):
        Plan.from_dict([1])


def test_valid_B_and_candidates() -> None:
    lp = LayerPlan("c", "conv", "leave", 1, 1, 1, 64, 96, (3, 3), "Conv2d")
    assert lp.valid_B() == [1, 2, 4, 8, 16, 32]
    assert lp.valid_B(groups=16) == [1, 2]  # 4 -> 6 channels per group
    assert lp.valid_groups() == [1, 2, 4, 8, 16, 32]
    dw = LayerPlan("d", "depthwise_conv", "leave", 1, 8, 8, 8, 8, (3, 3), "Conv2d", tieable=False)
    assert dw.valid_B() == [] and dw.valid_groups() == []
    p = tieify.plan(_net(), B=4)
    assert [lp.name for lp in p.candidates()] == ["2", "4"]
    assert [lp.name for lp in p.candidates(include_stem_head=True)] == ["2", "4", "7"]


def test_queries_and_display() -> None:
    p = tieify.plan(_net(), B=4)
    assert [lp.name for lp in p.tied()] == ["2", "4"]
    assert [lp.name for lp in p.left()] == ["0", "3", "7"]
    assert p.summary() == {"leave": 3, "tie": 2}
    text = str(p)
    assert text.splitlines()[0].startswith("Plan for torch.nn.modules.container.Sequential")
    row = next(line for line in text.splitlines() if line.startswith("3 "))
    assert "depthwise_conv" in row and "leave" in row and "nothing to tie" in row
    assert "32->32" in row and "1/32" in row
    assert p.layer("2").B == 4
    with pytest.raises(KeyError, match="no layer 'zz'"):
        p.layer("zz")


def test_apply_attaches_plan() -> None:
    model = _net()
    p = tieify.plan(model, B=4)
    tied = p.apply(model)
    assert tied.tieify_plan is p
    assert not hasattr(model, "tieify_plan")
