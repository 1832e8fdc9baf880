"""Tied Block Fully Connected layer (TFC)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _transfer
from ._checks import check_B, check_transfer

__all__ = ["TiedLinear"]


class TiedLinear(nn.Module):
    """Tied Block Fully Connected layer on inputs of shape ``(*, in_features)``.

    The features are split into ``B`` contiguous blocks; one weight ``(out/B, in/B)`` is
    applied to every block and the outputs are concatenated in block order. The equivalent
    dense layer has a block-diagonal weight with ``weight`` on every diagonal block
    (:meth:`to_dense`). B² fewer weights and B fewer multiply-adds than ``nn.Linear``.

    Example:
        >>> import torch
        >>> from tieify.nn import TiedLinear
        >>> layer = TiedLinear(512, 256, B=4)
        >>> layer(torch.randn(3, 7, 512)).shape
        torch.Size([3, 7, 256])
        >>> tuple(layer.weight.shape)
        (64, 128)
    """

    in_features: int
    out_features: int
    B: int
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        B: int,
    ) -> None:
        super().__init__()
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"TiedLinear: `{arg}` must be a positive int, but got {value!r}.")
        B = check_B(B, in_features, out_features, 1, "TiedLinear")
        thin = nn.Linear(in_features // B, out_features // B, bias, device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.B = B
        self.weight = nn.Parameter(thin.weight.data)
        self.bias = None if thin.bias is None else nn.Parameter(thin.bias.data)

    @classmethod
    def from_dense(cls, layer: nn.Module, B: int, transfer: str | None = "mean") -> TiedLinear:
        """Tie an ``nn.Linear``; ``transfer`` as in :meth:`TiedConv2d.from_dense`.

        Example:
            >>> import torch
            >>> from tieify.nn import TiedLinear
            >>> TiedLinear.from_dense(torch.nn.Linear(8, 4), B=2).weight.shape
            torch.Size([2, 4])
        """
        if isinstance(layer, TiedLinear):
            raise TypeError(
                f"TiedLinear.from_dense expects a dense nn.Linear, but got an already tied "
                f"TiedLinear(B={layer.B}); call to_dense() first."
            )
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"TiedLinear.from_dense expects an nn.Linear, but got {type(layer).__name__}."
            )
        if type(layer).forward is not nn.Linear.forward:
            raise TypeError(
                f"TiedLinear.from_dense: {type(layer).__name__} overrides forward(), which a "
                "plain tied linear would silently drop; wrap it with tieify.nn.TiedBlock."
            )
        transfer = check_transfer(transfer)
        w = layer.weight
        tied = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
            B=B,
        )
        weight = bias = None
        if transfer == "mean":
            weight = _transfer.mean_transfer_weight(w.detach(), B)
            if layer.bias is not None:
                bias = _transfer.mean_transfer_bias(layer.bias.detach(), B)
        _transfer.load_like(tied, weight, bias, layer)
        return tied

    def to_dense(self) -> nn.Linear:
        """The exactly equivalent ``nn.Linear`` (block-diagonal weight, fresh tensors)."""
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            weight = _transfer.expand_linear_weight(self.weight, self.B)
            bias = _transfer.expand_bias(self.bias, self.B)
        _transfer.load_like(dense, weight, bias, self)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"TiedLinear(in_features={self.in_features}, B={self.B}) expects input of "
                f"shape (*, {self.in_features}), but got {tuple(x.shape)}; check the previous "
                "layer's output features."
            )
        lead = x.shape[:-1]
        y = F.linear(x.reshape(*lead, self.B, self.in_features // self.B), self.weight, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, B={self.B}"
        )
