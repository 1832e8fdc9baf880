"""tieify() over a sample of timm architectures covering the families of the issue.

Same contract as tests/test_zoo_torchvision.py (check_model). Smallest variants,
``pretrained=False``, ``num_classes=10`` (smaller heads), batch 1, 64×64 (inception: 80).
ShuffleNet is not in timm; torchvision's shufflenet_v2 models cover that family.
CBAM has no registered timm model; ``resnet18`` built with ``attn_layer="cbam"`` covers it.

Zoo coverage per family: ``python tests/test_zoo_timm.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_zoo_torchvision import check_model, coverage, print_coverage

timm = pytest.importorskip("timm")

# (family, model name, extra create_model kwargs, input size, slow)
ZOO: list[tuple[str, str, dict[str, Any], int, bool]] = [
    ("vgg", "vgg11", {}, 64, True),
    ("inception", "inception_v3", {}, 80, False),
    ("inception-resnet", "inception_resnet_v2", {}, 80, True),
    ("xception", "xception41", {}, 64, True),
    ("resnet", "resnet10t", {}, 64, False),
    ("resnext", "resnext26ts", {}, 64, False),
    ("wide-resnet", "wide_resnet50_2", {}, 64, True),
    ("se-resnext", "seresnext26d_32x4d", {}, 64, False),
    ("sk", "skresnet18", {}, 64, False),
    ("resnest", "resnest14d", {}, 64, False),
    ("cbam", "resnet18", {"block_args": {"attn_layer": "cbam"}}, 64, False),
    ("gc-resnet", "gcresnet33ts", {}, 64, False),
    ("densenet", "densenet121", {}, 64, False),
    ("mobilenet-v2", "mobilenetv2_050", {}, 64, False),
    ("mobilenet-v3", "mobilenetv3_small_050", {}, 64, False),
    ("efficientnet", "efficientnet_b0", {}, 64, False),
    ("efficientnet-same", "tf_efficientnet_b0", {}, 64, False),
    ("efficientnet-condconv", "efficientnet_cc_b0_4e", {}, 64, False),
    ("regnet", "regnetx_002", {}, 64, False),
    ("regnet-y", "regnety_002", {}, 64, False),
    ("convnext", "convnext_atto", {}, 64, False),
    ("dla", "dla46_c", {}, 64, False),
    ("hrnet", "hrnet_w18_small", {}, 64, True),
    ("res2net", "res2net50_14w_8s", {}, 64, False),
    ("nfnet", "nf_resnet26", {}, 64, False),
    ("nf-regnet", "nf_regnet_b0", {}, 64, False),
    ("vovnet-ese", "ese_vovnet19b_dw", {}, 64, False),
    ("eca-resnet", "eca_resnet33ts", {}, 64, False),
    ("ghostnet", "ghostnet_050", {}, 64, False),
    ("mixnet", "mixnet_s", {}, 64, False),
    ("repvgg", "repvgg_a0", {}, 64, False),
    ("dpn", "dpn48b", {}, 64, False),
    ("lcnet", "lcnet_050", {}, 64, False),
]


def build(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


@pytest.mark.parametrize(
    "fam, name, kwargs, size",
    [
        pytest.param(f, n, k, s, id=f"{f}-{n}", marks=[pytest.mark.slow] if slow else [])
        for f, n, k, s, slow in ZOO
    ],
)
def test_timm_model(fam: str, name: str, kwargs: dict[str, Any], size: int) -> None:
    torch.manual_seed(0)
    model = build(name, kwargs)
    plan = check_model(model, torch.randn(1, 3, size, size))
    assert plan.traced, plan.notes
    assert plan.tied(), f"{name}: nothing tied"
    for lp in plan.left():
        assert lp.reason, f"{name}: {lp.name} left without a reason"


def test_timm_has_at_least_25_architectures() -> None:
    assert len({n for _, n, _, _, _ in ZOO}) >= 25


def test_timm_attention_branches_found() -> None:
    kinds = {}
    for name, kw in (
        ("seresnext26d_32x4d", {}),
        ("gcresnet33ts", {}),
        ("resnet18", {"block_args": {"attn_layer": "cbam"}}),
        ("ese_vovnet19b_dw", {}),
    ):
        p = tieify_plan(build(name, kw))
        kinds[name] = {lp.attention for lp in p.layers if lp.attention}
    assert kinds == {
        "seresnext26d_32x4d": {"SE"},
        "gcresnet33ts": {"GC"},
        "resnet18": {"CBAM"},
        "ese_vovnet19b_dw": {"SE"},
    }


def test_timm_conv_subclasses_use_tiedblock() -> None:
    from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d

    import tieify
    from tieify.nn import TiedBlock

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        StdConv2d(16, 32, 3, padding=1),
        Conv2dSame(32, 32, 3, stride=2),
        ScaledStdConv2d(32, 32, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    ).eval()
    plan = check_model(model, torch.randn(1, 3, 17, 17))
    assert [(lp.kind, lp.action) for lp in plan.layers] == [
        ("conv", "leave"),
        *[("conv_subclass", "tie")] * 3,
        ("linear", "leave"),
    ]
    tied = tieify.tieify(model, B=4)
    assert all(isinstance(tied[i], TiedBlock) for i in (1, 2, 3))
    # nf_resnet26's ScaledStdConv2d layers sit in timm leaf blocks and are still tied
    plan = tieify.plan(build("nf_resnet26", {}), B=4)
    assert sum(lp.kind == "conv_subclass" and lp.action == "tie" for lp in plan.layers) > 20


def test_timm_condconv_left_with_reason() -> None:
    import tieify

    plan = tieify.plan(build("efficientnet_cc_b0_4e", {}), B=4)
    cond = [lp for lp in plan.layers if lp.module_type.endswith("CondConv2d")]
    assert cond and all(lp.kind == "other" and lp.action == "leave" for lp in cond)
    assert all("CondConv2d is not a conv/linear layer" in lp.reason for lp in cond)


def tieify_plan(model: torch.nn.Module) -> Any:
    import tieify

    return tieify.plan(model, B=4)


if __name__ == "__main__":
    by_name = {n: (k, s) for _, n, k, s, _ in ZOO}
    print_coverage(
        coverage(
            [n for _, n, _, _, _ in ZOO],
            lambda n: build(n, by_name[n][0]),
            lambda n: by_name[n][1],
        )
    )
