"""Public entry points: :func:`plan` (decide, change nothing) and :func:`tieify` (rewrite)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._attention import detect_attention
from ._errors import TieError
from ._modes import eval_mode
from ._plan import LayerPlan, Plan
from ._spec import Match, Patterns, Spec, nearest
from ._trace import Layer, discover, qualname

__all__ = ["tieify", "plan"]

_ROLE_TEXT = {
    "stem": "stem (reads the model input): left dense by default; name it in a B mapping to tie it",
    "head": "final classifier: left dense by default; name it in a B mapping to tie it",
}


def _check_options(
    transfer: object, mixer: object, strict: object, nearest_B: object, inplace: object
) -> None:
    if transfer not in ("mean", None):
        raise ValueError(
            f"`transfer` must be 'mean' or None, but got {transfer!r}; 'mean' keeps the "
            "least-squares projection of the dense weights, None initialises afresh."
        )
    if mixer not in (None, "concat", "sum"):
        raise ValueError(
            f"`mixer` must be None, 'concat' or 'sum', but got {mixer!r} (DESIGN §1: concat = "
            "1x1 C_out->C_out after the tied layer; sum = blocks summed, then 1x1 C_out/B->C_out)."
        )
    for name, v in (("strict", strict), ("nearest_B", nearest_B), ("inplace", inplace)):
        if not isinstance(v, bool):
            raise TypeError(f"`{name}` must be a bool, but got {v!r}.")


def _divisors_common(a: int, b: int) -> list[int]:
    return [d for d in range(1, min(a, b) + 1) if a % d == 0 and b % d == 0]


def _leave(layer: Layer, reason: str, **kw: Any) -> LayerPlan:
    return _layer_plan(layer, "leave", 1, layer.orig_groups, None, reason, **kw)


def _layer_plan(
    layer: Layer,
    action: str,
    B: int,
    groups: int,
    mixer: str | None,
    reason: str,
    depth: int = -1,
) -> LayerPlan:
    return LayerPlan(
        name=layer.name,
        kind=layer.kind,
        action=action,
        B=B,
        groups=groups,
        orig_groups=layer.orig_groups,
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel_size=layer.kernel_size,
        module_type=layer.module_type,
        attention=layer.attention,
        branch=layer.branch,
        stage=layer.stage,
        depth=depth,
        mixer=mixer,
        reason=reason,
        role=layer.role,
        tieable=layer.tieable,
        weight_target=layer.weight_target,
        bias_target=layer.bias_target,
    )


def _channels(layer: Layer) -> str:
    return (
        f"in_channels={layer.in_channels}, out_channels={layer.out_channels}, "
        f"groups={layer.orig_groups}"
    )


class _Decider:
    def __init__(
        self,
        model: nn.Module,
        B: Spec,
        groups: Spec,
        attention_B: Spec,
        include: Patterns,
        exclude: Patterns,
        mixer: str | None,
        strict: bool,
        nearest_B: bool,
    ) -> None:
        self.model = model
        self.B, self.groups, self.attention_B = B, groups, attention_B
        self.include, self.exclude = include, exclude
        self.mixer, self.strict, self.nearest_B = mixer, strict, nearest_B

    def _module(self, layer: Layer) -> nn.Module | None:
        if layer.module is not None or layer.weight_target is None:
            return layer.module
        owner = layer.weight_target.rpartition(".")[0]
        return self.model.get_submodule(owner) if owner else self.model

    def _fail(self, layer: Layer, message: str) -> str:
        if self.strict:
            raise TieError(f"layer {layer.name!r} ({_channels(layer)}): {message}.")
        return message

    def decide(self, layer: Layer, depth: int) -> LayerPlan:
        name, module = layer.name, self._module(layer)
        bm = self.B.lookup(name, module)
        if layer.attention is not None and self.attention_B.kind != "none":
            am = self.attention_B.lookup(name, module)
            if am.matched:
                bm = Match(True, am.value, True, f"attention_B {am.source}")
        gm = self.groups.lookup(name, module)
        b_req = bm.value if bm.matched else None
        g_req = gm.value if gm.matched else None
        wants = (b_req or 1) > 1 or (g_req is not None and g_req != layer.orig_groups)
        explicit = (bm.explicit and (b_req or 1) > 1) or (gm.explicit and g_req is not None)
        if not layer.tieable:
            if wants and explicit:
                self._fail(layer, f"{layer.kind} was named explicitly but {layer.reason}")
            return _leave(layer, layer.reason, depth=depth)
        p = self.exclude.first_match(name)
        if p is not None:
            return _leave(layer, f"excluded by exclude pattern {p!r}", depth=depth)
        if self.include.items is not None and self.include.first_match(name) is None:
            return _leave(layer, f"not matched by include={list(self.include.items)}", depth=depth)
        if layer.role in _ROLE_TEXT and wants and not explicit:
            return _leave(layer, _ROLE_TEXT[layer.role], depth=depth)

        notes: list[str] = []
        problems: list[str] = []
        g_target = layer.orig_groups
        if g_req is not None and g_req != layer.orig_groups:
            spatial = any(k > 1 for k in layer.kernel_size)
            if layer.kind != "conv":
                if gm.explicit:
                    problems.append(
                        f"groups={g_req} applies to dense convolutions, not {layer.kind}"
                    )
            elif not spatial and not gm.explicit:
                notes.append(
                    "1x1 conv kept dense: groups= applies to spatial convs unless named explicitly"
                )
            elif layer.in_channels % g_req or layer.out_channels % g_req:
                valid = _divisors_common(layer.in_channels, layer.out_channels)
                problems.append(
                    self._fail(
                        layer,
                        f"groups={g_req} must divide in and out channels; valid groups: {valid}",
                    )
                )
            else:
                g_target = g_req
        b_target = 1
        if b_req is not None and b_req > 1:
            cin, cout = layer.in_channels // g_target, layer.out_channels // g_target
            valid = _divisors_common(cin, cout)
            if b_req in valid:
                b_target = b_req
            elif self.nearest_B:
                b_target = nearest(b_req, valid)
                notes.append(f"B={b_req} does not divide {cin}->{cout}; nearest valid B={b_target}")
            else:
                per = " per group" if g_target > 1 else ""
                problems.append(
                    self._fail(
                        layer,
                        f"B={b_req} must divide the input and output channels{per} "
                        f"({cin}->{cout}); valid B: {valid} (or pass nearest_B=True)",
                    )
                )
        if b_target > 1 and g_target != layer.orig_groups:
            action = "tie+group"
        elif b_target > 1:
            action = "tie"
        elif g_target != layer.orig_groups:
            action = "group"
        else:
            action = "leave"
        if action == "leave" and not problems:
            if b_req == 1:
                problems.append("B=1: nothing to tie")
            elif self.B.kind == "none":
                problems.append("B=None: tie nothing")
            elif bm.matched:
                problems.append(f"B is None ({bm.source})")
            else:
                problems.append(f"no pattern of B matches ({self.B.patterns()})")
            if gm.matched and g_req == layer.orig_groups:
                problems.append(f"groups={g_req} (its own groups)")
            elif gm.matched and g_req is None:
                problems.append(f"groups is None ({gm.source})")
        mixer = self.mixer if b_target > 1 else None
        if mixer is not None and layer.kind.startswith("functional"):
            notes.append("mixer not added to a functional call")
            mixer = None
        if layer.kind.startswith("functional") and action != "leave":
            notes.append(
                "tied through a weight parametrization: parameters drop B^2, the call still "
                "runs dense (multiply-adds unchanged)"
            )
        reason = "; ".join(problems + notes)
        return _layer_plan(layer, action, b_target, g_target, mixer, reason, depth=depth)


def plan(
    model: nn.Module,
    B: Any = 4,
    *,
    groups: Any = None,
    example_inputs: Any = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    attention_B: Any = None,
    mixer: str | None = None,
    transfer: str | None = "mean",
    strict: bool = False,
    nearest_B: bool = False,
    use_fx: bool = True,
) -> Plan:
    """Decide, per layer, whether to tie it (B), group it (G) or leave it (with a reason).

    Nothing is changed. The model is traced with torch.fx (timm's leaf registries when timm is
    installed) to find layers in forward order, the stem, the classifier head and attention
    branches; when tracing fails, the modules are walked instead (``Plan.traced`` is False).

    Args:
        model: the model (not modified).
        B: tied blocks: an int, a mapping of glob patterns to ints or None (most specific
            pattern wins; see :mod:`tieify._spec`), a callable ``(name, module) -> int | None``,
            or None (tie nothing).
        groups: target groups for dense convs (Deep Roots), same forms as ``B``; an int or a
            wildcard applies to spatial (k>1) convs only.
        example_inputs: accepted for symmetry with :func:`tieify` (which uses it to check the
            rewritten model); planning does not run the model.
        include: glob pattern(s); only matching layers are considered.
        exclude: glob pattern(s); matching layers are left.
        attention_B: B for layers inside SE / GC / CBAM branches (same forms as ``B``);
            default: the layer's B.
        mixer: None, ``"concat"`` or ``"sum"`` (DESIGN §1).
        transfer: ``"mean"`` (least-squares projection of the trained weights) or None.
        strict: raise :class:`~tieify.TieError` naming the layer and its channels when a
            requested layer cannot be tied, instead of leaving it with a reason.
        nearest_B: when B does not divide a layer's channels, use the nearest valid B.
        use_fx: False skips tracing and walks the modules.

    Returns:
        A :class:`~tieify.Plan`; ``print`` it for one row per layer.

    Example:
        >>> import torch, tieify
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 16, 3), torch.nn.Conv2d(16, 30, 1),
        ...     torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(30, 10))
        >>> [(lp.name, lp.action) for lp in tieify.plan(net, B=4).layers]
        [('0', 'leave'), ('1', 'tie'), ('2', 'leave'), ('5', 'leave')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"tieify expects a torch.nn.Module, but got {type(model).__name__}; build the "
            "model first (e.g. torchvision.models.resnet50())."
        )
    _check_options(transfer, mixer, strict, nearest_B, False)
    decider = _Decider(
        model,
        Spec(B, "B"),
        Spec(groups, "groups"),
        Spec(attention_B, "attention_B"),
        Patterns(include, "include"),
        Patterns(exclude, "exclude"),
        mixer,
        strict,
        nearest_B,
    )
    found = discover(model, use_fx=use_fx)
    notes = list(found.notes)
    notes += detect_attention(model, found.layers, found.graph)
    layers = []
    depth = 0
    for layer in found.layers:
        d = -1
        if layer.tieable:
            d, depth = depth, depth + 1
        layers.append(decider.decide(layer, d))
    return Plan(
        layers=tuple(layers),
        model_type=qualname(model),
        transfer=transfer,
        traced=found.traced,
        notes=tuple(notes),
    )


def _run(model: nn.Module, example_inputs: Any) -> Any:
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with eval_mode(model), torch.no_grad():
        return model(*args)


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return (
            type(out)(_shapes(v) for v in out)
            if not hasattr(out, "_fields")
            else tuple(_shapes(v) for v in out)
        )
    return type(out).__name__


def tieify(
    model: nn.Module,
    B: Any = 4,
    *,
    groups: Any = None,
    example_inputs: Any = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    attention_B: Any = None,
    mixer: str | None = None,
    transfer: str | None = "mean",
    strict: bool = False,
    inplace: bool = False,
    nearest_B: bool = False,
    use_fx: bool = True,
) -> nn.Module:
    """Rewrite ``model`` into a Tied Block Convolution network (a copy unless ``inplace``).

    Same arguments as :func:`plan`, plus ``inplace``. When ``example_inputs`` is given, the
    original and the rewritten model are run once (eval mode, no grad) and their output shapes
    compared. The result carries its plan as ``tied.tieify_plan`` (see :func:`tieify.report`,
    :func:`tieify.save`).

    Raises:
        TieError: ``strict=True`` and a requested layer cannot be tied; or the output shapes
            differ on ``example_inputs``.
        SpecError: a malformed ``B`` / ``groups`` / ``include`` / ``exclude``.

    Example:
        >>> import torch, torchvision, tieify
        >>> model = torchvision.models.resnet18()
        >>> tied = tieify.tieify(model, B={"layer4.*": 8, "*": 4})
        >>> tied.layer4[0].conv2.B, tied.layer1[0].conv1.B
        (8, 4)
        >>> type(model.layer1[0].conv1).__name__  # the original is untouched
        'Conv2d'
    """
    _check_options(transfer, mixer, strict, nearest_B, inplace)
    p = plan(
        model,
        B,
        groups=groups,
        example_inputs=example_inputs,
        include=include,
        exclude=exclude,
        attention_B=attention_B,
        mixer=mixer,
        transfer=transfer,
        strict=strict,
        nearest_B=nearest_B,
        use_fx=use_fx,
    )
    expected = _shapes(_run(model, example_inputs)) if example_inputs is not None else None
    tied = p.apply(model, inplace=inplace)
    if expected is not None:
        got = _shapes(_run(tied, example_inputs))
        if got != expected:
            raise TieError(
                f"the rewritten model's outputs have shapes {got}, but the original's have "
                f"{expected}; please report this with the plan (print(tied.tieify_plan))."
            )
    return tied
