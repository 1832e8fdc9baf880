"""tieify(): module swaps, grouping (Deep Roots), TGC, subclasses, functional calls, mixers,
untraceable models, inplace semantics, strict errors and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tieify
from tieify import PlanError, SpecError, TieError
from tieify._apply import Mixed
from tieify.nn import TiedConv2d, TiedLinear
from tieify.nn._transfer import diagonal_blocks


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.Conv2d(32, 24, 1),
        nn.ConvTranspose2d(24, 24, 2, stride=2),
        nn.Conv2d(24, 16, 3, padding=1, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_defaults_and_reasons() -> None:
    p = tieify.plan(_net(), B=2)
    got = {lp.name: (lp.action, lp.B) for lp in p.layers}
    assert got == {
        "0": ("leave", 1),
        "2": ("tie", 2),
        "3": ("leave", 1),
        "4": ("tie", 2),
        "5": ("leave", 1),
        "6": ("tie", 2),
        "9": ("leave", 1),
    }
    reasons = {lp.name: lp.reason for lp in p.layers}
    assert "stem" in reasons["0"]
    assert "depthwise" in reasons["3"]
    assert "transposed" in reasons["5"]
    assert "classifier" in reasons["9"]


def test_original_untouched_and_outputs_shape() -> None:
    model = _net().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    tied = tieify.tieify(model, B=2, example_inputs=x)
    assert tied is not model
    assert type(model[2]) is nn.Conv2d and isinstance(tied[2], TiedConv2d)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert tied(x).shape == model(x).shape == (2, 10)
    assert isinstance(tied[6], TiedConv2d) and tied[6].groups == 4  # B inside the groups


def test_inplace() -> None:
    model = _net()
    tied = tieify.tieify(model, B=2, inplace=True)
    assert tied is model and isinstance(model[2], TiedConv2d)
    assert model.tieify_plan.layer("2").action == "tie"


@pytest.mark.parametrize("inplace", [False, True])
def test_tieify_inside_inference_mode_gives_a_trainable_model(inplace: bool) -> None:
    """Tensors made under inference_mode have no version counter and cannot enter autograd:
    the tied model is built outside it, equal to one built outside, and trains."""
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    reference = tieify.tieify(_net().eval(), B=2)
    torch.manual_seed(0)
    model = _net().eval()
    with torch.inference_mode():
        tied = tieify.tieify(model, B=2, inplace=inplace)
    assert not any(t.is_inference() for t in [*tied.parameters(), *tied.buffers()])
    with torch.no_grad():
        torch.testing.assert_close(tied(x), reference(x))
    tied.train()
    tied(x).square().mean().backward()
    assert all(m.weight.grad is not None for m in tied.modules() if isinstance(m, TiedConv2d))


def test_B1_keeps_outputs() -> None:
    model = torchvision.models.resnet18().eval()
    same = tieify.tieify(model, B=1)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(same(x), model(x))
    assert all(lp.action == "leave" and lp.reason for lp in same.tieify_plan.layers)


def test_mean_transfer_and_none() -> None:
    model = _net()
    tied = tieify.tieify(model, B=2)
    w = model[2].weight.detach()
    expected = diagonal_blocks(w, 2, 1).mean(0).reshape(16, 8, 3, 3)
    torch.testing.assert_close(tied[2].weight.detach(), expected)
    fresh = tieify.tieify(model, B=2, transfer=None)
    assert not torch.allclose(fresh[2].weight, expected)


def test_non_divisible_left_strict_and_nearest() -> None:
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.Conv2d(12, 18, 3), nn.Conv2d(18, 18, 1))
    p = tieify.plan(model, B=4)
    lp = p.layer("1")
    assert lp.action == "leave"
    assert "B=4 must divide the input and output channels (12->18); valid B: [1, 2, 3, 6]" in (
        lp.reason
    )
    with pytest.raises(TieError, match=r"layer '1' \(in_channels=12, out_channels=18, groups=1\)"):
        tieify.plan(model, B=4, strict=True)
    p = tieify.plan(model, B=4, nearest_B=True)
    assert p.layer("1").B == 3 and "nearest valid B=3" in p.layer("1").reason


def test_explicit_head_and_stem() -> None:
    model = torchvision.models.resnet18()
    tied = tieify.tieify(model, B={"fc": 4, "*": 4})
    assert isinstance(tied.fc, TiedLinear) and tied.fc.B == 4
    assert type(tied.conv1) is nn.Conv2d
    with pytest.raises(TieError, match="conv1.*in_channels=3"):
        tieify.plan(model, B={"conv1": 4, "*": 4}, strict=True)


def test_include_exclude() -> None:
    model = torchvision.models.resnet18()
    p = tieify.plan(model, B=4, include="layer4.*", exclude=["*downsample*"])
    tied = {lp.name for lp in p.tied()}
    assert tied == {f"layer4.{i}.conv{j}" for i in (0, 1) for j in (1, 2)}
    assert "excluded by exclude pattern '*downsample*'" in p.layer("layer4.0.downsample.0").reason
    assert "not matched by include=['layer4.*']" in p.layer("layer1.0.conv1").reason


def test_groups_deep_roots_keeps_diagonal_blocks() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(8, 16, 3, bias=True),
        nn.Conv2d(16, 8, 1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    tied = tieify.tieify(model, B=None, groups=4)
    conv = tied[1]
    assert type(conv) is nn.Conv2d and conv.groups == 4
    w = model[1].weight.detach()
    for g in range(4):
        block = w[4 * g : 4 * g + 4, 2 * g : 2 * g + 2]
        torch.testing.assert_close(conv.weight[4 * g : 4 * g + 4], block)
    torch.testing.assert_close(conv.bias, model[1].bias)
    assert tied.tieify_plan.layer("1").action == "group"
    # 1x1 convs stay dense unless named; the stem is never grouped by default
    assert type(tied[2]) is nn.Conv2d and tied[2].groups == 1
    assert "1x1 conv kept dense" in tied.tieify_plan.layer("2").reason
    assert tied[0].groups == 1
    named = tieify.tieify(model, B=None, groups={"2": 4, "*": 4})
    assert named[2].groups == 4


def test_groups_and_B_give_tgc() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1))
    tied = tieify.tieify(model, B=2, groups=2)
    layer = tied[1]
    assert isinstance(layer, TiedConv2d) and (layer.groups, layer.B) == (2, 2)
    assert tuple(layer.weight.shape) == (8, 4, 3, 3)  # C_out/B, C_in/(B*G)
    assert tied.tieify_plan.layer("1").action == "tie+group"
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))


def test_resnext_grouped_conv_B_inside_groups() -> None:
    model = torchvision.models.resnext50_32x4d()
    p = tieify.plan(model, B=2)
    lp = p.layer("layer1.0.conv2")
    assert (lp.kind, lp.orig_groups, lp.groups, lp.action) == ("grouped_conv", 32, 32, "tie")
    tied = p.apply(model)
    assert tied.layer1[0].conv2.groups == 32 and tied.layer1[0].conv2.B == 2


def test_mixers() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 4)
    )
    x = torch.randn(2, 3, 8, 8)
    plain = tieify.tieify(model, B=4)
    concat = tieify.tieify(model, B=4, mixer="concat")
    assert isinstance(concat[1], Mixed) and concat[1].mixer.weight.shape == (8, 8, 1, 1)
    torch.testing.assert_close(concat(x), plain(x))  # identity-initialised mixer
    summed = tieify.tieify(model, B=4, mixer="sum")
    assert summed[1].mixer.weight.shape == (8, 2, 1, 1)  # C_out/B -> C_out
    assert summed(x).shape == (2, 4)
    h = torch.randn(1, 8, 5, 5)
    y = summed[1].layer(h)  # (1, 8, 3, 3): B=4 blocks of 2 channels
    ref = F.conv2d(y.reshape(1, 4, 2, 3, 3).sum(1), summed[1].mixer.weight)
    torch.testing.assert_close(summed[1](h), ref)
    assert ref.shape == (1, 8, 3, 3)
    lin = tieify.tieify(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(8, 8), nn.Linear(8, 2)), B=2, mixer="sum"
    )
    assert isinstance(lin[1], Mixed) and lin[1](torch.randn(3, 8)).shape == (3, 8)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3))
        self.b = nn.Parameter(torch.randn(8))
        self.proj = nn.Parameter(torch.randn(6, 8))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(self.stem(x), self.w, self.b, padding=1)
        x = F.linear(x.mean((2, 3)), self.proj)
        return self.head(x)


def test_functional_calls_are_rewritten() -> None:
    model = _Functional()
    p = tieify.plan(model, B=2)
    kinds = {lp.name: (lp.kind, lp.action, lp.weight_target) for lp in p.layers}
    assert kinds["fx:conv2d"] == ("functional_conv", "tie", "w")
    assert kinds["fx:linear"] == ("functional_linear", "tie", "proj")
    assert "weight parametrization" in p.layer("fx:conv2d").reason
    tied = p.apply(model)
    w = tied.w
    assert torch.equal(w[:4, 4:], torch.zeros(4, 4, 3, 3)) and torch.equal(w[:4, :4], w[4:, 4:])
    n = sum(q.numel() for q in tied.parameters())
    assert n == sum(q.numel() for q in model.parameters()) - (8 * 8 * 9 - 4 * 4 * 9) - 4 - (48 - 12)
    x = torch.randn(1, 3, 7, 7)
    assert tied(x).shape == (1, 2)
    tied(x).sum().backward()
    assert tied.parametrizations.w.original.grad is not None


class _Computed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w - self.w.mean()
        return F.conv2d(self.stem(x), w)


def test_functional_with_computed_weight_left_with_reason() -> None:
    p = tieify.plan(_Computed(), B=2)
    lp = p.layer("fx:conv2d")
    assert lp.action == "leave" and "computed in forward" in lp.reason


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if x.sum() > 0:  # data-dependent control flow
            x = self.b(x)
        else:
            x = self.c(x)
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_module_walk() -> None:
    model = _Untraceable()
    p = tieify.plan(model, B=2)
    assert not p.traced
    assert any("attention detection from the graph was unavailable" in n for n in p.notes)
    assert {lp.name: lp.action for lp in p.layers} == {
        "a": "leave",
        "b": "tie",
        "c": "tie",
        "fc": "leave",
    }
    assert "not traced" in str(p)
    assert tieify.tieify(model, B=2)(torch.randn(1, 3, 9, 9)).shape == (1, 4)


def test_layers_inside_multihead_attention_are_left() -> None:
    class Att(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(16, 16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.inp(x)
            return self.out(self.mha(x, x, x)[0])

    model = Att()
    for use_fx in (True, False):
        p = tieify.plan(model, B=2, use_fx=use_fx)
        lp = p.layer("mha.out_proj")
        assert lp.action == "leave" and "MultiheadAttention" in lp.reason
        tied = p.apply(model)
        assert tied(torch.randn(2, 5, 16)).shape == (2, 5, 4)


def test_plan_must_fit_the_model() -> None:
    p = tieify.plan(torchvision.models.resnet34(), B=4)
    with pytest.raises(PlanError, match="'layer1.2.conv1' is not a module of ResNet"):
        p.apply(torchvision.models.resnet18())
    p = tieify.plan(_net(), B=2)
    other = _net()
    other[2] = nn.Conv2d(16, 64, 3)
    with pytest.raises(PlanError, match="expects in=16, out=32, groups=1, but .* out=64"):
        p.apply(other)
    other[2] = nn.Linear(16, 32)
    with pytest.raises(PlanError, match="expects a torch.nn.modules.conv.Conv2d"):
        p.apply(other)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        p.apply("resnet18")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"B": "4"}, SpecError, "`B` must be an int"),
        ({"B": 0}, SpecError, "`B` values must be >= 1"),
        ({"groups": {"*": -1}}, SpecError, "`groups` values must be >= 1"),
        ({"attention_B": 2.5}, SpecError, "`attention_B`"),
        ({"include": 3}, SpecError, "`include`"),
        ({"transfer": "svd"}, ValueError, "`transfer` must be 'mean' or None"),
        ({"mixer": "max"}, ValueError, "`mixer` must be None, 'concat' or 'sum'"),
        ({"strict": "yes"}, TypeError, "`strict` must be a bool"),
        ({"inplace": 1}, TypeError, "`inplace` must be a bool"),
    ],
)
def test_bad_inputs(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tieify.tieify(_net(), **kwargs)


def test_bad_model() -> None:
    with pytest.raises(TypeError, match="expects a torch.nn.Module, but got str"):
        tieify.tieify("resnet50")  # type: ignore[arg-type]


def test_already_tied_layers_are_listed_and_kept() -> None:
    model = torchvision.models.resnet18().eval()
    once = tieify.tieify(model, B={"layer4.*": 4}, mixer="concat")
    p = tieify.plan(once, B=2)
    assert p.traced
    lp = p.layer("layer4.0.conv1")
    assert (lp.kind, lp.action, lp.in_channels, lp.out_channels) == ("tied", "leave", 256, 512)
    assert "already tied (Mixed, B=4)" in lp.reason
    assert not any(x.name.startswith("layer4.0.conv1.") for x in p.layers)
    twice = p.apply(once)
    assert twice.layer4[0].conv1 is not once.layer4[0].conv1  # a copy, unchanged type
    assert twice.layer1[0].conv1.B == 2
    assert twice(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
