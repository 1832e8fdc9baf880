"""A tied convolution with the batch norm, residual add and ReLU that follow it.

``conv_bn_act(x, conv, bn, residual, relu)`` computes ``relu(bn(conv(x)) + residual)`` (the
add and the ReLU where asked). Where ``conv`` runs tieify's kernel on ``x`` (the ``kernel``
path, pinned by :func:`tieify.optimize` or by the rule for a fused layer:
:func:`tieify.nn._paths.default_path` with ``fused=True``) and the call is
plain eager inference (``bn`` in eval mode, no gradient recorded), it is one kernel call whose
epilogue applies the batch norm's per-channel affine, the add and the ReLU while the product
is in registers: three fewer passes over the output. The bank stays shared (the affine is
applied after it, per channel, never folded into the weights) and the modules are not
changed. Everywhere else (training, autograd, other paths, tracing, ``torch.compile``) it
runs the modules one after the other, exactly as the unfused model.

:func:`tieify.fuse` rewrites a model's graph to call it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from . import _paths
from ._conv import _TiedConvNd

__all__ = ["add_into", "conv_bn_act", "foldable", "fusable"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DENSE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the batch norm of the same index follows


def fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``conv`` → ``bn`` can run fused (for some inputs): a tied conv with B > 1 that
    tieify's kernel computes (pointwise, or 2-D with one group and zero padding) and a plain
    batch norm over its output channels that keeps running statistics."""
    if not (isinstance(conv, _TiedConvNd) and isinstance(bn, _BATCH_NORMS)):
        return False
    return (
        conv.B > 1
        and (_paths._is_pointwise(conv) or _paths._kernel_conv(conv))
        and type(bn) in _BATCH_NORMS  # not a subclass with a forward of its own
        and bn.num_features == conv.out_channels
        and bn.track_running_stats
    )


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``conv`` → ``bn`` can run folded (in eval mode): a plain dense convolution
    (not a subclass, not transposed) and a plain batch norm of the same dimensions over its
    output channels that keeps running statistics."""
    if type(conv) not in _DENSE_CONVS or type(bn) not in _BATCH_NORMS:
        return False
    return (
        _DENSE_CONVS.index(type(conv)) == _BATCH_NORMS.index(type(bn))
        and bn.num_features == conv.out_channels
        and bool(bn.track_running_stats)
    )


def conv_bn_act(
    x: torch.Tensor,
    conv: nn.Module,
    bn: nn.Module,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """``relu(bn(conv(x)) + residual)``, fused where it can be (see the module doc)."""
    if isinstance(conv, _TiedConvNd):  # a layer that runs channels-last: its input copied so
        x = _paths.run_layout(conv, x)
        if residual is not None and _paths.is_channels_last(x):
            residual = _residual_layout(residual)
    call = _kept_call(x, conv, bn, residual, relu)
    if call is not None:
        return call(x, residual)
    if _fuses(x, conv, bn, residual):
        assert isinstance(conv, _TiedConvNd) and isinstance(bn, nn.modules.batchnorm._NormBase)
        return _fused(x, conv, bn, residual, relu)
    # A new tensor either way: the add and the ReLU may write into it, as unfused code does.
    y = _folded(x, conv, bn) if _folds(x, conv, bn) else bn(conv(x))
    if residual is not None:
        same = isinstance(residual, torch.Tensor) and residual.shape == y.shape
        y = y.add_(residual) if same and residual.dtype == y.dtype else y + residual
    return y.relu_() if relu else y


def _residual_layout(residual: Any) -> Any:
    """The residual of a chain whose conv computes on a channels-last input, as the kernel's
    epilogue reads it: its channels-last copy where it is a 4-D float32 tensor in another
    layout (the output of a layer before that runs NCHW, e.g. a dense stem), else itself.
    One pass over the residual, where the unfused chain makes three over the output."""
    if (
        type(residual) is torch.Tensor
        and residual.dim() == 4
        and residual.dtype == torch.float32
        and not _paths.is_channels_last(residual)
    ):
        return _paths.to_channels_last(residual)
    return residual


def _fuses(x: torch.Tensor, conv: nn.Module, bn: nn.Module, residual: torch.Tensor | None) -> bool:
    """Whether this call runs fused; the cheap tests first (a fallback call pays for them)."""
    if bn.training or not isinstance(conv, _TiedConvNd) or not _paths._plain_eager(x):
        return False
    if x.dim() != conv._ndim + 2 or x.shape[1] != conv.in_channels or conv.B == 1:
        return False
    if not _paths.is_channels_last(x):  # the epilogue is the channels-last kernel's
        return False
    if _paths.select_path(conv, x, fused=True) != "kernel" or not fusable(conv, bn):
        return False
    if _chain_records(x, conv, bn, residual):
        return False
    if residual is not None:
        if not (isinstance(residual, torch.Tensor) and residual.dtype == torch.float32):
            return False
        # The output's shape, channels-last like the output.
        out_shape = (x.shape[0], conv.out_channels, *_paths.output_size(conv, x))
        if tuple(residual.shape) != out_shape or not _paths.is_channels_last(residual):
            return False
    return bn.running_var is not None


def _chain_records(
    x: torch.Tensor, conv: nn.Module, bn: nn.Module, residual: torch.Tensor | None = None
) -> bool:
    """Whether autograd records the chain's call. Grad mode first: gathering the modules'
    parameters took 6 µs a call, more than the chain's other tests together; the folded dense
    chains of MobileNetV3-Large (46 a forward, batch 1) ran 5-7% faster for it."""
    return torch.is_grad_enabled() and _paths._records(
        (x, *conv.parameters(), *bn.parameters(), residual)
    )


def _folds(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> bool:
    """Whether this call runs a dense conv on its weights with the batch norm folded in:
    plain eager inference (the batch norm in eval mode, no gradient recorded for the
    modules' parameters or the input)."""
    if bn.training or not foldable(conv, bn) or not _paths._plain_eager(x):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    return not _chain_records(x, conv, bn)


def _folded(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))`` as one convolution on the folded weights, kept for ``conv`` while
    its parameters and the batch norm's statistics are the same tensors at the same
    versions (:func:`tieify.nn._paths.kept`)."""
    assert isinstance(conv, nn.modules.conv._ConvNd)
    assert isinstance(bn, nn.modules.batchnorm._NormBase)
    assert bn.running_mean is not None and bn.running_var is not None
    mean, var = bn.running_mean, bn.running_var
    tensors = (conv.weight, conv.bias, mean, var, bn.weight, bn.bias)

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, mean, var, bn.eps, bn.weight, bn.bias)
        return w.detach(), b.detach()

    present = tuple(t for t in tensors if t is not None)
    weight, bias = _paths.kept(conv, ("folded", id(bn), bn.eps), present, fold)
    return conv._conv_forward(x, weight, bias)  # type: ignore[operator]


def _tensors(
    conv: _TiedConvNd, bn: nn.modules.batchnorm._NormBase
) -> tuple[torch.Tensor | None, ...]:
    """What a fused call is made from: the conv's parameters and the batch norm's."""
    return (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)


def _extra(bn: nn.Module, residual: torch.Tensor | None, relu: bool) -> tuple[Any, ...]:
    """A fused call's key beyond the input's layout (:func:`tieify.nn._paths.kernel_call`)."""
    layout = (
        None
        if residual is None
        else (residual.shape, residual.stride(), residual.dtype, residual.device.type)
    )
    return ("fused", id(bn), bn.eps, relu, layout)


def _kept_call(
    x: torch.Tensor,
    conv: nn.Module,
    bn: nn.Module,
    residual: torch.Tensor | None,
    relu: bool,
) -> Any:
    """The fused call kept for an input and residual laid out like these, where it holds
    (see :func:`tieify.nn._paths.kernel_call`; the tests :func:`_fuses` makes on every call
    depend only on what its key and tensors fix, but for the batch norm's mode)."""
    if not (isinstance(conv, _TiedConvNd) and isinstance(bn, nn.modules.batchnorm._NormBase)):
        return None
    if bn.training or not bn.track_running_stats:
        return None
    if residual is not None and type(residual) is not torch.Tensor:
        return None
    extra = _extra(bn, residual, relu)
    return _paths.kernel_call(conv, x, _tensors(conv, bn), extra, residual)


def add_into(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, written into ``a`` where that gives the same tensor: the in-place add of code
    like ``out = self.bn(...); out += identity``, which a torch.fx trace records as ``out +
    identity`` (a new tensor, one more allocation and pass over memory per residual block).
    :func:`tieify.fuse` calls it only where ``a`` is a batch norm's output that nothing else
    uses; it still adds out of place where autograd records, where the sum would broadcast
    beyond ``a`` or change its dtype, and under tracing."""
    if (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and _paths._plain_eager(a)
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and a.dtype == torch.result_type(a, b)
        and (a.shape == b.shape or a.shape == torch.broadcast_shapes(a.shape, b.shape))
    ):  # equal shapes first: torch.broadcast_shapes costs ~13 µs of Python
        return a.add_(b)
    return a + b


def _affine(conv: _TiedConvNd, bn: nn.modules.batchnorm._NormBase) -> tuple[torch.Tensor, ...]:
    """The batch norm's scale and shift per output channel, shaped (B, C_out/B), with the
    conv's (shared) bias folded into the shift."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    if conv.bias is not None:
        shift = shift + scale * conv.bias.float().repeat(conv.B)
    o = conv.out_channels // conv.B
    return scale.reshape(conv.B, o).contiguous(), shift.reshape(conv.B, o).contiguous()


def _fused(
    x: torch.Tensor,
    conv: _TiedConvNd,
    bn: nn.modules.batchnorm._NormBase,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    stats = [t for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if t is not None]
    if conv.bias is not None:
        stats.append(conv.bias)
    scale, shift = _paths.kept(
        bn, ("affine", id(conv), bn.eps), tuple(stats), lambda: _affine(conv, bn)
    )
    epilogue = {"scale": scale, "shift": shift, "relu": relu}
    extra = _extra(bn, residual, relu)
    call = _paths.prepare_kernel_call(
        conv, x, _tensors(conv, bn), extra, None, residual, **epilogue
    )  # the conv's bias is in the shift
    if call is not None:
        return call(x, residual)
    res = None if residual is None else _paths.channels_inner(residual).contiguous()
    # The conv's bias is in the shift: none given to the kernel.
    if not _paths._is_pointwise(conv):
        return _paths.kernel_conv_call(conv, x, None, residual=res, **epilogue)
    a, unfold = _paths.kernel_rows(conv, x)
    res = None if res is None else res.view(-1, conv.out_channels // conv.B)
    return unfold(_paths.kernel_pointwise_call(conv, a, None, residual=res, **epilogue))
