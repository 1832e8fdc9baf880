"""Attention branches (SE, GC, CBAM) found in the traced graph or by class, and attention_B."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tieify


class HandSE(nn.Module):
    """pool -> 1x1 conv -> act -> 1x1 conv -> gate -> multiply, written by hand."""

    def __init__(self, c: int, gate: str = "sigmoid", fc: bool = False) -> None:
        super().__init__()
        self.body = nn.Conv2d(c, c, 3, padding=1)
        self.fc = fc
        if fc:
            self.squeeze, self.excite = nn.Linear(c, c // 4), nn.Linear(c // 4, c)
        else:
            self.squeeze, self.excite = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        if self.fc:
            s = F.adaptive_avg_pool2d(x, 1).flatten(1)
            s = self.excite(F.relu(self.squeeze(s))).view(x.size(0), -1, 1, 1)
        else:
            s = self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True))))
        g = torch.sigmoid(s) if self.gate == "sigmoid" else F.hardsigmoid(s)
        return x * g


class HandCBAM(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        a = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        m = self.fc2(F.relu(self.fc1(F.adaptive_max_pool2d(x, 1))))
        x = x * torch.sigmoid(a + m)
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(s))


def _wrap(block: nn.Module, c: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c, 3), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)
    )


@pytest.mark.parametrize(
    "gate, fc", [("sigmoid", False), ("hardsigmoid", False), ("sigmoid", True)]
)
def test_hand_written_se(gate: str, fc: bool) -> None:
    p = tieify.plan(_wrap(HandSE(16, gate, fc)), B=2)
    att = {lp.name: (lp.attention, lp.branch) for lp in p.layers}
    assert att["1.squeeze"] == ("SE", "1") and att["1.excite"] == ("SE", "1")
    assert att["1.body"] == (None, None) and att["4"] == (None, None)


def test_hand_written_cbam_and_spatial_conv_is_not_se() -> None:
    p = tieify.plan(_wrap(HandCBAM(16)), B=2)
    att = {lp.name: lp.attention for lp in p.layers}
    assert att["1.fc1"] == att["1.fc2"] == "CBAM"
    assert att["1.spatial"] is None and att["1.body"] is None


def test_torchvision_squeeze_excitation_and_attention_B() -> None:
    model = torchvision.models.mobilenet_v3_small()
    p = tieify.plan(model, B=2, attention_B=8)
    se = [lp for lp in p.layers if lp.attention == "SE"]
    assert len(se) == 18 and all(lp.branch.endswith(".1") or lp.branch.endswith(".2") for lp in se)
    assert all(lp.B == 8 for lp in se if lp.action == "tie")
    assert {lp.B for lp in p.tied() if lp.attention is None} == {2}
    # TiedSE alone: B=None everywhere else, 64x fewer weights in every SE conv tied with B=8
    tied = tieify.tieify(model, B=None, attention_B=8)
    for lp in tied.tieify_plan.tied():
        assert lp.attention == "SE"
        dense = model.get_submodule(lp.name).weight.numel()
        assert tied.get_submodule(lp.name).weight.numel() * 64 == dense


def test_timm_global_context() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    block = timm_layers.GlobalContext(32, fuse_add=True, fuse_scale=True)
    p = tieify.plan(_wrap(block, 32), B=4)
    by = {lp.name: lp for lp in p.layers}
    assert by["1.conv_attn"].attention == "GC" and by["1.conv_attn"].action == "leave"
    assert "attention-pooling conv (C->1) stays dense" in by["1.conv_attn"].reason
    transform = [lp for lp in p.layers if lp.name.startswith("1.mlp_")]
    assert len(transform) == 4 and all(lp.attention == "GC" for lp in transform)
    assert all(lp.action == "tie" for lp in transform)


def test_untraced_model_finds_known_classes_only() -> None:
    model = torchvision.models.mobilenet_v3_small()
    p = tieify.plan(model, B=2, use_fx=False)
    assert not p.traced
    assert sum(lp.attention == "SE" for lp in p.layers) == 18
    p = tieify.plan(_wrap(HandSE(16)), B=2, use_fx=False)
    assert all(lp.attention is None for lp in p.layers)
    assert any("attention detection" in n for n in p.notes)
