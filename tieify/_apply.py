"""Apply a :class:`~tieify.Plan`: swap modules, parametrize functional weights, add mixers.

- ``conv`` / ``grouped_conv`` / ``linear`` layers become :class:`~tieify.nn.TiedConv2d` (etc.)
  or :class:`~tieify.nn.TiedLinear` through ``from_dense`` (B applies inside existing groups).
- ``groups`` (Deep Roots) turns a dense conv into a G-group conv keeping the diagonal group
  blocks of the weight; with B as well, the grouped conv is then tied (TGC).
- ``conv_subclass`` / ``linear_subclass`` (their own forward) are wrapped in
  :class:`~tieify.nn.TiedBlock`, which keeps their maths.
- ``functional_conv`` / ``functional_linear`` (``F.conv2d(x, self.weight, ...)`` inside some
  module's forward): the parameter is replaced by a parametrization that builds the
  block-diagonal dense weight from a B²-smaller tied parameter. Outputs are exactly those of
  the tied layer; parameters drop B² but the call still runs dense (multiply-adds unchanged).
- ``mixer``: :class:`Mixed` wraps the tied layer and a 1×1 layer (DESIGN §1).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._errors import PlanError
from ._trace import qualname
from .nn import TiedBlock, TiedConv1d, TiedConv2d, TiedConv3d, TiedLinear, _transfer

if TYPE_CHECKING:
    from ._plan import LayerPlan, Plan

__all__ = ["apply_plan", "Mixed", "group_conv"]

_TIED_CONV: dict[int, Any] = {1: TiedConv1d, 2: TiedConv2d, 3: TiedConv3d}
_CONV: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Mixed(nn.Module):
    """A tied layer followed by a mixer that re-fuses its B output blocks.

    ``mode="concat"``: a dense 1×1 layer ``C_out -> C_out`` on the concatenated outputs,
    initialised to the identity (so the mixed layer first computes exactly the tied one).
    ``mode="sum"``: the B output blocks are summed (``C_out/B`` channels) and a 1×1 layer
    ``C_out/B -> C_out`` maps them back (torch's default initialisation).

    Example:
        >>> import torch
        >>> from tieify.nn import TiedConv2d
        >>> m = Mixed(TiedConv2d(8, 8, 3, padding=1, B=4), "sum")
        >>> m(torch.randn(1, 8, 5, 5)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(self, layer: nn.Module, mode: str) -> None:
        super().__init__()
        if mode not in ("concat", "sum"):
            raise ValueError(f"Mixed: `mode` must be 'concat' or 'sum', but got {mode!r}.")
        self.layer = layer
        self.mode = mode
        self.B = int(layer.B)  # type: ignore[arg-type]
        linear = isinstance(layer, TiedLinear) or (
            isinstance(layer, TiedBlock) and isinstance(layer.module, nn.Linear)
        )
        out = int(getattr(layer, "out_features", getattr(layer, "out_channels", 0)))
        self.out_channels = out
        self._dim = -1 if linear else 1
        w = next(layer.parameters())
        cin = out if mode == "concat" else out // self.B
        if linear:
            self.mixer: nn.Module = nn.Linear(cin, out, bias=False, device=w.device, dtype=w.dtype)
        else:
            nd = w.dim() - 2
            self.mixer = _CONV[nd](cin, out, 1, bias=False, device=w.device, dtype=w.dtype)
        if mode == "concat":
            weight: Any = self.mixer.weight
            with torch.no_grad():
                eye = torch.eye(out, device=w.device, dtype=w.dtype)
                weight.copy_(eye.reshape(weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if self.mode == "sum":
            dim = self._dim if self._dim == -1 else 1
            y = torch.stack(y.chunk(self.B, dim=dim), dim=0).sum(dim=0)
        return self.mixer(y)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, B={self.B}"


def group_conv(layer: Any, groups: int, transfer: str | None = "mean") -> nn.Module:
    """A ``groups``-group copy of a dense conv (Deep Roots root module's spatial conv).

    With ``transfer="mean"`` the diagonal group blocks of the dense weight are kept (the
    least-squares projection onto block-diagonal weights); ``None`` initialises afresh.
    """
    nd = len(layer.kernel_size)  # type: ignore[arg-type]
    w = layer.weight
    new = _CONV[nd](
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )
    if transfer == "mean":
        with torch.no_grad():
            blocks = _transfer.diagonal_blocks(w.detach(), groups, 1)
            new.weight.copy_(blocks.reshape(new.weight.shape))
            if layer.bias is not None:
                new.bias.copy_(layer.bias.detach())
    new.train(layer.training)
    return new


class _TiedWeight(nn.Module):
    """Parametrization: dense (block-diagonal) weight from a tied one."""

    def __init__(self, B: int, groups: int, linear: bool) -> None:
        super().__init__()
        self.B, self.groups, self.linear = B, groups, linear

    def forward(self, thin: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return _transfer.expand_linear_weight(thin, self.B)
        return _transfer.scatter_blocks(_transfer.expand_weight(thin, self.B), self.B, self.groups)

    def right_inverse(self, dense: torch.Tensor) -> torch.Tensor:
        return _transfer.mean_transfer_weight(dense, self.B, self.groups)


class _TiedBias(nn.Module):
    def __init__(self, B: int) -> None:
        super().__init__()
        self.B = B

    def forward(self, thin: torch.Tensor) -> torch.Tensor:
        return thin.repeat(self.B)

    def right_inverse(self, dense: torch.Tensor) -> torch.Tensor:
        return _transfer.mean_transfer_bias(dense, self.B)


def _owner(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    path, _, attr = target.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        raise PlanError(
            f"the plan ties parameter {target!r}, but the model has no module {path!r}; "
            "apply the plan to the architecture it was made for."
        ) from None
    return owner, attr


def _tie_functional(model: nn.Module, lp: LayerPlan, transfer: str | None) -> None:
    if lp.weight_target is None:
        raise PlanError(f"plan layer {lp.name!r} is functional but names no weight parameter.")
    owner, attr = _owner(model, lp.weight_target)
    w = getattr(owner, attr, None)
    expected = (lp.out_channels, lp.in_channels // lp.groups, *lp.kernel_size)
    if not isinstance(w, nn.Parameter) or tuple(w.shape) != expected:
        raise PlanError(
            f"plan layer {lp.name!r} expects parameter {lp.weight_target!r} of shape "
            f"{expected}, but the model has {None if w is None else tuple(w.shape)}."
        )
    linear = lp.kind == "functional_linear"
    parametrize.register_parametrization(
        owner, attr, _TiedWeight(lp.B, lp.groups, linear), unsafe=True
    )
    original = getattr(owner.parametrizations, attr).original
    if transfer is None:
        with torch.no_grad():
            fan_in = original[0].numel()
            bound = 1.0 / max(fan_in, 1) ** 0.5
            original.uniform_(-bound, bound)
    if lp.bias_target is not None:
        bowner, battr = _owner(model, lp.bias_target)
        parametrize.register_parametrization(bowner, battr, _TiedBias(lp.B), unsafe=True)


def _check_module(lp: LayerPlan, module: nn.Module) -> None:
    mtype = qualname(module)
    if mtype != lp.module_type:
        raise PlanError(
            f"plan layer {lp.name!r} expects a {lp.module_type}, but the model has {mtype} "
            "there; apply the plan to the architecture it was made for."
        )
    cin = getattr(module, "in_channels", getattr(module, "in_features", None))
    cout = getattr(module, "out_channels", getattr(module, "out_features", None))
    groups = getattr(module, "groups", 1)
    if (cin, cout, groups) != (lp.in_channels, lp.out_channels, lp.orig_groups):
        raise PlanError(
            f"plan layer {lp.name!r} expects in={lp.in_channels}, out={lp.out_channels}, "
            f"groups={lp.orig_groups}, but the model's layer has in={cin}, out={cout}, "
            f"groups={groups}; re-create the plan for this model."
        )


def build_layer(lp: LayerPlan, module: nn.Module, transfer: str | None) -> nn.Module:
    """The replacement module for one planned layer (``module`` is not modified)."""
    if lp.kind in ("conv_subclass", "linear_subclass"):
        if lp.groups != lp.orig_groups:
            raise PlanError(
                f"plan layer {lp.name!r}: groups cannot be changed on {lp.module_type} (its own "
                "forward); only B (TiedBlock)."
            )
        new: nn.Module = TiedBlock(module, lp.B, transfer=transfer)
    elif lp.kind == "linear":
        new = TiedLinear.from_dense(module, lp.B, transfer=transfer) if lp.B > 1 else module
    elif lp.kind in ("conv", "grouped_conv"):
        base = module
        if lp.groups != lp.orig_groups:
            if lp.orig_groups != 1:
                raise PlanError(
                    f"plan layer {lp.name!r}: only dense convs can be grouped, but it has "
                    f"{lp.orig_groups} groups."
                )
            base = group_conv(module, lp.groups, transfer)
        nd = len(lp.kernel_size)
        new = _TIED_CONV[nd].from_dense(base, lp.B, transfer=transfer) if lp.B > 1 else base
    else:
        raise PlanError(f"plan layer {lp.name!r}: kind {lp.kind!r} cannot be tied.")
    if lp.mixer is not None and lp.B > 1:
        new = Mixed(new, lp.mixer)
    return new


def apply_plan(plan: Plan, model: nn.Module, inplace: bool = False) -> nn.Module:
    """Rewrite ``model`` by ``plan``; a deep copy unless ``inplace``. See :meth:`Plan.apply`."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Plan.apply expects an nn.Module, but got {type(model).__name__}; pass the model "
            "the plan was made for."
        )
    if not isinstance(inplace, bool):
        raise TypeError(f"`inplace` must be a bool, but got {inplace!r}.")
    # Outside inference_mode even when called inside it: tensors made there have no version
    # counter and cannot take part in autograd, so the tied model could not be trained and
    # its layers could keep nothing between calls.
    with torch.inference_mode(False):
        return _apply_plan(plan, model, model if inplace else copy.deepcopy(model))


def _apply_plan(plan: Plan, model: nn.Module, target: nn.Module) -> nn.Module:
    for lp in plan.layers:
        if lp.action == "leave":
            continue
        if lp.kind in ("functional_conv", "functional_linear"):
            _tie_functional(target, lp, plan.transfer)
            continue
        try:
            module = target.get_submodule(lp.name) if lp.name else target
        except AttributeError:
            raise PlanError(
                f"plan layer {lp.name!r} is not a module of {type(model).__name__}; apply the "
                f"plan to the architecture it was made for ({plan.model_type})."
            ) from None
        _check_module(lp, module)
        new = build_layer(lp, module, plan.transfer)
        if not lp.name:
            target = new
            continue
        parent_name, _, attr = lp.name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, attr, new)
    object.__setattr__(target, "tieify_plan", plan)
    return target
