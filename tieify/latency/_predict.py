"""``tieify.predict_latency``: layer lookup table, scaled, + the measured non-layer remainder.

predicted latency = nonlayer + scale · Σ table[layer]

- The table (:mod:`tieify.latency._table`) holds the fastest sampled forward time of every
  layer configuration (convolutions, linears, tied layers) on its own input; the entries a
  model is missing are measured together, in interleaved rounds.
- The remainder is everything else, in two numbers: ``scale``, how much slower the layers run
  inside the model than alone (cold caches, idle threads), and ``nonlayer``, what the norms,
  activations, pooling, residual adds and Python overhead cost, plus whatever each layer
  call costs in the model that does not shrink with its work. Tying a layer never changes
  its output's shape, so every plan of one model shares one remainder, calibrated on the
  first model seen with a given structure (see :func:`_calibrate`): a line through two
  models' measured times against their Σ table entries, that model and a thinner variant
  of it (its dense layers tied at :data:`VARIANT_B`); where no such variant exists, the
  model timed end to end and with every layer stubbed out. Each time is the fastest of
  at least :data:`CALIBRATION_ROUNDS` back-to-back interleaved rounds spanning at least
  :data:`CALIBRATION_SECONDS`. The pair is cached under a key made of the model's
  non-layer structure (and layer output shapes), the input, the thread count, the torch and
  tieify versions, the machine (:func:`~tieify.latency._machine.machine_key`), the allocator
  state (:func:`tieify.tune_allocator`) and whether the model makes its inputs channels-last
  as it is called (:func:`tieify.optimize`'s entry, :func:`~tieify.latency._optimize.add_entry`).

So for a search over plans of one model only the layer configurations not yet in the table
are ever timed; the rest is arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .._modes import eval_mode
from ._allocator import allocator_state
from ._machine import machine_key, software_key
from ._optimize import example_tensors, has_entry, input_signature, run_model
from ._table import TABLE, LatencyTable, is_layer
from ._timing import (
    LATENCY_STATISTIC,
    check_statistic,
    interleaved_samples,
    num_threads,
    reduce_samples,
)

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
    return next(iter(example_tensors(example_inputs)), None)


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
            "method": f"two-point-best-{CALIBRATION_SECONDS:g}s",
            "input": sig,
            "threads": threads,
            **software_key(kernel=False),
            "machine": machine_key(x.device if isinstance(x, torch.Tensor) else "cpu"),
            "allocator": allocator_state().label,
            # Inputs made channels-last as the model is called (tieify.optimize): its
            # modules between the layers run in another layout, at another speed.
            **({"entry": True} if has_entry(model) else {}),
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
        pairs = [(layer, ins[name]) for name, layer in layers]
        if layers == [("", model)]:
            (entry,) = table.lookup_many(pairs, threads=n_threads, repeats=repeats)
            return {"": float(entry or 0.0), "<remainder>": 0.0}
        key = _remainder_key(model, outs, _example_tensor(example_inputs), n_threads)
        rem = table.get_value(key)
        calibrating = not _is_remainder(rem)
        variant = _traced_variant(model, example_inputs, layers, outs) if calibrating else None
        v_pairs = variant[1] if variant is not None else []
        # The model's missing entries and its calibration variant's are timed together, so
        # that the two points of the calibration line share the machine's phases.
        entries = table.lookup_many(pairs + v_pairs, threads=n_threads, repeats=repeats)
        seconds = [float(s or 0.0) for s in entries]
        out = {name: seconds[i] for i, (name, _) in enumerate(layers)}
        if calibrating:
            two_point = None if variant is None else (variant[0], sum(seconds[len(pairs) :]))
            rem = _calibrate(
                model, example_inputs, layers, ins, outs, out, two_point, table, repeats
            )
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
    (same thread count, torch and tieify versions and allocator state), i.e. the model's
    structure was predicted on this machine before. ``tieify search`` predicts latency by
    default only then (``latency.mode: auto``). Runs one forward pass to find the layers'
    inputs.

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
        pairs = [(layer, ins[name]) for name, layer in layers]
        if None in table.lookup_many(pairs, threads=n_threads, measure=False):
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
    two_point: tuple[nn.Module, float] | None,
    table: LatencyTable,
    repeats: int,
) -> dict[str, float]:
    """The first model seen with this structure calibrates its remainder.

    The in-model time of the layers is not their table entries' sum: inside the model they
    run slower (weights and inputs no longer in cache, threads gone idle: 1.3-1.9× their
    entries on ResNet-50 at batch 1, 96×96), and part of that is a per-call cost that does
    not shrink with the layer's work (at 224×224, ResNet-50 with every layer tied at B = 4
    spent 1.15× its entries inside the model where the dense one spent 1.06×). So the
    remainder is a line, time = ``nonlayer`` + ``scale`` · Σ entries, through two models of
    this structure timed side by side:

    - two-point (preferred): ``model`` and a variant with its dense layers tied at
      :data:`VARIANT_B` (built with :func:`tieify.tieify`), when the variant's layers do at
      most :data:`MAX_VARIANT_MACS` of ``model``'s multiply-adds (``two_point``: the variant and
      the sum of its layers' entries, see :func:`_traced_variant`);
    - stubbed: ``model`` and ``model`` with every layer replaced by a stub that returns the
      layer's recorded output (Σ entries = 0), when there is no such variant (``model`` is
      tied already, or tieify leaves it as it is), or the line's slope is out of
      :data:`SCALE_RANGE` or its intercept negative;
    - additive (scale 1, ``nonlayer`` = the whole time − the entries), where the stubbed run
      fails (a model whose control flow reads a layer's output, a layer called twice with
      different inputs) or its scale is out of :data:`SCALE_RANGE`.
    """
    n_threads = torch.get_num_threads()
    variant, v_sum = two_point if two_point is not None else (None, 0.0)
    models = {"model": model} if variant is None else {"model": model, "variant": variant}
    totals = _calibration_totals(models, example_inputs, repeats)
    if sum(out.values()) > totals["model"]:
        # The layers alone cannot take longer than the whole model: their entries were
        # timed in other conditions (a heavier load). Time them again now.
        again = table.remeasure_many(
            [(layer, ins[name]) for name, layer in layers], threads=n_threads, repeats=repeats
        )
        out.update(zip((name for name, _ in layers), again, strict=True))
        totals = _calibration_totals(models, example_inputs, repeats)
    total, layer_sum = totals["model"], sum(out.values())
    if variant is not None:
        line = _line(total, layer_sum, totals["variant"], v_sum)
        if line is not None:
            return line
    additive = {"nonlayer": max(0.0, total - layer_sum), "scale": 1.0}
    try:
        nonlayer = _stubbed_total(model, example_inputs, layers, outs, repeats)
    except Exception:  # noqa: BLE001 - any failure of the stubbed run: the additive form
        return additive
    return _line(total, layer_sum, nonlayer, 0.0) or additive


def _line(t1: float, e1: float, t0: float, e0: float) -> dict[str, float] | None:
    """The remainder through (e1, t1) and (e0, t0), e1 > e0; ``None`` if implausible."""
    if e1 <= e0:
        return None
    scale = (t1 - t0) / (e1 - e0)
    nonlayer = t1 - scale * e1
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1] or nonlayer < 0:
        return None
    return {"nonlayer": nonlayer, "scale": scale}


#: The calibration's thinner variant: ``model`` with its dense layers tied at this B.
VARIANT_B = 4
#: The variant is used when its layers do at most this fraction of ``model``'s
#: multiply-adds (else the two points are too close for a line).
MAX_VARIANT_MACS = 0.7


def _traced_variant(
    model: nn.Module,
    example_inputs: Any,
    layers: list[tuple[str, nn.Module]],
    outs: dict[str, Any],
) -> tuple[nn.Module, list[tuple[nn.Module, torch.Tensor]]] | None:
    """The calibration's variant of ``model`` (:func:`_variant`) and its layers with their
    inputs, or ``None`` where there is no variant or it does not run."""
    variant = _variant(model, example_inputs, layers, outs)
    if variant is None:
        return None
    try:
        v_layers, v_ins, _ = _traced_layers(variant, example_inputs)
    except Exception:  # noqa: BLE001 - a variant that does not run: no two-point line
        return None
    return variant, [(layer, v_ins[name]) for name, layer in v_layers]


def _layer_macs(layer: nn.Module, out: Any) -> int:
    """Multiply-adds of a conv/linear/tied layer, from its recorded output (0 if unknown)."""
    if not isinstance(out, torch.Tensor):
        return 0
    per_output = getattr(layer, "in_features", None)
    if per_output is None:
        per_output = getattr(layer, "in_channels", 0) // max(1, getattr(layer, "groups", 1))
        per_output *= math.prod(getattr(layer, "kernel_size", (1,)))
    return out.numel() * per_output // max(1, getattr(layer, "B", 1))


def _variant(
    model: nn.Module,
    example_inputs: Any,
    layers: list[tuple[str, nn.Module]],
    outs: dict[str, Any],
) -> nn.Module | None:
    """``model`` with its dense layers tied at :data:`VARIANT_B`, or ``None`` where that does
    not remove enough work (see :data:`MAX_VARIANT_MACS`) or tieify cannot rewrite it."""
    from .._api import tieify

    try:
        with warnings.catch_warnings():  # the variant is internal: no advice for the user
            warnings.simplefilter("ignore")
            variant = tieify(model, B=VARIANT_B, example_inputs=example_inputs)
    except Exception:  # noqa: BLE001 - no variant: the stubbed calibration instead
        return None
    by_name = dict(variant.named_modules())
    macs = sum(_layer_macs(layer, outs[name]) for name, layer in layers)
    v_macs = sum(_layer_macs(by_name.get(name, layer), outs[name]) for name, layer in layers)
    return variant if macs > 0 and v_macs <= MAX_VARIANT_MACS * macs else None


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
        return _calibration_totals({"model": model}, example_inputs, repeats)["model"]
    finally:
        for layer, forward in saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


#: The remainder's end-to-end times are each model's fastest round of interleaved rounds run
#: back to back for at least this long (and at least :data:`CALIBRATION_ROUNDS` rounds). The
#: remainder is cached for every later plan of the model, so it must not carry the phase of
#: the machine it was timed in: a shared machine's speed moves in phases of seconds to
#: minutes, and only the fastest round is stable across them. On the 2-core development host
#: (``benchmarks/host_noise.py``: a ResNet-50 at 96×96, batch 1, 2 threads, timed call after
#: call for 4 minutes; ``benchmarks/results/epyc_zen5/host_noise.md``) the median call of
#: each 60-s window was 22.4-29.2 ms (of 10-s windows 20.1-32.8 ms), so no calibration
#: reproduces a median; the fastest call of each 10-s window was within 18.4-23.7 ms (7.1%
#: of the mean), of each 60-s window 18.4-20.6 ms (4.7%). The rounds run back to back, as
#: plans are measured: spread by waits (each sample re-warmed after its wait), they timed
#: the models slower than back-to-back calls do.
CALIBRATION_SECONDS = 30.0
#: The least number of interleaved rounds of the calibration (a slow model's rounds may
#: take longer than :data:`CALIBRATION_SECONDS`).
CALIBRATION_ROUNDS = 24


def _calibration_totals(
    models: dict[str, nn.Module], example_inputs: Any, repeats: int
) -> dict[str, float]:
    samples = measure_side_by_side(
        models,
        example_inputs,
        repeats=max(CALIBRATION_ROUNDS, repeats + 4),
        min_seconds=CALIBRATION_SECONDS,
        max_rounds=100_000,  # a fast model's rounds still span CALIBRATION_SECONDS
    )
    return {name: reduce_samples(v, LATENCY_STATISTIC) for name, v in samples.items()}


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
    """Predicted forward latency in seconds (inference, ``eval()`` mode) on this machine: the
    model's fastest round, as :func:`measure_latency` measures it (the time a forward takes
    when no other process slows it down; a busy machine's typical time is longer).

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
    statistic: str = LATENCY_STATISTIC,
) -> float:
    """Measured forward latency in seconds: the fastest of ``repeats`` timed rounds (eval
    mode, inference mode, after ``warmup`` untimed calls), or of more rounds until they span
    ``min_seconds``. Each round times enough back-to-back calls to last about
    ``sample_seconds``.

    The fastest round is what :func:`predict_latency` predicts: on a shared machine only
    other processes make a round slower, so it is the model's own time and reproduces from
    one run to the next, where the median follows the machine's load of the moment (see
    :data:`~tieify.latency._predict.CALIBRATION_SECONDS`). ``statistic="median"`` gives the
    median round instead. On a busy machine the fastest round of rounds spread over tens of
    seconds (``min_seconds``) is the stable figure; a few rounds back to back see one phase.

    Example:
        >>> import torch
        >>> from tieify.latency import measure_latency
        >>> measure_latency(torch.nn.ReLU(), torch.randn(8)) > 0
        True
    """
    check_statistic(statistic)
    samples = measure_side_by_side(
        {"model": model},
        example_inputs,
        repeats=repeats,
        threads=threads,
        min_seconds=min_seconds,
        warmup=warmup,
        sample_seconds=sample_seconds,
    )
    return reduce_samples(samples["model"], statistic)


def measure_side_by_side(
    models: dict[str, nn.Module],
    example_inputs: Any,
    *,
    repeats: int = 7,
    threads: int | None = None,
    min_seconds: float = 0.0,
    warmup: int = 2,
    sample_seconds: float = 0.02,
    max_rounds: int | None = None,
) -> dict[str, list[float]]:
    """Seconds per forward of each model, one sample per interleaved round (A B A B ...), so
    that a burst of load on a shared machine hits every model alike; arguments as in
    :func:`measure_latency` (``max_rounds``: the most rounds ``min_seconds`` may add, see
    :func:`~tieify.latency._timing.interleaved_samples`). Each model is timed in eval and
    inference mode, and every one of its modules gets its own training flag back."""
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
            max_rounds=max_rounds,
        )
