"""The per-layer latency lookup table, measured on the machine at hand.

An entry is the fastest sampled forward time (seconds) of one layer configuration on one input,
keyed by the layer's op and hyper-parameters (type, channels, kernel, stride, padding,
dilation, groups, B, bias, forward path), the input's shape (batch included), dtype, memory
layout and device, the thread count, the torch and tieify versions (and the kernel's build
for a layer that runs it), the machine (CPU model, instruction set and CPU count; the GPU for
CUDA inputs) and whether the allocator is tuned (:func:`tieify.tune_allocator`). Entries are
measured lazily, the first time a key is asked for, and kept on disk (``latency.json`` in the
tieify cache directory), so a search pays for each distinct layer once per machine. The
entries one prediction is missing are measured together (:func:`time_modules`): in
interleaved rounds spread over at least :data:`ENTRY_SECONDS`, so that they share the
machine's phases instead of each catching its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from ..nn import TIED_TYPES, _paths
from ..nn._conv import _TiedConvNd
from ._allocator import allocator_state
from ._cache import JsonCache
from ._machine import machine_key, software_key
from ._optimize import input_signature, layer_signature, like, weight_signature
from ._timing import interleaved_samples, num_threads

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
    sig = layer_signature(layer) | weight_signature(layer, x)
    if isinstance(layer, _TiedConvNd):
        # The forward that actually runs on x ("auto" resolves by layout, and the rule
        # changes when tieify gains a path), so an entry is never another path's time.
        batched = x.unsqueeze(0) if x.dim() == layer._ndim + 1 else x
        if _paths.relays(layer, batched):  # a layer in channels-last: its input's copy too
            sig["copies_to"] = "channels_last"
            batched = torch.empty_like(batched, memory_format=_paths.CHANNELS_LAST[batched.dim()])
        with torch.no_grad():  # the path of an inference forward, whatever the layer's mode
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
        return self.lookup_many([(layer, x)], threads=threads, repeats=repeats, measure=measure)[0]

    def lookup_many(
        self,
        pairs: Iterable[tuple[nn.Module, torch.Tensor]],
        *,
        threads: int | None = None,
        repeats: int = 7,
        measure: bool = True,
    ) -> list[float | None]:
        """:meth:`lookup` of each ``(layer, x)``; the missing entries are measured together
        (see :func:`time_modules`), each distinct configuration once."""
        pairs = list(pairs)
        keys = [layer_key(layer, x, threads) for layer, x in pairs]
        found: dict[str, float | None] = {}
        for key in keys:
            hit = self.store.get(key)
            found[key] = float(hit) if isinstance(hit, (int, float)) else None
        missing = {key: pair for key, pair in zip(keys, pairs, strict=True) if found[key] is None}
        if missing and measure:
            found.update(self._measure(missing, threads=threads, repeats=repeats))
        return [found[key] for key in keys]

    def remeasure(
        self, layer: nn.Module, x: torch.Tensor, *, threads: int | None = None, repeats: int = 7
    ) -> float:
        """Time ``layer`` on inputs like ``x`` now and store the entry (replacing any)."""
        return self.remeasure_many([(layer, x)], threads=threads, repeats=repeats)[0]

    def remeasure_many(
        self,
        pairs: Iterable[tuple[nn.Module, torch.Tensor]],
        *,
        threads: int | None = None,
        repeats: int = 7,
    ) -> list[float]:
        """:meth:`remeasure` of each ``(layer, x)``, measured together."""
        pairs = list(pairs)
        keys = [layer_key(layer, x, threads) for layer, x in pairs]
        seconds = self._measure(
            dict(zip(keys, pairs, strict=True)), threads=threads, repeats=repeats
        )
        return [seconds[key] for key in keys]

    def _measure(
        self,
        items: Mapping[str, tuple[nn.Module, torch.Tensor]],
        *,
        threads: int | None,
        repeats: int,
    ) -> dict[str, float]:
        seconds = self._time(items, threads=threads, repeats=repeats)
        for key, value in seconds.items():
            self.store.set(key, value)
        self.measured += len(seconds)
        return seconds

    def _time(
        self,
        items: Mapping[str, tuple[nn.Module, torch.Tensor]],
        *,
        threads: int | None,
        repeats: int,
    ) -> dict[str, float]:
        """Seconds of each ``key: (layer, x)`` to store: all timed together
        (:func:`time_modules`)."""
        return time_modules(items, threads=threads, repeats=repeats)

    def get_value(self, key: str) -> Any:
        return self.store.get(key)

    def set_value(self, key: str, value: Any) -> None:
        self.store.set(key, value)


#: The rounds of one :func:`time_modules` call span at least this long (idle waits between
#: rounds when the modules are few and fast). A shared machine's speed moves in phases of
#: about a second (on the 2-core development host a 128→128 3×3 convolution ran 0.46 or
#: 0.97 ms a call, switching every few seconds); an entry whose samples all fall in one
#: phase carries that phase into every prediction that uses it.
ENTRY_SECONDS = 1.0

#: At most this many bytes of random inputs are alive at once; more modules are measured in
#: consecutive groups.
MAX_INPUT_BYTES = 256 * 2**20


def time_modules(
    items: Mapping[Any, tuple[nn.Module, torch.Tensor]],
    *,
    threads: int | None = None,
    repeats: int = 7,
    min_seconds: float | None = None,
) -> dict[Any, float]:
    """Seconds of ``module(x')`` for each ``key: (module, x)``, ``x'`` random and shaped and
    laid out like ``x``: the fastest of ``repeats`` samples (on a shared machine only
    interference makes a sample slower; the model's remainder, calibrated against a median
    end-to-end time, absorbs the typical interference).

    The modules are sampled in interleaved rounds (A B C A B C ...) spread over at least
    ``min_seconds`` (default :data:`ENTRY_SECONDS`), so that every entry sees the same phases
    of the machine, and entries measured together are consistent with each other. Modules
    with equal input shapes share one random input; inputs beyond :data:`MAX_INPUT_BYTES`
    are measured in further groups.
    """
    spread = ENTRY_SECONDS if min_seconds is None else min_seconds
    out: dict[Any, float] = {}
    for group in _groups(items):
        out.update(_time_group(group, threads, repeats, spread))
    return out


def _input_id(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device)


def _groups(
    items: Mapping[Any, tuple[nn.Module, torch.Tensor]],
) -> list[dict[Any, tuple[nn.Module, torch.Tensor]]]:
    groups: list[dict[Any, tuple[nn.Module, torch.Tensor]]] = []
    shapes: set[tuple] = set()
    size = 0
    for key, (module, x) in items.items():
        ident, nbytes = _input_id(x), x.numel() * x.element_size()
        if not groups or (ident not in shapes and size + nbytes > MAX_INPUT_BYTES):
            groups.append({})
            shapes, size = set(), 0
        if ident not in shapes:
            shapes.add(ident)
            size += nbytes
        groups[-1][key] = (module, x)
    return groups


def _time_group(
    items: Mapping[Any, tuple[nn.Module, torch.Tensor]],
    threads: int | None,
    repeats: int,
    min_seconds: float,
) -> dict[Any, float]:
    inputs: dict[tuple, torch.Tensor] = {}
    calls = {}
    for key, (module, x) in items.items():
        ident = _input_id(x)
        if ident not in inputs:
            inputs[ident] = like(x)
        calls[key] = partial(module, inputs[ident])
    device = next((x.device for _, x in items.values() if x.device.type == "cuda"), None)
    with num_threads(threads), torch.inference_mode():
        samples = interleaved_samples(
            calls, repeats=repeats, warmup=2, target_s=0.002, device=device, spread=min_seconds
        )
    return {key: min(v) for key, v in samples.items()}


TABLE = LatencyTable()
