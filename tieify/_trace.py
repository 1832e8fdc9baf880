"""Find the layers of a model: torch.fx tracing, with a module walk as fallback.

:func:`discover` returns one :class:`Layer` per convolution / linear layer (module or
functional call on module-owned parameters) with what the planner needs: kind, channels,
forward order, stage, role (stem / head) and, when the model traced, the fx graph for
attention detection. timm models trace with timm's own leaf-module and autowrap registries.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Layer", "Discovery", "discover", "trace", "classify"]

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_DENSE_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_FUNCTIONAL_CONV: dict[Any, int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_FUNCTIONAL_LINEAR = {F.linear}
_KNOWN_OTHER = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm)
_SIZE_METHODS = {"size", "dim", "numel", "type", "get_device"}


@dataclass
class Layer:
    """One layer found in the model (mutable while planning; the plan holds the result)."""

    name: str
    module: nn.Module | None
    kind: str
    in_channels: int
    out_channels: int
    orig_groups: int
    kernel_size: tuple[int, ...]
    module_type: str
    tieable: bool = True
    reason: str = ""
    depth: int = -1
    role: str | None = None
    stage: str | None = None
    called: bool = True
    attention: str | None = None
    branch: str | None = None
    weight_target: str | None = None  # functional layers: qualified weight parameter
    bias_target: str | None = None
    nodes: list[Any] = field(default_factory=list)


@dataclass
class Discovery:
    layers: list[Layer]
    graph: fx.Graph | None
    traced: bool
    notes: list[str]


def qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


_LAZY_REASON = "lazy module with uninitialized parameters: run the model once first; left dense"


def _lazy(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and bool(
        module.has_uninitialized_params()
    )


def _tied_types() -> tuple[type, ...]:
    from ._apply import Mixed
    from .nn import TIED_TYPES

    return (*TIED_TYPES, Mixed)


def classify(name: str, module: nn.Module) -> Layer | None:
    """A :class:`Layer` for a conv / linear module, or None for any other module."""
    mtype = qualname(module)
    if isinstance(module, _tied_types()):
        B = int(getattr(module, "B", 1))
        inner = getattr(module, "layer", module)
        cin = int(getattr(inner, "in_channels", getattr(inner, "in_features", 1)))
        cout = int(getattr(inner, "out_channels", getattr(inner, "out_features", 1)))
        return Layer(
            name, module, "tied", cin, cout, 1, (), mtype, False,
            f"already tied ({type(module).__name__}, B={B}); left as it is",
        )  # fmt: skip
    if isinstance(module, nn.modules.conv._ConvNd):
        if _lazy(module):
            return Layer(name, module, "conv", 1, 1, 1, (), mtype, False, _LAZY_REASON)
        cin, cout, g = module.in_channels, module.out_channels, module.groups
        ks = tuple(int(k) for k in module.kernel_size)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return Layer(
                name, module, "transposed_conv", cin, cout, g, ks, mtype, False,
                "transposed convolution: the tied layers do not support it; left dense",
            )  # fmt: skip
        if g > 1 and g == cin:
            return Layer(
                name, module, "depthwise_conv", cin, cout, g, ks, mtype, False,
                "depthwise conv (one input channel per group): nothing to tie",
            )  # fmt: skip
        if not isinstance(module, _DENSE_CONV) or type(module).forward not in _CONV_FORWARDS:
            return Layer(name, module, "conv_subclass", cin, cout, g, ks, mtype)
        return Layer(name, module, "grouped_conv" if g > 1 else "conv", cin, cout, g, ks, mtype)
    if isinstance(module, nn.Linear):
        if _lazy(module):
            return Layer(name, module, "linear", 1, 1, 1, (), mtype, False, _LAZY_REASON)
        kind = "linear" if type(module).forward is nn.Linear.forward else "linear_subclass"
        return Layer(name, module, kind, module.in_features, module.out_features, 1, (), mtype)
    weight = module._parameters.get("weight")
    if (
        isinstance(weight, torch.Tensor)
        and weight.dim() >= 2
        and not isinstance(module, _KNOWN_OTHER)
        and not type(module).__module__.startswith("torch.nn.")
    ):
        cin_attr = getattr(module, "in_channels", None)
        cout_attr = getattr(module, "out_channels", None)
        if (
            isinstance(cin_attr, int)
            and isinstance(cout_attr, int)
            and min(cin_attr, cout_attr) > 0
        ):
            cin, cout = cin_attr, cout_attr
        else:
            cin, cout = int(weight.shape[-1]), int(weight.shape[0])
        return Layer(
            name, module, "other", cin, cout, 1, (), mtype, False,
            f"{type(module).__name__} is not a conv/linear layer tieify can tie (e.g. "
            "per-sample expert weights); left dense",
        )  # fmt: skip
    return None


_STAGE_PART = re.compile(r"^(layer|stage|block|res|conv|dense)_?\d+$")
_STAGE_PARENT = {"stages", "layers", "blocks", "features", "stage", "trunk", "levels"}


def stage_of(name: str) -> str | None:
    """The stage a layer belongs to, from its qualified name (None when unknown).

    Example:
        >>> stage_of("layer3.1.conv2"), stage_of("stages.2.blocks.0.conv"), stage_of("fc")
        ('layer3', 'stages.2', None)
    """
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in _STAGE_PARENT and i + 1 < len(parts) - 1 and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
        if _STAGE_PART.match(p):
            return ".".join(parts[: i + 1])
    return None


def _opaque_parent(name: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The nearest ancestor that is a non-container torch.nn module (its forward is opaque)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = modules.get(".".join(parts[:i]))
        if parent is None or isinstance(parent, _CONTAINERS):
            continue
        if type(parent).__module__.startswith("torch.nn."):
            return parent
    return None


# -- tracing ----------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Keeps every conv / linear (and subclass), every torch.nn module and timm's registered
    leaf modules as leaves."""

    def __init__(self, leaves: tuple[type, ...], autowrap: tuple[Any, ...]) -> None:
        super().__init__(autowrap_functions=autowrap)
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, *_tied_types())):
            return True
        if self._leaves and isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _timm_registries(model: nn.Module) -> tuple[tuple[type, ...], tuple[Any, ...]]:
    uses_timm = "timm" in sys.modules or any(
        type(m).__module__.startswith("timm.") for m in model.modules()
    )
    if not uses_timm:
        return (), ()
    try:
        import timm.models  # noqa: F401  (registers the models' leaf modules)
        from timm.layers import _fx
    except Exception:  # timm missing or broken: trace with torch's defaults
        return (), ()
    leaves = tuple(m for m in _fx.get_notrace_modules() if isinstance(m, type))
    autowrap = tuple(f for f in _fx.get_notrace_functions() if callable(f))
    return leaves, autowrap


def trace(model: nn.Module) -> tuple[fx.Graph | None, str]:
    """Symbolically trace ``model`` (in its current mode); ``(graph, "")`` or ``(None, why)``."""
    leaves, autowrap = _timm_registries(model)
    tracer = _Tracer(leaves, autowrap)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model)
    except Exception as err:  # fx raises many kinds; the plan records why
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return None, f"{type(err).__name__}: {first[:200]}"
    return graph, ""


# -- discovery ----------------------------------------------------------------------------


def _arg(node: fx.Node, index: int, key: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _resolve_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _param_source(node: Any) -> fx.Node | None:
    """The get_attr node a weight argument was computed from (through one-input ops)."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 20:
        if node.op == "get_attr":
            return node
        inputs = [a for a in node.all_input_nodes]
        if not inputs:
            return None
        node = inputs[0]
        seen += 1
    return None


def _functional_layer(model: nn.Module, graph: fx.Graph, node: fx.Node) -> Layer:
    nd = _FUNCTIONAL_CONV.get(node.target)  # type: ignore[call-overload]
    is_conv = nd is not None
    kind = "functional_conv" if is_conv else "functional_linear"
    fname = f"F.conv{nd}d" if is_conv else "F.linear"
    name = f"fx:{node.name}"
    weight = _arg(node, 1, "weight")
    bias = _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1) if is_conv else 1
    src = _param_source(weight)
    p = _resolve_attr(model, src.target) if src is not None else None  # type: ignore[arg-type]
    if not isinstance(p, torch.Tensor) or p.dim() < 2:
        return Layer(
            name, None, kind, 1, 1, 1, (), fname, False,
            f"{fname} call whose weight is not a module parameter: left dense",
        )  # fmt: skip
    g = groups if isinstance(groups, int) and not isinstance(groups, bool) else 1
    out_c, in_c, ks = int(p.shape[0]), int(p.shape[1]) * g, tuple(int(k) for k in p.shape[2:])
    layer = Layer(name, None, kind, in_c, out_c, g, ks, fname)
    assert src is not None
    layer.weight_target = str(src.target)
    owner = layer.weight_target.rpartition(".")[0]
    layer.stage = stage_of(layer.weight_target)
    reasons = []
    if weight is not src:
        reasons.append("its weight is computed in forward (e.g. standardized)")
    if not isinstance(p, nn.Parameter):
        reasons.append("its weight is a buffer, not a parameter")
    if not (isinstance(groups, int) and not isinstance(groups, bool)):
        reasons.append("its groups argument is computed in forward")
    if bias is not None:
        bsrc = bias if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
        if bsrc is None:
            reasons.append("its bias is computed in forward")
        else:
            layer.bias_target = str(bsrc.target)
    users = [n for n in graph.nodes if n.op == "get_attr" and n.target == src.target]
    if weight is src and (len(users) > 1 or len(src.users) > 1):
        reasons.append("its weight parameter is used elsewhere too")
    if reasons:
        layer.tieable = False
        layer.reason = f"{fname} on parameter {layer.weight_target!r}: " + "; ".join(reasons)
        layer.reason += "; left dense"
    elif owner:
        layer.branch = None
    return layer


def _is_layer_node(node: fx.Node, by_name: dict[str, Layer]) -> Layer | None:
    if node.op == "call_module":
        return by_name.get(str(node.target))
    if node.op == "call_function":
        return by_name.get(f"fx:{node.name}")
    return None


def _stops(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return True
    return False


def _mark_roles(graph: fx.Graph, by_name: dict[str, Layer]) -> None:
    conv_kinds = ("conv", "grouped_conv", "depthwise_conv", "conv_subclass", "functional_conv")
    # stems: the first layers reached from the inputs
    frontier = [n for n in graph.nodes if n.op == "placeholder"]
    seen: set[fx.Node] = set(frontier)
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen or _stops(user):
                continue
            seen.add(user)
            layer = _is_layer_node(user, by_name)
            if layer is not None:
                if layer.kind in conv_kinds:
                    layer.role = "stem"
                continue
            frontier.append(user)
    # heads: the last layers before the outputs
    frontier = [n for n in graph.nodes if n.op == "output"]
    seen = set(frontier)
    while frontier:
        node = frontier.pop()
        for src in node.all_input_nodes:
            if src in seen or _stops(src):
                continue
            seen.add(src)
            layer = _is_layer_node(src, by_name)
            if layer is not None:
                if layer.role is None:
                    layer.role = "head"
                continue
            frontier.append(src)


def discover(model: nn.Module, use_fx: bool = True) -> Discovery:
    """Find every conv / linear layer of ``model`` (not modified).

    Args:
        model: the model.
        use_fx: try torch.fx first (default); False walks the modules only.

    Returns:
        A :class:`Discovery`: layers in forward order (traced) or module order (walk).
    """
    modules = dict(model.named_modules())
    layers: list[Layer] = []
    by_name: dict[str, Layer] = {}
    tied_prefixes: list[str] = []
    for name, m in modules.items():
        if any(name.startswith(p) for p in tied_prefixes):
            continue  # inside an already tied layer
        layer = classify(name, m)
        if layer is None:
            continue
        if layer.kind == "tied":
            tied_prefixes.append(name + ".")
        layer.stage = stage_of(name)
        parent = _opaque_parent(name, modules)
        if parent is not None and layer.tieable:
            layer.tieable = False
            layer.reason = (
                f"inside torch's {type(parent).__name__}, whose forward reads the weights "
                "directly: left dense"
            )
        layers.append(layer)
        by_name[name] = layer

    notes: list[str] = []
    graph, why = trace(model) if use_fx else (None, "use_fx=False")
    if graph is None:
        notes.append(
            f"torch.fx could not trace the model ({why}); layers were found by walking the "
            "modules, and attention detection from the graph was unavailable (only known "
            "attention classes were recognised by name)."
        )
        for i, layer in enumerate(layers):
            layer.depth = i
        firsts = [ly for ly in layers if ly.kind.endswith("conv") or ly.kind == "conv_subclass"]
        if firsts:
            firsts[0].role = "stem"
        if layers and layers[-1].role is None:
            layers[-1].role = "head"
        return Discovery(layers, None, False, notes)

    order: list[Layer] = []
    called: set[str] = set()
    # layers inside a (timm-registered) leaf module: called by its forward as modules, so
    # they can be swapped; they sit in the forward order where the leaf is called
    inner: dict[str, list[Layer]] = {}
    for layer in layers:
        parts = layer.name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            inner.setdefault(".".join(parts[:i]), []).append(layer)
    leaf_targets = {
        str(n.target) for n in graph.nodes if n.op == "call_module" and n.target not in by_name
    }
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in leaf_targets:
            m = modules.get(str(node.target))
            if m is not None and not type(m).__module__.startswith("torch.nn."):
                for layer in inner.get(str(node.target), []):
                    if layer.name not in called:
                        called.add(layer.name)
                        order.append(layer)
            continue
        if node.op == "call_module" and node.target in by_name:
            layer = by_name[str(node.target)]
            layer.nodes.append(node)
            if layer.name not in called:
                called.add(layer.name)
                order.append(layer)
        elif node.op == "call_function" and (
            node.target in _FUNCTIONAL_CONV or node.target in _FUNCTIONAL_LINEAR
        ):
            layer = _functional_layer(model, graph, node)
            layer.nodes.append(node)
            by_name[layer.name] = layer
            order.append(layer)
    for layer in layers:
        if layer.name not in called:
            layer.called = False
            if layer.tieable:
                layer.tieable = False
                layer.reason = (
                    "not called as a module in the traced forward (its parent uses the weights "
                    "directly, or it runs only in another train/eval mode): left dense"
                )
    _mark_roles(graph, by_name)
    uncalled = [ly for ly in layers if not ly.called]
    ordered = order + uncalled
    for i, layer in enumerate(ordered):
        layer.depth = i
    return Discovery(ordered, graph, True, notes)
