"""``tieify.optimize``: time each tied layer's forward paths once per shape and pin the fastest.

Like ``torch.backends.cudnn.benchmark``: the first time a layer configuration is seen with a
given input (shape, dtype, memory layout, device, thread count) every applicable path is timed
in interleaved rounds and the fastest is stored; later calls, in this process or the next
(the choice is cached on disk, see :mod:`tieify.latency._cache`), reuse it without timing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._modes import eval_mode
from ..nn import _paths
from ..nn._conv import _TiedConvNd
from ._cache import JsonCache
from ._machine import machine_key, software_key
from ._timing import interleaved_medians, num_threads

__all__ = ["optimize", "path_key", "PATH_CACHE"]

PATH_CACHE = JsonCache("paths.json")

# Replaced in tests by a deterministic fake; maps candidate name -> median seconds.
_timer: Callable[..., dict[str, float]] = interleaved_medians


def layer_signature(layer: nn.Module) -> dict[str, Any]:
    """The attributes of a layer that decide its cost (not its weights)."""
    sig: dict[str, Any] = {"type": type(layer).__name__}
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "B",
        "in_features",
        "out_features",
    ):
        if hasattr(layer, attr):
            value = getattr(layer, attr)
            sig[attr] = list(value) if isinstance(value, tuple) else value
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor) or bias is None:
        sig["bias"] = bias is not None
    return sig


def input_signature(x: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype, layout and device type of an input (what a path choice depends on)."""
    return {
        "shape": list(x.shape),
        "dtype": str(x.dtype).replace("torch.", ""),
        "layout": _paths.layout_of(x),
        "device": x.device.type,
    }


def path_key(layer: nn.Module, x: torch.Tensor, threads: int | None = None) -> str:
    """The cache key of a (layer configuration, input, thread count) triple on this machine
    (:func:`~tieify.latency._machine.machine_key`), a JSON string.

    The candidate paths are part of the key, and so are the torch and tieify versions and the
    kernel's build where ``kernel`` is a candidate (:func:`~tieify.latency._machine.software_key`):
    a choice made before a new path existed, or against an older kernel, is timed again
    rather than reused.
    """
    threads = torch.get_num_threads() if threads is None else threads
    candidates = list(_paths.applicable_paths(layer, x)) if isinstance(layer, _TiedConvNd) else []
    key = {
        "layer": layer_signature(layer),
        "input": input_signature(x),
        "candidates": candidates,
        "threads": threads,
        **software_key(kernel="kernel" in candidates),
        "machine": machine_key(x.device),
    }
    return json.dumps(key, sort_keys=True)


def like(x: torch.Tensor) -> torch.Tensor:
    """A random tensor with the shape, dtype, device and strides of ``x``."""
    return torch.randn_like(x) if x.is_floating_point() else x.clone()


def _capture_inputs(
    model: nn.Module, example_inputs: Any, types: tuple[type, ...]
) -> dict[nn.Module, torch.Tensor]:
    seen: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if module not in seen and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if x.dim() == getattr(module, "_ndim", x.dim() - 2) + 1:
                x = x.unsqueeze(0)
            seen[module] = x.detach()

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, types)]
    try:  # eval: no running-statistics update from this look-only pass
        with eval_mode(model), torch.no_grad():
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` with ``example_inputs`` (a tensor, a tuple of args or a dict of kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    raise TypeError(
        "example_inputs must be a tensor, a tuple/list of positional inputs or a dict of "
        f"keyword inputs, but got {type(example_inputs).__name__}; pass e.g. "
        "torch.randn(1, 3, 224, 224)."
    )


def choose_path(
    layer: _TiedConvNd,
    x: torch.Tensor,
    *,
    repeats: int = 5,
    cache: bool = True,
    threads: int | None = None,
) -> str:
    """The fastest applicable path of ``layer`` on inputs like ``x`` (cached per key)."""
    key = path_key(layer, x, threads)
    if cache:
        hit = PATH_CACHE.get(key)
        if isinstance(hit, dict) and hit.get("path") in _paths.applicable_paths(layer, x):
            return str(hit["path"])
    candidates = _paths.applicable_paths(layer, x)
    xx = like(x)
    fns = {p: (lambda p=p: _paths.run_path(layer, xx, p)) for p in candidates}
    device = x.device if x.device.type == "cuda" else None
    with num_threads(threads), torch.inference_mode():
        times = _timer(fns, repeats=repeats, warmup=1, target_s=0.005, device=device)
    # Ties go to the earlier path in PATHS order (deterministic).
    best = min(candidates, key=lambda p: (times[p], _paths.PATHS.index(p)))
    if cache:
        PATH_CACHE.set(key, {"path": best, "seconds": {p: times[p] for p in candidates}})
    return best


def optimize(
    model: nn.Module,
    example_inputs: Any,
    *,
    repeats: int = 5,
    cache: bool = True,
    threads: int | None = None,
) -> nn.Module:
    """Pin the fastest forward path of every tied convolution in ``model``, in place.

    Runs ``model`` once on ``example_inputs`` to see each tied layer's input (shape, dtype,
    memory layout, device), times the layer's applicable paths (see
    :mod:`tieify.nn._paths`) in interleaved rounds and sets ``layer.path`` to the fastest. The
    choice is cached per (layer configuration, input, threads, torch and tieify versions, and
    the kernel's build where it is a candidate), in memory and on disk under the tieify cache
    directory (``$TIEIFY_CACHE_DIR``, else ``$XDG_CACHE_HOME/tieify``, else
    ``~/.cache/tieify``), so it is measured once per machine.
    Only ``layer.path`` changes (no weights); a pinned path that does not apply to a later
    input (another memory layout) falls back to the cheap rule. Forward time is what is
    measured (inference); the paths are equally valid for training.

    Args:
        model: a module holding tied convolutions (others are left alone).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs,
            laid out as in production (e.g. ``channels_last``).
        repeats: interleaved timing rounds per layer configuration.
        cache: read and write the on-disk cache.
        threads: time with this many threads (default: ``torch.get_num_threads()``).

    Returns:
        ``model`` itself.

    Example:
        >>> import torch, tieify
        >>> from tieify.nn import TiedConv2d
        >>> net = torch.nn.Sequential(TiedConv2d(16, 32, 1, B=4)).to(
        ...     memory_format=torch.channels_last)
        >>> x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
        >>> _ = tieify.optimize(net, x, cache=False)
        >>> net[0].path in ("fold", "gemm", "grouped")
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"tieify.optimize expects an nn.Module, but got {type(model).__name__}; pass the "
            "model whose tied layers should be tuned."
        )
    inputs = _capture_inputs(model, example_inputs, (_TiedConvNd,))
    for layer, x in inputs.items():
        if not isinstance(layer, _TiedConvNd):
            continue
        layer.path = choose_path(layer, x, repeats=repeats, cache=cache, threads=threads)
    return model
