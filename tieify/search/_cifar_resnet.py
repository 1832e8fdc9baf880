"""A small CIFAR-style ResNet (He et al. 2016, section 4.2), the default recipe's model.

``depth = 6n + 2``: a 3×3 stem, three stages (``layer1``..``layer3``, named like torchvision's
ResNets so per-stage search spaces find them) of ``n`` basic blocks with ``width``, ``2·width``
and ``4·width`` channels (the last two downsample by 2 with a 1×1 projection shortcut), global
average pooling and a linear head.

Example:
    >>> import torch
    >>> net = cifar_resnet(depth=8, width=16, num_classes=10)
    >>> net(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "cifar_resnet"]


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; see the module docstring."""

    def __init__(
        self, depth: int = 8, width: int = 16, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CifarResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), "
                f"but got depth={depth!r}."
            )
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"CifarResNet width must be an integer >= 1, but got {width!r}.")
        n = (depth - 2) // 6
        self.default_input_size = (in_channels, 32, 32)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        widths = (width, 2 * width, 4 * width)
        stages = []
        prev = width
        for i, w in enumerate(widths):
            blocks = [BasicBlock(prev, w, 1 if i == 0 else 2)]
            blocks += [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = w
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(
    depth: int = 8, width: int = 16, num_classes: int = 10, in_channels: int = 3
) -> CifarResNet:
    """Build a :class:`CifarResNet` (also reachable as MODEL ``cifar_resnet``).

    Example:
        >>> sum(p.numel() for p in cifar_resnet(depth=8).parameters())
        78042
    """
    return CifarResNet(depth=depth, width=width, num_classes=num_classes, in_channels=in_channels)
