"""Tied Block Convolution (TBC) and Tied Block Group Convolution (TGC) layers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _transfer
from ._checks import check_B, check_transfer
from ._paths import (
    forget_calls,
    kernel_call,
    relays,
    tied_conv_forward,
    to_channels_last,
)

__all__ = ["TiedConv1d", "TiedConv2d", "TiedConv3d"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# Typed loosely: torch's stubs declare int where the constructors accept tuples too.
_DENSE: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _TiedConvNd(nn.Module):
    """Shared implementation of :class:`TiedConv1d`, :class:`TiedConv2d`, :class:`TiedConv3d`.

    The input channels are split into ``B`` equal contiguous blocks; one filter bank
    ``weight`` of shape ``(C_out/B, C_in/(B·groups), *kernel_size)`` is applied to every block
    and the B outputs are concatenated in block order. With ``groups > 1`` every block is
    itself a ``groups``-group convolution (TGC). Equivalent dense layer: a convolution with
    ``groups·B`` groups whose weight is ``weight`` repeated B times along dim 0
    (:meth:`to_dense`).

    Cost against the dense layer with the same ``groups``: B² fewer weights, B fewer
    multiply-adds.
    """

    _ndim: int = 2

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    B: int
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        B: int,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"{name}: `{arg}` must be a positive int, but got {value!r}.")
        B = check_B(B, in_channels, out_channels, groups, name)
        # A thin torch conv validates every option exactly as torch does and gives torch's
        # initialization for the thin filter bank.
        thin = _DENSE[self._ndim](
            in_channels // B,
            out_channels // B,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = thin.kernel_size
        self.stride = thin.stride
        self.padding = thin.padding
        self.dilation = thin.dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.B = B
        self._reversed_padding_repeated_twice = list(thin._reversed_padding_repeated_twice)
        self.weight = nn.Parameter(thin.weight.data)
        self.bias = None if thin.bias is None else nn.Parameter(thin.bias.data)
        # Forward path: "auto" lets tieify.nn._paths choose per input; tieify.optimize() pins
        # the fastest measured one.
        self.path = "auto"
        self._channels_last = False

    @property
    def channels_last(self) -> bool:
        """Whether the layer computes in channels-last whatever its input's layout: an input
        laid out otherwise (NCHW) is copied to channels-last first, so the output is
        channels-last and the layers after it receive channels-last activations (a 2-D or
        3-D layer; False, the default, keeps the input's layout). The values are the same
        either way; :func:`tieify.optimize` sets it where the whole model runs faster so and
        still runs. Code after the layer that needs NCHW memory (``x.view(n, -1)`` on a
        feature map) fails on channels-last activations; ``x.reshape`` or ``flatten`` works.
        """
        return getattr(self, "_channels_last", False)  # False for a layer pickled without it

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(
                f"{type(self).__name__}.channels_last must be True or False, but got {value!r}."
            )
        if value and self._ndim == 1:
            raise ValueError(
                f"{type(self).__name__}.channels_last: a 1-D layer's (N, C, L) input has no "
                "channels-last layout; only 2-D and 3-D tied convolutions can run in it."
            )
        if value != self.channels_last:
            forget_calls(self)  # the kept eager calls return the old layout
        self._channels_last = value

    # -- construction from and to dense layers -------------------------------------------

    @classmethod
    def from_dense(cls, layer: nn.Module, B: int, transfer: str | None = "mean") -> _TiedConvNd:
        """Tie a dense or grouped convolution.

        Args:
            layer: an ``nn.Conv{N}d`` (any ``groups``, stride, padding, dilation, mode).
            B: blocks per group; must divide ``in_channels/groups`` and ``out_channels/groups``.
            transfer: ``"mean"`` keeps the least-squares projection of the dense weight (the
                mean of the tied diagonal blocks, and of the bias blocks); ``None`` initializes
                the thin filter bank afresh with torch's scheme.

        Returns:
            A tied layer with the layer's hyper-parameters, device, dtype and requires_grad.

        Example:
            >>> import torch
            >>> from tieify.nn import TiedConv2d
            >>> dense = torch.nn.Conv2d(64, 128, 3, padding=1)
            >>> tied = TiedConv2d.from_dense(dense, B=4)
            >>> tuple(tied.weight.shape)
            (32, 16, 3, 3)
        """
        dense_cls = _DENSE[cls._ndim]
        if isinstance(layer, _TiedConvNd):
            raise TypeError(
                f"{cls.__name__}.from_dense expects a dense {dense_cls.__name__}, but got an "
                f"already tied {type(layer).__name__}(B={layer.B}); call to_dense() first."
            )
        if not isinstance(layer, dense_cls):
            raise TypeError(
                f"{cls.__name__}.from_dense expects an nn.{dense_cls.__name__}, but got "
                f"{type(layer).__name__}; use the Tied layer of matching dimension."
            )
        if type(layer).forward is not dense_cls.forward:
            raise TypeError(
                f"{cls.__name__}.from_dense: {type(layer).__name__} overrides forward() (e.g. "
                "weight standardization or its own padding), which a plain tied conv would "
                "silently drop; wrap it with tieify.nn.TiedBlock(layer, B) instead."
            )
        transfer = check_transfer(transfer)
        w = layer.weight
        tied = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,  # type: ignore[arg-type]
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device=w.device,
            dtype=w.dtype,
            B=B,
        )
        weight = bias = None
        if transfer == "mean":
            weight = _transfer.mean_transfer_weight(w.detach(), B, layer.groups)
            if layer.bias is not None:
                bias = _transfer.mean_transfer_bias(layer.bias.detach(), B)
        _transfer.load_like(tied, weight, bias, layer)
        return tied

    def to_dense(self, expand: bool = False) -> nn.Module:
        """The exactly equivalent standard convolution.

        Args:
            expand: ``False`` gives the compact form, a ``groups·B``-group convolution whose
                weight is ``weight`` repeated B times; ``True`` gives a ``groups``-group
                convolution (the shape of the layer it was tied from) whose weight is
                block-diagonal inside each group, zero elsewhere.

        The returned layer owns fresh tensors (its weight is not tied any more).
        """
        groups = self.groups if expand else self.groups * self.B
        dense = _DENSE[self._ndim](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,  # type: ignore[arg-type]
            dilation=self.dilation,
            groups=groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            if expand:
                weight = _transfer.block_diagonal_weight(self.weight, self.B, self.groups)
            else:
                weight = _transfer.expand_weight(self.weight, self.B)
            bias = _transfer.expand_bias(self.bias, self.B)
        return _transfer.load_like(dense, weight, bias, self)

    # -- forward ---------------------------------------------------------------------------

    def thin_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The B-times-thinner convolution applied to an already folded input."""
        conv = _CONV_FN[self._ndim]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def _check_input(self, x: torch.Tensor) -> None:
        nd = self._ndim
        if x.dim() != nd + 2 or x.shape[1] != self.in_channels:
            spatial = ", ".join("DHW"[3 - nd :])
            raise ValueError(
                f"{type(self).__name__}(in_channels={self.in_channels}, B={self.B}) expects "
                f"input of shape (N, {self.in_channels}, {spatial}) or "
                f"({self.in_channels}, {spatial}), but got {tuple(x.shape)}; check the "
                "previous layer's output channels."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An eager inference call kept for this input's layout (the kernel path, checked
        # when it was made): first, as each call's Python costs as much as a thin layer's
        # arithmetic.
        call = kernel_call(self, x, (self.weight, self.bias))
        if call is not None:
            return call(x)
        if x.dim() == self._ndim + 1:  # unbatched, as torch's convolutions accept
            return self.forward(x.unsqueeze(0)).squeeze(0)
        self._check_input(x)
        if relays(self, x):  # to its layout (channels-last), then its kept call
            return self.forward(to_channels_last(x))
        if self.B == 1:  # nothing to fold: exactly the dense layer's computation
            return self.thin_conv(x)
        return tied_conv_forward(self, x)

    def extra_repr(self) -> str:
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}, B={B}"
        if self.padding != (0,) * len(self.padding):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        return s.format(**{**self.__dict__, "B": self.B})


class TiedConv1d(_TiedConvNd):
    """Tied Block 1-D convolution; see :class:`_TiedConvNd` for the definition.

    Example:
        >>> import torch
        >>> from tieify.nn import TiedConv1d
        >>> TiedConv1d(16, 32, 3, padding=1, B=4)(torch.randn(2, 16, 10)).shape
        torch.Size([2, 32, 10])
    """

    _ndim = 1


class TiedConv2d(_TiedConvNd):
    """Tied Block 2-D convolution (TBC; with ``groups`` > 1, TGC).

    Example:
        >>> import torch
        >>> from tieify.nn import TiedConv2d
        >>> layer = TiedConv2d(64, 64, 3, padding=1, B=4)
        >>> layer(torch.randn(1, 64, 8, 8)).shape
        torch.Size([1, 64, 8, 8])
        >>> layer.weight.numel() == 64 * 64 * 9 // 16
        True
    """

    _ndim = 2


class TiedConv3d(_TiedConvNd):
    """Tied Block 3-D convolution; see :class:`_TiedConvNd` for the definition.

    Example:
        >>> import torch
        >>> from tieify.nn import TiedConv3d
        >>> TiedConv3d(8, 8, 3, padding="same", B=2)(torch.randn(1, 8, 4, 4, 4)).shape
        torch.Size([1, 8, 4, 4, 4])
    """

    _ndim = 3
