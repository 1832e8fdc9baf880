"""The package's CIFAR-style ResNet: structure, hand-computed sizes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tieify.search._cifar_resnet import CifarResNet, cifar_resnet


def _conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def test_parameter_count_by_hand() -> None:
    w, classes = 16, 10
    expected = _conv_params(3, w, 3) + 2 * w  # stem + bn
    prev = w
    for width in (w, 2 * w, 4 * w):
        expected += _conv_params(prev, width, 3) + _conv_params(width, width, 3) + 4 * width
        if prev != width:
            expected += _conv_params(prev, width, 1) + 2 * width
        prev = width
    expected += 4 * w * classes + classes
    assert sum(p.numel() for p in cifar_resnet(depth=8, width=w).parameters()) == expected == 78042


@pytest.mark.parametrize("depth, blocks", [(8, 1), (14, 2), (20, 3)])
def test_depth_and_stages(depth: int, blocks: int) -> None:
    net = cifar_resnet(depth=depth, width=4, num_classes=7)
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3)] == [blocks] * 3
    out = net(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 7)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 6 * blocks + 2  # stem, 2 per block, 2 projections


def test_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+2.*depth=10"):
        CifarResNet(depth=10)
