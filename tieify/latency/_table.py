"""The per-layer latency lookup table, measured on the machine at hand.

An entry is the fastest sampled forward time (seconds) of one layer configuration on one input,
keyed by the layer's op and hyper-parameters (type, channels, kernel, stride, padding,
dilation, groups, B, bias, forward path), the input's shape (batch included), dtype, memory
layout and device, the thread count, the torch and tieify versions (and the kernel's build
for a layer that runs it), the machine (CPU model, instruction set and CPU count; the GPU for
CUDA inputs) and whether the allocator is tuned (:func:`tieify.tune_allocator`). Entries are
measured lazily, the first time a key is asked for, and kept on disk (``latency.json`` in the
tieify cache directory), so a search pays for each distinct layer once per machine.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from torch import nn

from ..nn import TIED_TYPES, _paths
from ..nn._conv import _TiedConvNd
from ._allocator import allocator_state
from ._cache import JsonCache
from ._machine import machine_key, software_key
from ._optimize import input_signature, layer_signature, like
from ._timing import calibrate_iters, num_threads, time_once

__all__ = ["LAYER_TYPES", "is_layer", "layer_key", "LatencyTable", "TABLE"]

#: Modules timed on their own (the rest of a model is the "remainder").
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    *TIED_TYPES,
)


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` gets a table entry of its own."""
    return isinstance(module, LAYER_TYPES)


def layer_key(layer: nn.Module, x: torch.Tensor, threads: int | None = None) -> str:
    """The table key of ``layer`` run on inputs like ``x`` (a JSON string)."""
    sig = layer_signature(layer)
    if isinstance(layer, _TiedConvNd):
        # The forward that actually runs on x ("auto" resolves by layout, and the rule
        # changes when tieify gains a path), so an entry is never another path's time.
        batched = x.unsqueeze(0) if x.dim() == layer._ndim + 1 else x
        if _paths.relays(layer, batched):  # a layer in channels-last: its input's copy too
            sig["copies_to"] = "channels_last"
            batched = torch.empty_like(batched, memory_format=_paths.CHANNELS_LAST[batched.dim()])
        sig["path"] = "dense" if layer.B == 1 else _paths.select_path(layer, batched)
    elif hasattr(layer, "path"):
        sig["path"] = layer.path
    inner = getattr(layer, "module", None)  # TiedBlock: the wrapped module decides the cost
    if isinstance(inner, nn.Module):
        sig["inner"] = layer_signature(inner)
    key = {
        "op": sig,
        "input": input_signature(x),
        "threads": torch.get_num_threads() if threads is None else threads,
        **software_key(kernel=sig.get("path") == "kernel"),
        "machine": machine_key(x.device),
        # Page faults on large outputs are part of a layer's time under a system allocator.
        "allocator": allocator_state().label,
    }
    return json.dumps(key, sort_keys=True)


class LatencyTable:
    """Median forward seconds per layer key, measured on demand and cached on disk."""

    def __init__(self, name: str = "latency.json", persist: bool = True) -> None:
        self.store = JsonCache(name, persist=persist)
        self.measured = 0  # entries measured by this process (not read from disk)

    def lookup(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        *,
        threads: int | None = None,
        repeats: int = 7,
        measure: bool = True,
    ) -> float | None:
        """Seconds per forward of ``layer`` on inputs like ``x``; measured when missing.

        With ``measure=False`` a missing entry gives ``None`` instead.
        """
        key = layer_key(layer, x, threads)
        hit = self.store.get(key)
        if isinstance(hit, (int, float)):
            return float(hit)
        if not measure:
            return None
        return self.remeasure(layer, x, threads=threads, repeats=repeats)

    def remeasure(
        self, layer: nn.Module, x: torch.Tensor, *, threads: int | None = None, repeats: int = 7
    ) -> float:
        """Time ``layer`` on inputs like ``x`` now and store the entry (replacing any)."""
        seconds = time_module(layer, x, threads=threads, repeats=repeats)
        self.store.set(layer_key(layer, x, threads), seconds)
        self.measured += 1
        return seconds

    def get_value(self, key: str) -> Any:
        return self.store.get(key)

    def set_value(self, key: str, value: Any) -> None:
        self.store.set(key, value)


def time_module(
    module: nn.Module, x: torch.Tensor, *, threads: int | None = None, repeats: int = 7
) -> float:
    """Seconds of ``module(x')`` for a random ``x'`` shaped and laid out like ``x``: the fastest
    of ``repeats`` samples (on a shared machine only interference makes a sample slower; the
    model's remainder, calibrated against a median end-to-end time, absorbs the typical
    interference)."""
    xx = like(x)
    device = x.device if x.device.type == "cuda" else None
    with num_threads(threads), torch.inference_mode():
        for _ in range(2):
            module(xx)
        iters = calibrate_iters(lambda: module(xx), 0.002, device)
        samples = []
        for _ in range(repeats):
            time.sleep(0.002)  # decorrelate samples from other processes' time slices
            samples.append(time_once(lambda: module(xx), iters, device))
    return min(samples)


TABLE = LatencyTable()
