"""``tieify.predict_latency``: layer lookup table, scaled, + the measured non-layer remainder.

predicted latency = nonlayer + scale · Σ table[layer]

- The table (:mod:`tieify.latency._table`) holds the fastest sampled forward time of every
  layer configuration (convolutions, linears, tied layers) on its own input.
- The remainder is everything else, in two numbers. ``nonlayer``: norms, activations,
  pooling, residual adds and Python overhead, timed end to end with every layer stubbed out
  (returning its recorded output). ``scale``: how much slower the layers run inside the model
  than alone (cold caches, idle threads), (whole model − nonlayer) / Σ its layers' entries.
  Tying a layer never changes its output's shape, so every plan of one model shares one
  remainder: the first model seen with a given structure is measured twice (each a
  :func:`measure_latency` median over rounds spanning at least
  :data:`CALIBRATION_SECONDS`), and the pair is cached under a key made of the model's
  non-layer structure (and layer output shapes), the input, the thread count, the torch
  version, the machine (:func:`~tieify.latency._machine.machine_key`) and the allocator
  state (:func:`tieify.tune_allocator`).

So for a search over plans of one model only the layer configurations not yet in the table
are ever timed; the rest is arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from typing import Any, Callable

import torch
from torch import nn

from .._modes import eval_mode
from ._allocator import allocator_state
from ._machine import machine_key
from ._optimize import input_signature, run_model
from ._table import TABLE, LatencyTable, is_layer
from ._timing import interleaved_samples, num_threads

__all__ = ["predict_latency", "measure_latency", "latency_breakdown", "is_warm"]


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-most layer modules (a layer's children are part of it)."""
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if is_layer(child):
                found.append((full, child))
            else:
                walk(full, child)

    if is_layer(model):
        return [("", model)]
    walk("", model)
    return found


def _example_tensor(example_inputs: Any) -> torch.Tensor | None:
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs
    if isinstance(example_inputs, (tuple, list)):
        for v in example_inputs:
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(example_inputs, dict):
        for v in example_inputs.values():
            if isinstance(v, torch.Tensor):
                return v
    return None


def _capture(model: nn.Module, example_inputs: Any, layers: list[tuple[str, nn.Module]]):
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, Any] = {}
    handles = []
    for name, layer in layers:

        def hook(m: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            if name not in ins and args and isinstance(args[0], torch.Tensor):
                ins[name] = args[0].detach()
                outs[name] = out.detach() if isinstance(out, torch.Tensor) else out

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def _traced_layers(model: nn.Module, example_inputs: Any):
    """The layers that ran on ``example_inputs`` (in eval mode), with their inputs and outputs."""
    with eval_mode(model):
        layers = _layers(model)
        ins, outs = _capture(model, example_inputs, layers)
    return [(n, m) for n, m in layers if n in ins], ins, outs


def _remainder_key(model: nn.Module, outs: dict[str, Any], x: Any, threads: int) -> str:
    parts = []
    layer_names = set(outs)
    for name, module in model.named_modules():
        if name in layer_names:
            out = outs[name]
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            parts.append(f"{name}:LAYER{shape}")
        elif not any(name.startswith(n + ".") for n in layer_names if n):
            parts.append(f"{name}:{type(module).__name__}({module.extra_repr()})")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    sig = input_signature(x) if isinstance(x, torch.Tensor) else {}
    return json.dumps(
        {
            "remainder": digest,
            "method": f"scaled-{CALIBRATION_SECONDS:g}s",
            "input": sig,
            "threads": threads,
            "torch": torch.__version__,
            "machine": machine_key(x.device if isinstance(x, torch.Tensor) else "cpu"),
            "allocator": allocator_state().label,
        },
        sort_keys=True,
    )


def latency_breakdown(
    model: nn.Module,
    example_inputs: Any,
    *,
    threads: int | None = None,
    table: LatencyTable | None = None,
    repeats: int = 7,
) -> dict[str, float]:
    """Predicted seconds per layer (by module name: its table entry times the model's
    in-model scale) plus ``"<remainder>"`` (the non-layer time); they sum to
    :func:`predict_latency`.

    Same arguments as :func:`predict_latency` (a model only).
    """
    table = TABLE if table is None else table
    if not isinstance(model, nn.Module):
        raise TypeError(f"latency_breakdown expects an nn.Module, but got {type(model).__name__}.")
    with num_threads(threads), eval_mode(model):
        n_threads = torch.get_num_threads()
        layers, ins, outs = _traced_layers(model, example_inputs)
        out: dict[str, float] = {}
        for name, layer in layers:
            seconds = table.lookup(layer, ins[name], threads=n_threads, repeats=repeats)
            out[name] = float(seconds or 0.0)
        if layers == [("", model)]:
            out["<remainder>"] = 0.0
            return out
        key = _remainder_key(model, outs, _example_tensor(example_inputs), n_threads)
        rem = table.get_value(key)
        if not _is_remainder(rem):
            rem = _calibrate(model, example_inputs, layers, ins, outs, out, table, repeats)
            table.set_value(key, rem)
        scale = float(rem["scale"])
        for name in out:
            out[name] *= scale
        out["<remainder>"] = float(rem["nonlayer"])
        return out


def is_warm(
    model: nn.Module,
    example_inputs: Any,
    *,
    threads: int | None = None,
    table: LatencyTable | None = None,
) -> bool:
    """Whether :func:`predict_latency` can answer for ``model`` without timing anything.

    True when the table holds every layer of ``model`` on these inputs and its remainder
    (same thread count, torch version and allocator state), i.e. the model's structure was
    predicted on this machine before. ``tieify search`` predicts latency by default only then
    (``latency.mode: auto``). Runs one forward pass to find the layers' inputs.

    Example:
        >>> import torch
        >>> from tieify.latency import LatencyTable, is_warm
        >>> conv, x = torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8)
        >>> is_warm(conv, x, table=LatencyTable(persist=False))
        False
    """
    table = TABLE if table is None else table
    with num_threads(threads):
        n_threads = torch.get_num_threads()
        layers, ins, outs = _traced_layers(model, example_inputs)
        for name, layer in layers:
            if table.lookup(layer, ins[name], threads=n_threads, measure=False) is None:
                return False
        if layers == [("", model)]:
            return True
        key = _remainder_key(model, outs, _example_tensor(example_inputs), n_threads)
        return _is_remainder(table.get_value(key))


def _is_remainder(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("nonlayer"), (int, float))
        and isinstance(value.get("scale"), (int, float))
    )


#: Bounds of the in-model scale of the layers' table times (a calibration outside them is
#: noise, and the plain sum is kept).
SCALE_RANGE = (0.5, 4.0)


def _calibrate(
    model: nn.Module,
    example_inputs: Any,
    layers: list[tuple[str, nn.Module]],
    ins: dict[str, torch.Tensor],
    outs: dict[str, Any],
    out: dict[str, float],
    table: LatencyTable,
    repeats: int,
) -> dict[str, float]:
    """The first model seen with this structure calibrates its remainder, in two parts:

    - ``nonlayer``: the model timed end to end with every layer replaced by a stub that
      returns the layer's recorded output (what the norms, activations, pooling, adds and
      Python overhead cost on their own);
    - ``scale``: (the whole model's time − ``nonlayer``) / Σ the layers' table entries. A layer
      inside the model runs slower than when timed alone (its weights and input are no longer
      in cache, the threads have gone idle): on ResNet-50 at batch 1, 96×96, in-model layer
      times were 1.3-1.9× their table entries. The prediction scales every layer's entry by
      it, so a plan whose layers are cheaper also sheds that overhead, which an additive
      remainder kept whole (benchmarks/latency_model.py).

    Where the stubbed run fails (a model whose control flow reads a layer's output, a layer
    called twice with different inputs) or the scale is out of :data:`SCALE_RANGE`, the
    scale is 1 and ``nonlayer`` is the whole time minus the entries.
    """
    n_threads = torch.get_num_threads()
    total = _calibration_total(model, example_inputs, repeats)
    if sum(out.values()) > total:
        # The layers alone cannot take longer than the whole model: their entries were
        # timed in other conditions (a heavier load). Time them again now.
        for name, layer in layers:
            out[name] = table.remeasure(layer, ins[name], threads=n_threads, repeats=repeats)
        total = _calibration_total(model, example_inputs, repeats)
    layer_sum = sum(out.values())
    additive = {"nonlayer": max(0.0, total - layer_sum), "scale": 1.0}
    try:
        nonlayer = _stubbed_total(model, example_inputs, layers, outs, repeats)
    except Exception:  # noqa: BLE001 - any failure of the stubbed run: the additive form
        return additive
    scale = (total - nonlayer) / layer_sum if layer_sum > 0 else 0.0
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        return additive
    return {"nonlayer": nonlayer, "scale": scale}


def _stubbed_total(
    model: nn.Module,
    example_inputs: Any,
    layers: list[tuple[str, nn.Module]],
    outs: dict[str, Any],
    repeats: int,
) -> float:
    """``model``'s time with each layer's forward replaced by returning its recorded output."""
    saved = []
    try:
        for name, layer in layers:
            saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = lambda *args, _out=outs[name], **kwargs: _out
        return _calibration_total(model, example_inputs, repeats)
    finally:
        for layer, forward in saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


#: The remainder's end-to-end measurement spans at least this long. It is cached for every
#: later plan of the model, and a shared machine's speed moves within seconds (on the 2-core
#: development host, MobileNetV3's half-second medians went from 12.9 to 17.1 ms within
#: 1.5 s), so one short burst would bias all of them alike.
CALIBRATION_SECONDS = 2.0


def _calibration_total(model: nn.Module, example_inputs: Any, repeats: int) -> float:
    return measure_latency(
        model, example_inputs, repeats=repeats + 4, min_seconds=CALIBRATION_SECONDS
    )


def _resolve(model_or_plan: Any, model: nn.Module | None) -> nn.Module:
    if isinstance(model_or_plan, nn.Module):
        return model_or_plan
    if model is None:
        raise TypeError(
            "predict_latency(model_or_plan, ...) got a plan "
            f"({type(model_or_plan).__name__}) but no base model; pass model=<the dense model "
            "the plan was made for>, or pass the tied model itself."
        )
    apply = getattr(model_or_plan, "apply", None)
    if not callable(apply):
        raise TypeError(
            "predict_latency(model_or_plan, ...) expects an nn.Module or a plan with an "
            f"apply(model) method (tieify.Plan), but got {type(model_or_plan).__name__}."
        )
    return apply(model)


def predict_latency(
    model_or_plan: Any,
    example_inputs: Any,
    *,
    model: nn.Module | None = None,
    threads: int | None = None,
    table: LatencyTable | None = None,
    repeats: int = 7,
) -> float:
    """Predicted forward latency in seconds (inference, ``eval()`` mode) on this machine.

    A per-layer lookup table (each layer configuration timed once on its own and cached on
    disk), scaled to the layers' in-model speed, plus the model's non-layer time (both
    calibrated once per model structure and input; see the module doc). Layer
    configurations missing from the table are measured on the spot, so the first call on a
    new model is slower; later calls, also of other plans of the same model,
    only time layers they have not seen. The cache lives under ``$TIEIFY_CACHE_DIR`` (else
    ``$XDG_CACHE_HOME/tieify``, else ``~/.cache/tieify``).

    Args:
        model_or_plan: the model to predict (dense, tied or mixed), or a plan to apply to
            ``model`` (``plan.apply(model)`` builds a tied copy; ``model`` is not changed).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs, at
            the batch size, resolution, dtype and memory layout to predict for.
        model: the base model when ``model_or_plan`` is a plan.
        threads: predict for this many intra-op threads (default: the current setting).
        table: the lookup table (default: the process-wide one, backed by the disk cache).
        repeats: timing rounds for each entry measured.

    Returns:
        Seconds per forward pass.

    Example:
        >>> import torch, tieify
        >>> from tieify.nn import TiedConv2d
        >>> net = torch.nn.Sequential(TiedConv2d(16, 32, 3, padding=1, B=4), torch.nn.ReLU())
        >>> seconds = tieify.predict_latency(net, torch.randn(1, 16, 8, 8))  # doctest: +SKIP
    """
    resolved = _resolve(model_or_plan, model)
    parts = latency_breakdown(
        resolved, example_inputs, threads=threads, table=table, repeats=repeats
    )
    return float(sum(parts.values()))


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    repeats: int = 7,
    threads: int | None = None,
    min_seconds: float = 0.0,
    warmup: int = 2,
    sample_seconds: float = 0.02,
) -> float:
    """Measured forward latency in seconds: the median of ``repeats`` timed rounds (eval mode,
    inference mode, after ``warmup`` untimed calls), or of more rounds until they span
    ``min_seconds``. Each round times enough back-to-back calls to last about
    ``sample_seconds``.

    Example:
        >>> import torch
        >>> from tieify.latency import measure_latency
        >>> measure_latency(torch.nn.ReLU(), torch.randn(8)) > 0
        True
    """
    samples = measure_side_by_side(
        {"model": model},
        example_inputs,
        repeats=repeats,
        threads=threads,
        min_seconds=min_seconds,
        warmup=warmup,
        sample_seconds=sample_seconds,
    )
    return statistics.median(samples["model"])


def measure_side_by_side(
    models: dict[str, nn.Module],
    example_inputs: Any,
    *,
    repeats: int = 7,
    threads: int | None = None,
    min_seconds: float = 0.0,
    warmup: int = 2,
    sample_seconds: float = 0.02,
) -> dict[str, list[float]]:
    """Seconds per forward of each model, one sample per interleaved round (A B A B ...), so
    that a burst of load on a shared machine hits every model alike; arguments as in
    :func:`measure_latency`. Each model is timed in eval and inference mode, and every one
    of its modules gets its own training flag back."""
    x = example_inputs
    device = None
    t = _example_tensor(x)
    if t is not None and t.device.type == "cuda":
        device = t.device

    def call(m: nn.Module) -> Callable[[], Any]:
        return lambda: run_model(m, x)

    with eval_mode(*models.values()), num_threads(threads), torch.inference_mode():
        return interleaved_samples(
            {name: call(m) for name, m in models.items()},
            repeats=repeats,
            warmup=warmup,
            target_s=sample_seconds,
            device=device,
            min_seconds=min_seconds,
        )
