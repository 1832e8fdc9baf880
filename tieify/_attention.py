"""Find channel-attention branches (SE, Global Context, CBAM) among the discovered layers.

Two detectors, both writing ``Layer.attention`` / ``Layer.branch``:

- **Graph** (traced models, whoever wrote the branch): a sigmoid-like gate (sigmoid,
  hardsigmoid, as a function, method or module) whose output multiplies a tensor, computed
  from a globally pooled tensor (mean / amax over spatial dims, adaptive pooling to 1) only
  through conv / linear layers, activations and shape ops. Both average and max pooling
  feeding the gate means CBAM's channel MLP, otherwise SE.
- **Class names** (always, also for untraced models): torchvision's ``SqueezeExcitation``,
  timm's ``SEModule`` / ``SqueezeExcite`` / ``EffectiveSEModule`` (SE), ``ChannelAttn`` /
  ``LightChannelAttn`` (CBAM) and ``GlobalContext`` (GC: the transform convs are tied, the
  C→1 context conv stays dense).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._trace import Layer

__all__ = ["detect_attention", "SE_CLASSES", "CBAM_CLASSES", "GC_CLASSES"]

SE_CLASSES = {
    "SqueezeExcitation",
    "SEModule",
    "SqueezeExcite",
    "EffectiveSEModule",
    "SEBlock",
    "SqueezeExcitationBlock",
    "SELayer",
}
CBAM_CLASSES = {"ChannelAttn", "LightChannelAttn"}
GC_CLASSES = {"GlobalContext"}

_GATE_FUNCS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.nn.functional.hardsigmoid}
_GATE_NAMES = {"sigmoid", "hard_sigmoid", "hardsigmoid", "sigmoid_", "hard_sigmoid_"}
_GATE_MODULES = {"Sigmoid", "Hardsigmoid", "HardSigmoid", "HardSigmoidMe", "SigmoidMe"}
_MUL = {operator.mul, operator.imul, torch.mul}
_POOL_FUNCS = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    torch.mean,
    torch.amax,
}
_POOL_MODULES = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_MAX_BRANCH_NODES = 40


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _is_gate(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _GATE_FUNCS or _target_name(node) in _GATE_NAMES
    if node.op == "call_method":
        return node.target in ("sigmoid", "sigmoid_")
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return m is not None and type(m).__name__ in _GATE_MODULES
    return False


def _is_mul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MUL
    return node.op == "call_method" and node.target in ("mul", "mul_")


def _is_one(size: object) -> bool:
    if isinstance(size, int):
        return size == 1
    if isinstance(size, (tuple, list)):
        return all(s == 1 for s in size)
    return False


def _pool_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``"avg"`` / ``"max"`` when ``node`` pools globally over space, else None."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, _POOL_MODULES) and _is_one(m.output_size):
            return "max" if "Max" in type(m).__name__ else "avg"
        return None
    name = _target_name(node)
    if node.op == "call_function" and node.target in _POOL_FUNCS:
        if "adaptive" in name:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if not _is_one(size):
                return None
        return "max" if "max" in name else "avg"
    if node.op == "call_method" and name in ("mean", "amax"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if (
            isinstance(dims, (tuple, list))
            and dims
            and all(isinstance(d, int) and (d >= 2 or d < 0) for d in dims)
        ):
            return "max" if name == "amax" else "avg"
    return None


def _reaches_mul(gate: fx.Node) -> bool:
    frontier, depth = [gate], 0
    while frontier and depth < 4:
        nxt = []
        for n in frontier:
            for u in n.users:
                if _is_mul(u):
                    return True
                if u.op in ("call_method", "call_function") and _target_name(u) in (
                    "view",
                    "reshape",
                    "expand_as",
                    "expand",
                    "unsqueeze",
                    "flatten",
                    "contiguous",
                    "to",
                ):
                    nxt.append(u)
        frontier, depth = nxt, depth + 1
    return False


def _common_prefix(names: Iterable[str]) -> str | None:
    parts = [n.split(".")[:-1] for n in names]
    if not parts:
        return None
    prefix = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix) or None


def _graph_branches(
    graph: fx.Graph, modules: dict[str, nn.Module], by_node: dict[fx.Node, Layer]
) -> list[tuple[str, list[Layer]]]:
    found = []
    for gate in graph.nodes:
        if not _is_gate(gate, modules) or not _reaches_mul(gate):
            continue
        layers: list[Layer] = []
        pools: set[str] = set()
        frontier = list(gate.all_input_nodes)
        seen: set[fx.Node] = set(frontier)
        ok = True
        while frontier:
            node = frontier.pop()
            if len(seen) > _MAX_BRANCH_NODES or node.op in ("placeholder", "get_attr"):
                ok = False
                break
            pool = _pool_kind(node, modules)
            if pool is not None:
                pools.add(pool)
                continue
            layer = by_node.get(node)
            if layer is not None and layer not in layers:
                layers.append(layer)
            for src in node.all_input_nodes:
                if src not in seen and not (
                    src.op == "call_method" and src.target in ("size", "dim")
                ):
                    seen.add(src)
                    frontier.append(src)
        if ok and pools and layers:
            found.append(("CBAM" if pools == {"avg", "max"} else "SE", layers))
    return found


def detect_attention(model: nn.Module, layers: list[Layer], graph: fx.Graph | None) -> list[str]:
    """Mark the layers of SE / GC / CBAM branches; returns notes (e.g. GC context convs)."""
    notes: list[str] = []
    modules = dict(model.named_modules())
    by_name = {ly.name: ly for ly in layers}
    # class names first: they name the branch precisely
    for mname, m in modules.items():
        cls = type(m).__name__
        kind = (
            "SE"
            if cls in SE_CLASSES
            else "CBAM"
            if cls in CBAM_CLASSES
            else "GC"
            if cls in GC_CLASSES
            else None
        )
        if kind is None:
            continue
        prefix = mname + "." if mname else ""
        for ly in layers:
            if ly.name.startswith(prefix) and ly.attention is None:
                ly.attention, ly.branch = kind, mname
                if kind == "GC" and ly.out_channels == 1 and ly.tieable:
                    ly.tieable = False
                    ly.reason = "Global Context attention-pooling conv (C->1) stays dense"
    if graph is None:
        return notes
    by_node: dict[fx.Node, Layer] = {}
    for ly in layers:
        for n in ly.nodes:
            by_node[n] = ly
    for kind, branch_layers in _graph_branches(graph, modules, by_node):
        fresh = [ly for ly in branch_layers if ly.attention is None]
        if not fresh:
            continue
        branch = _common_prefix(ly.name for ly in branch_layers if not ly.name.startswith("fx:"))
        for ly in fresh:
            ly.attention, ly.branch = kind, branch
    del by_name
    return notes
