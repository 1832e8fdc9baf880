"""TiedBlock: tie any channel-mixing module whose own forward must be kept."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from .._errors import TieError
from . import _transfer
from ._checks import check_B, check_transfer

__all__ = ["TiedBlock"]


def _scaled_std_conv(thin: nn.Module, dense: nn.Module, B: int) -> None:
    # timm's ScaledStdConv2d caches scale = gamma * fan_in ** -0.5; the thin copy has B times
    # fewer inputs per filter.
    thin.scale = dense.scale * math.sqrt(B)  # type: ignore[operator, assignment]


# Per-class adjustments of attributes that a module computed from its channel counts at
# construction time (keyed by class name, so timm need not be imported).
THIN_ADJUSTMENTS: dict[str, Callable[[nn.Module, nn.Module, int], None]] = {
    "ScaledStdConv2d": _scaled_std_conv,
    "ScaledStdConv2dSame": _scaled_std_conv,
}


def _channel_attrs(module: nn.Module) -> tuple[str, str, int, int]:
    """(in attribute, out attribute, channel dim of the input, groups) of ``module``."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise TieError(
            f"TiedBlock cannot tie {type(module).__name__}: transposed convolutions are not "
            "supported; leave the layer dense."
        )
    if isinstance(module, nn.modules.conv._ConvNd):
        return "in_channels", "out_channels", 1, module.groups
    if isinstance(module, nn.Linear):
        return "in_features", "out_features", -1, 1
    raise TieError(
        f"TiedBlock ties convolutions and linear layers (and their subclasses), but got "
        f"{type(module).__name__}; leave it dense or tie its inner layers."
    )


class TiedBlock(nn.Module):
    """Tie a module whose own forward must be kept by folding channels into the batch.

    A B-times-thinner copy of ``module`` (same class, ``in/B`` and ``out/B`` channels, its
    per-output-channel tensors averaged over the B blocks) runs on every block of channels:
    ``(N, C, *S) -> (N·B, C/B, *S) -> module -> (N, C_out, *S')`` for convolutions, and
    ``(*, C) -> (*, B, C/B) -> module -> (*, C_out)`` for linear layers. Weight
    standardization (timm's StdConv2d), 'same' padding (Conv2dSame) and any other maths of
    the module's forward apply to the thin filter bank, exactly as if the module had been
    built thin.

    Args:
        module: an ``nn.Conv{1,2,3}d`` or ``nn.Linear`` subclass (not modified).
        B: blocks per group; must divide its input and output channels per group.
        transfer: ``"mean"`` (least-squares projection of the weight) or ``None`` (fresh
            initialization through the module's ``reset_parameters``).

    Example:
        >>> import torch
        >>> from tieify.nn import TiedBlock
        >>> class MyConv(torch.nn.Conv2d):
        ...     def forward(self, x):
        ...         w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        ...         return self._conv_forward(x, w, self.bias)
        >>> tied = TiedBlock(MyConv(16, 32, 3, padding=1), B=4)
        >>> tied(torch.randn(2, 16, 5, 5)).shape
        torch.Size([2, 32, 5, 5])
    """

    B: int
    in_channels: int
    out_channels: int
    module: nn.Module

    def __init__(self, module: nn.Module, B: int, transfer: str | None = "mean") -> None:
        super().__init__()
        in_attr, out_attr, dim, groups = _channel_attrs(module)
        c_in, c_out = getattr(module, in_attr), getattr(module, out_attr)
        B = check_B(B, c_in, c_out, groups, f"TiedBlock({type(module).__name__})")
        transfer = check_transfer(transfer)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or weight.shape[0] != c_out:
            raise TieError(
                f"TiedBlock({type(module).__name__}): expected a weight of shape "
                f"({c_out}, {c_in // groups}, ...), but got "
                f"{None if weight is None else tuple(weight.shape)}; leave the layer dense."
            )
        thin = copy.deepcopy(module)
        with torch.no_grad():
            for name, tensor in list(module.named_parameters(recurse=False)) + list(
                module.named_buffers(recurse=False)
            ):
                if tensor is None:
                    continue
                if name == "weight":
                    new = _transfer.mean_transfer_weight(tensor.detach(), B, groups)
                elif tensor.dim() >= 1 and tensor.shape[0] == c_out:
                    new = _transfer.fold_channels(tensor.detach(), B)
                else:
                    continue
                old = getattr(thin, name)
                if isinstance(old, nn.Parameter):
                    setattr(thin, name, nn.Parameter(new.clone(), old.requires_grad))
                else:
                    setattr(thin, name, new.clone())
        setattr(thin, in_attr, c_in // B)
        setattr(thin, out_attr, c_out // B)
        adjust = THIN_ADJUSTMENTS.get(type(module).__name__)
        if adjust is not None:
            adjust(thin, module, B)
        reset = getattr(thin, "reset_parameters", None)
        if transfer is None and callable(reset):
            reset()
        self.module = thin
        self.B = B
        self.in_channels = c_in
        self.out_channels = c_out
        self._dim = dim

    @property
    def weight(self) -> torch.Tensor:
        """The shared (thin) weight of the wrapped module."""
        return self.module.weight  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = self.B
        if self._dim == -1:
            if x.dim() < 1 or x.shape[-1] != self.in_channels:
                raise ValueError(
                    f"TiedBlock({type(self.module).__name__}, B={B}) expects input of shape "
                    f"(*, {self.in_channels}), but got {tuple(x.shape)}."
                )
            lead = x.shape[:-1]
            y = self.module(x.reshape(*lead, B, self.in_channels // B))
            return y.reshape(*lead, self.out_channels)
        if x.dim() < 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"TiedBlock({type(self.module).__name__}, B={B}) expects input of shape "
                f"(N, {self.in_channels}, ...), but got {tuple(x.shape)}."
            )
        n = x.shape[0]
        y = self.module(x.reshape(n * B, self.in_channels // B, *x.shape[2:]))
        return y.reshape(n, self.out_channels, *y.shape[2:])

    def blockwise_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: the thin module applied to each block in a loop, outputs concatenated."""
        dim = self._dim if self._dim == -1 else 1
        return torch.cat([self.module(c) for c in x.chunk(self.B, dim=dim)], dim=dim)

    def to_dense(self) -> nn.Module:
        """Always raises: a wrapped module's own forward has no dense equivalent in general.

        Raises:
            TypeError: explaining why; use :meth:`blockwise_forward` as a reference.
        """
        raise TypeError(
            f"TiedBlock({type(self.module).__name__}) has no dense equivalent: the module's own "
            "forward (e.g. weight standardization) acts on the thin filter bank; compare with "
            "blockwise_forward() instead."
        )

    def extra_repr(self) -> str:
        return f"B={self.B}"
