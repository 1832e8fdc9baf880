"""``tieify.fuse``: run a tied model's convolutions with the batch norm, residual add and ReLU
that follow them, for inference (see :mod:`tieify.nn._fused`); the batch norms after its
dense convolutions folded into their weights."""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from ._trace import trace
from .nn import _kernel, _paths
from .nn._conv import _TiedConvNd
from .nn._fused import add_into, conv_bn_act, foldable, fusable

__all__ = ["fuse"]

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu, torch.relu_}


@dataclass
class _Chain:
    """conv → bn (→ add residual) (→ relu) in the graph."""

    conv: fx.Node
    bn: fx.Node
    add: fx.Node | None = None
    relu: fx.Node | None = None

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv, self.bn, self.add, self.relu) if n is not None]


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _module(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def _residual_of(node: fx.Node, value: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``value + other`` (or ``other + value``; ``value +=
    other`` only with ``value`` first, since the in-place add writes into its first operand)
    with ``other`` a graph value; else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_add:
        return None
    first, second = node.args
    in_place = node.target in (operator.iadd, "add_")
    if first is value and isinstance(second, fx.Node) and second is not value:
        return second
    if second is value and isinstance(first, fx.Node) and not in_place:
        return first
    return None


def _is_relu(gm: nn.Module, node: fx.Node, value: fx.Node) -> bool:
    if not node.args or node.args[0] is not value or len(node.args) > 1:
        return False
    if node.op == "call_module":
        return type(_module(gm, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELUS and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs


def _chains(
    gm: fx.GraphModule, dense: bool, keep: Callable[[_Chain], bool] | None = None
) -> list[_Chain]:
    """The fusable chains (with ``dense``, also those of a dense conv whose batch norm folds
    into it) that ``keep`` accepts, in graph order. An add of two such chains' outputs (a
    bottleneck's last conv and its downsample) goes to the first one; the other keeps conv →
    bn. A chain ``keep`` refuses claims nothing: its add goes to the other chain."""
    found: list[_Chain] = []
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        conv = _module(gm, node)
        bn_node = _only_user(node)
        if conv is None or bn_node is None or len(node.args) != 1 or node.kwargs:
            continue
        bn = _module(gm, bn_node)
        if bn is None or bn_node.args != (node,) or bn_node.kwargs:
            continue
        if not (fusable(conv, bn) or (dense and foldable(conv, bn))):
            continue
        chain = _Chain(node, bn_node)
        tail = bn_node
        user = _only_user(tail)
        if user is not None and user not in claimed and _residual_of(user, tail) is not None:
            chain.add = user
            tail = user
            user = _only_user(tail)
        if user is not None and _is_relu(gm, user, tail):
            chain.relu = user
        if keep is not None and not keep(chain):
            continue
        found.append(chain)
        claimed.update(chain.nodes)
    return found


def _restore_in_place_adds(gm: fx.GraphModule) -> None:
    """``bn_out + other`` nodes whose batch-norm output has no other use call
    :func:`~tieify.nn._fused.add_into`: torch.fx records ``out += identity`` as an add into a
    new tensor, which cost ResNet-50 (3×3 convs tied at B = 2, batch 8, channels-last) 4%
    (578 against 556 ms; with in-place adds 559)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (operator.add, torch.add):
            continue
        if node.kwargs or len(node.args) != 2:
            continue
        for mine, other in (node.args, reversed(node.args)):
            if (
                isinstance(mine, fx.Node)
                and isinstance(other, fx.Node)
                and len(mine.users) == 1
                and isinstance(_module(gm, mine), nn.modules.batchnorm._BatchNorm)
            ):
                node.target, node.args = add_into, (mine, other)
                break


def fuse(
    model: nn.Module, example_inputs: Any = None, *, inplace: bool = False, dense: bool = True
) -> nn.Module:
    """Fuse, for inference, each tied conv that tieify's kernel computes (pointwise, or 2-D
    with one group and zero padding) with the batch norm after it (and the residual add and
    the ReLU after that, where the graph has them); fold the batch norm after each dense
    conv into that conv's weights.

    The model is traced with torch.fx (as :func:`tieify.tieify` traces it); every
    ``TiedConv → BatchNorm (→ x + residual) (→ ReLU)`` chain whose intermediate values have no
    other use becomes one call of :func:`tieify.nn._fused.conv_bn_act`. Where the conv runs
    tieify's CPU kernel (its ``kernel`` path: channels-last float32 input, see
    :func:`tieify.kernel_status`), the batch norm's per-channel affine (from its running
    statistics), the add and the ReLU are applied in the kernel's epilogue, saving three
    memory-bound passes over the output. The weights are not changed and stay tied (the affine
    differs per block, so it is applied after the shared bank, never folded into it);
    parameters, buffers and ``state_dict`` keys stay as they were. A fused model in training
    mode, recording gradients, under tracing or ``torch.compile``, or on inputs its convs do
    not run the kernel on, runs the modules one after the other, exactly as before. Residual
    adds into a batch norm's output stay in place (:func:`tieify.nn._fused.add_into`; a trace
    records them as adds into new tensors). :func:`tieify.save` stores a fused model as its
    plan and weights; :func:`tieify.load` rebuilds the tied model, to fuse again.

    A dense ``nn.Conv1d/2d/3d`` the model keeps (a stem, a depthwise conv left untied) with a
    batch norm after it runs as one convolution on weights with the batch norm folded in (as
    torch.fx's conv-BN fusion does for a dense model; here on a copy kept beside the conv, so
    the parameters stay as they were), then the add and the ReLU in place: one pass over the
    output fewer per batch norm, and a result that differs from the separate modules' by
    rounding only. ``dense=False`` leaves them as they are.

    Give ``example_inputs`` (as in production, after :func:`tieify.optimize`) to fuse only the
    chains that run fused on them: those whose conv runs the kernel there, and those whose
    conv could, timed fused against the chain as it runs (a conv :func:`tieify.optimize`
    pinned to another path, faster alone, may be slower than the kernel with the batch norm
    and ReLU in its epilogue; where the fused call wins, the conv's ``path`` becomes
    ``"kernel"`` in the returned model). The timing is done once per layer configuration and
    input, and cached with :func:`tieify.optimize`'s choices. The other chains would only pay
    a check per call, and where none is left the model is returned as it is, without the
    graph module's per-node Python cost.

    Args:
        model: a tied model in eval mode (``model.eval()``); dense layers are left alone.
        example_inputs: optional; a tensor, a tuple of positional inputs or a dict of keyword
            inputs.
        inplace: fuse ``model``'s own modules (the returned graph module shares them) instead
            of a deep copy.
        dense: also fold the batch norms after dense convs (``False``: tied chains only).

    Returns:
        A ``torch.fx.GraphModule`` whose ``fused`` attribute lists the fused chains (conv
        name → what was fused); or, where nothing is fused, the model itself (a copy unless
        ``inplace``) with ``fused`` = {}, also for a model that does not trace (with a
        warning that says why).

    Example:
        >>> import torch, torchvision, tieify
        >>> tied = tieify.tieify(torchvision.models.resnet18(), B=2).eval()
        >>> fused = tieify.fuse(tied)
        >>> len(fused.fused)  # 16 3x3 convs, 3 downsample 1x1 ones, the dense stem (folded)
        20
        >>> fused.fused["conv1"]
        'bn1 + relu'
        >>> fused.fused["layer1.0.conv2"]
        'layer1.0.bn2 + add + relu'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"tieify.fuse expects an nn.Module, but got {type(model).__name__}; pass the tied "
            "model to fuse for inference."
        )
    if model.training:
        raise ValueError(
            "tieify.fuse applies batch norms' running statistics, for inference, but the model "
            "is in training mode (model.training is True); call model.eval() first, and keep "
            "the unfused model for training."
        )
    if not inplace:
        # Copied outside inference_mode: parameters copied under it are inference tensors,
        # which have no version counter, so the fused calls could not be kept (every call
        # would prepare its kernel call and fold its weights anew).
        with torch.inference_mode(False):
            model = copy.deepcopy(model)
    graph, why = trace(model)
    if graph is None:
        warnings.warn(
            f"tieify.fuse: {type(model).__name__} does not trace with torch.fx ({why}); "
            "nothing was fused, the model runs as it is.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _unfused(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    keep: Callable[[_Chain], bool] | None = None
    if example_inputs is not None:
        from .latency._optimize import _capture_inputs

        seen = _capture_inputs(model, example_inputs, (_TiedConvNd,))
        keep = partial(_fuses_faster, gm, seen=seen)
    chains = _chains(gm, dense, keep)
    if not chains:
        return _unfused(model)
    fused: dict[str, str] = {}
    for chain in chains:
        last = chain.nodes[-1]
        # Read the residual now: an earlier chain's fused call may have replaced it.
        residual = None if chain.add is None else _residual_of(chain.add, chain.bn)
        with gm.graph.inserting_before(last):
            conv = gm.graph.get_attr(str(chain.conv.target))
            bn = gm.graph.get_attr(str(chain.bn.target))
            node = gm.graph.call_function(
                conv_bn_act,
                (chain.conv.args[0], conv, bn),
                {"residual": residual, "relu": chain.relu is not None},
            )
        last.replace_all_uses_with(node)
        for old in reversed(chain.nodes):
            gm.graph.erase_node(old)
        what = [str(chain.bn.target)]
        what += ["add"] * (chain.add is not None) + ["relu"] * (chain.relu is not None)
        fused[str(chain.conv.target)] = " + ".join(what)
    _restore_in_place_adds(gm)
    gm.graph.lint()
    gm.recompile()
    _direct_attributes(gm)
    # Plain attributes (not modules, parameters or buffers), kept by deepcopy and pickling;
    # tieify.save stores the plan and the (same) weights.
    kept: dict[str, Any] = {"fused": fused}
    if hasattr(model, "tieify_plan"):
        kept["tieify_plan"] = model.tieify_plan
    gm.__dict__.update(kept)
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = kept
    gm._register_deepcopy_hook(_direct_attributes)
    gm._tracer_cls = _FusedTracer  # an unpickled copy re-traces its code with it
    return gm


class _FusedTracer(fx.Tracer):
    """Re-traces a fused graph module's code where it is unpickled: every module stays a
    call (torch.fx adds that), and so do the fused calls and the in-place adds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["autowrap_functions"] = (*kwargs.get("autowrap_functions", ()), *_CALLS)
        super().__init__(*args, **kwargs)


_CALLS = (conv_bn_act, add_into)


def _direct_attributes(gm: fx.GraphModule) -> None:
    """Let the generated forward reach submodules without ``nn.Module.__getattr__``.

    fx's code reaches every layer through a chain of attribute lookups on the containers
    it made (``getattr(getattr(self.features, "1").block, "0")``), each a miss on the
    instance dict and then a search of ``_modules``: ~1,100 such calls per MobileNetV3
    forward, ~2 ms of a 10 ms forward on a tiny input. The root and those containers (plain
    ``nn.Module`` objects of the graph module's own, never the model's modules) also get their
    children in their instance dict; assigning a child through ``setattr`` replaces both
    (``nn.Module.__setattr__`` drops the instance entry). ``state_dict`` and the module tree
    read ``_modules`` and are unchanged."""
    for module in gm.modules():
        if module is gm or type(module) is nn.Module:
            for name, child in module._modules.items():
                if child is not None:
                    module.__dict__[name] = child


#: A chain whose conv the rule does not run on the kernel is fused where the fused call took
#: less than this fraction of the chain's time as it runs. Timed alone, a layer's bank stays
#: in cache between calls, which favours the kernel (it reads the bank once per tile, where
#: oneDNN packs it): ResNet-50 with 3×3 convs at B = 2, batch 1, all 16 chains fused on a
#: plain "faster" ran 1.06× slower than unfused (``benchmarks/fuse.py``, 2026-12-01).
FUSED_MARGIN = 0.95
#: Largest bank (entries, all taps) of a k×k chain that :func:`fuse` times (None: any):
#: where the kernel streamed its outputs past the cache, the models measured with the margin
#: above (``benchmarks/fuse.py``, AVX2 EPYC, 2026-12-01) lost on in-model chains with larger
#: banks what the chains won alone. Where its outputs stay in the cache
#: (:data:`tieify.nn._kernel.KEEPS_OUTPUTS_CACHED`) every k×k chain is timed: on the AVX-512
#: Xeon (480 MB of L3), after ``optimize``, fused with every chain timed against fused with
#: the limit (``python benchmarks/fuse.py --max-bank 32768``, 2026-12-02 13:33–13:36 UTC):
#: the all-B = 4 ResNet-50 fused 3 more chains at batch 1 (0.968 of the time) and 1 more at
#: batch 8 (1.003), ResNet-50 with 3×3 convs at B = 2 6 more at batch 1 (1.001); the other
#: cases fused the same chains (0.981–1.008: the noise). A throwaway run before it gave 0.938
#: and 0.981 for the all-B = 4 model.
FUSED_MAX_BANK: int | None = None if _kernel.KEEPS_OUTPUTS_CACHED else 32768
#: Interleaved rounds of a chain's timing; the choice compares each candidate's fastest round
#: (``interleaved_medians(best=True)``), not the medians: it is made once and cached, and a
#: run under load kept a wrong one. ResNet-50's layer1.0.conv3 chain at B = 4, batch 8
#: (1×1 64→256 at 56×56, batch norm, add, ReLU; AVX-512 Xeon, 2 threads) was cached as
#: "separate 16.6 ms, fused 17.1 ms" by a median of 5 rounds under load, and left unfused;
#: unloaded the medians are 4.7–5.3 ms and 3.45 ms (2026-12-02, 16:58 UTC). After
#: ``optimize`` and ``fuse``, the all-B = 4 model took 0.383 of the folded dense model's time
#: at batch 8 with that choice (and the same for the two chains after it), and 0.350 once
#: they were timed this way (one interleaved run each, 16:57–17:01).
FUSE_REPEATS = 7


def _fuses_faster(gm: fx.GraphModule, chain: _Chain, seen: dict[nn.Module, torch.Tensor]) -> bool:
    """Whether ``chain`` is worth fusing on the example input its conv saw: the conv runs the
    kernel on it (by the fused rule, :func:`tieify.nn._paths.default_path`, or pinned), or
    it could (a k×k conv with a bank of at most :data:`FUSED_MAX_BANK` entries, or a
    pointwise one pinned to another path where the fused rule takes the kernel), and the
    fused call is faster than the chain as it runs (its conv on the path it takes, then the
    separate modules) by :data:`FUSED_MARGIN`. In the second case the conv's ``path`` is
    pinned to ``"kernel"``.
    The choice is timed once per (layer configuration, input, threads, torch and tieify
    versions, kernel build), on each candidate's fastest of :data:`FUSE_REPEATS` interleaved
    rounds, and cached with :func:`tieify.optimize`'s. Pointwise chains the
    fused rule leaves on gemm are not timed: timed alone, the small ones (MobileNetV3-Large
    at batch 1: 11 chains) were faster fused, and the model 1.08× slower
    (``benchmarks/fuse.py``, 2026-12-01). Those it runs on the kernel are: on an AVX-512
    Xeon, where :func:`tieify.optimize` pins oneDNN's paths, the all-B = 4 ResNet-50 fused
    after it took 0.44 of the dense channels-last time at batch 8 with them timed (36 of 37
    chains fused), 0.49 without (9 fused; batch 1: 0.33 and 0.38), 2026-12-02."""
    conv = gm.get_submodule(str(chain.conv.target))
    if not isinstance(conv, _TiedConvNd):
        return True  # a dense conv's batch norm folds: one pass less, on any input
    x = seen.get(conv)
    if x is None or not _paths.is_channels_last(x):
        return False  # the epilogue is the channels-last kernel's
    if _paths.select_path(conv, x, fused=True) == "kernel":
        return True
    if "kernel" not in _paths.applicable_paths(conv, x):
        return False
    if _paths._is_pointwise(conv):
        # Pinned to another path: timed where the fused rule would take the kernel (its
        # thresholds are measured in whole models).
        if _paths.default_path(conv, x, fused=True) != "kernel":
            return False
    elif FUSED_MAX_BANK is not None and conv.weight.numel() > FUSED_MAX_BANK:  # all taps
        return False
    from .latency._optimize import PATH_CACHE, _timer, like, path_key

    # "best": the choice is timed on each candidate's fastest round (FUSE_REPEATS rounds).
    key = f"fuse|{path_key(conv, x)}|{chain.add is not None}|{chain.relu is not None}|best"
    hit = PATH_CACHE.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("fuse"), bool):
        faster = bool(hit["fuse"])
    else:
        bn = gm.get_submodule(str(chain.bn.target))
        xx = like(x)
        with torch.inference_mode():
            y = conv(xx)
        r = None if chain.add is None else torch.randn_like(y)
        relu = chain.relu is not None
        fns = {
            "separate": lambda: conv_bn_act(xx, conv, bn, r, relu),
            "fused": lambda: _fused_call(xx, conv, bn, r, relu),
        }
        with torch.inference_mode():
            times = _timer(fns, repeats=FUSE_REPEATS, warmup=1, target_s=0.005, best=True)
        faster = times["fused"] < FUSED_MARGIN * times["separate"]
        PATH_CACHE.set(key, {"fuse": faster, "seconds": times})
    if faster:
        conv.path = "kernel"
    return faster


def _fused_call(
    x: torch.Tensor, conv: _TiedConvNd, bn: nn.Module, r: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    """The chain's fused call, with the conv on the kernel for it (its path restored)."""
    path = conv.path
    conv.path = "kernel"
    try:
        return conv_bn_act(x, conv, bn, r, relu)
    finally:
        conv.path = path


def _unfused(model: nn.Module) -> nn.Module:
    model.__dict__["fused"] = {}
    return model
