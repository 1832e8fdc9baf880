"""``tieify.optimize``: time each tied layer's forward paths once per shape and pin the fastest.

Like ``torch.backends.cudnn.benchmark``: the first time a layer configuration is seen with a
given input (shape, dtype, memory layout, device, thread count) every applicable path is timed
in interleaved rounds and the fastest is stored; later calls, in this process or the next
(the choice is cached on disk, see :mod:`tieify.latency._cache`), reuse it without timing.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
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


def _unambiguous_layout(t: torch.Tensor) -> str | None:
    """``t``'s layout (:func:`~tieify.nn._paths.layout_of`), or None where it is both NCHW
    and channels-last (a 1×1 filter bank) and so no reorder is ever needed."""
    if _paths.is_channels_last(t) and _paths.is_channels_first(t):
        return None
    return _paths.layout_of(t)


def weight_signature(layer: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """``{"weight_layout": ...}`` where ``layer``'s 4-D or 5-D weight is laid out otherwise
    than its input ``x``, else nothing (so the keys of models converted whole, and of
    NCHW ones, are as they were). PyTorch's convolution reorders such a weight on every
    call: a dense model fed channels-last at its entry (:func:`add_entry`) keeps its NCHW
    weights, and a 3×3 conv of 512 channels at 7×7, batch 8, ran 1.36× the time of the
    same conv with channels-last weights (256 channels at 14×14, batch 1: 1.21×; Zen 5
    EPYC, 2 threads, 2026-12-05, 9 interleaved rounds)."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() not in (4, 5) or x.dim() != w.dim():
        return {}
    wl = _unambiguous_layout(w)
    return {} if wl is None or wl == _paths.layout_of(x) else {"weight_layout": wl}


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
        "layer": layer_signature(layer) | weight_signature(layer, x),
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
    """The first input each module of ``types`` computes on in one forward pass of ``model``
    on ``example_inputs`` (batched; a tied conv's as it runs it, :func:`_paths.run_layout`)."""
    return _capture(model, example_inputs, types)[0]


def _capture(
    model: nn.Module, example_inputs: Any, types: tuple[type, ...]
) -> tuple[dict[nn.Module, torch.Tensor], Any]:
    """:func:`_capture_inputs` and the model's output."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if module not in seen and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if x.dim() == getattr(module, "_ndim", x.dim() - 2) + 1:
                x = x.unsqueeze(0)
            if isinstance(module, _TiedConvNd):
                x = _paths.run_layout(module, x)
            seen[module] = x.detach()

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, types)]
    try:  # eval: no running-statistics update from this look-only pass
        with eval_mode(model), torch.no_grad():
            out = run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen, out


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


def example_tensors(example_inputs: Any) -> list[torch.Tensor]:
    """The tensors among ``example_inputs`` as :func:`run_model` passes them: a tensor, the
    tensors of a tuple/list of positional inputs, or of a dict of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return [example_inputs]
    if isinstance(example_inputs, Mapping):
        values = list(example_inputs.values())
    else:
        values = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else []
    return [v for v in values if isinstance(v, torch.Tensor)]


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
    layout: str = "auto",
    fused: bool = False,
) -> nn.Module:
    """Pin the fastest forward path of every tied convolution in ``model``, in place.

    Runs ``model`` once on ``example_inputs`` to see each tied layer's input (shape, dtype,
    memory layout, device), times the layer's applicable paths (see
    :mod:`tieify.nn._paths`) in interleaved rounds and sets ``layer.path`` to the fastest. The
    choice is cached per (layer configuration, input, threads, torch and tieify versions, and
    the kernel's build where it is a candidate), in memory and on disk under the tieify cache
    directory (``$TIEIFY_CACHE_DIR``, else ``$XDG_CACHE_HOME/tieify``, else
    ``~/.cache/tieify``), so it is measured once per machine.
    Only ``layer.path`` and ``layer.channels_last`` change (no weights), and, where
    ``layout="auto"`` finds it faster, a forward pre-hook on ``model`` that makes its image
    inputs channels-last (below); a pinned path that
    does not apply to a later input (another memory layout) falls back to the cheap rule.
    Forward time is what is measured (inference); the paths are equally valid for training,
    but a pinned path is taken in training too, where the rule would choose by forward and
    backward (:func:`tieify.nn._paths.default_path`: the kernel's backward is slower than
    its forward suggests): optimize a model for inference, or set ``layer.path = "auto"``
    on its tied layers again before training it.

    Where tied 2-D or 3-D convolutions receive inputs that are not channels-last (a model
    run on NCHW inputs), ``layout`` decides whether they run in channels-last
    (:attr:`~tieify.nn.TiedConv2d.channels_last`: the layer copies its input once and
    returns channels-last, so the layers after it compute on channels-last activations and
    the copies back and forth of an NCHW layer are gone): ``"auto"`` times the model both
    ways on ``example_inputs`` (interleaved rounds, each way on its own fastest paths;
    cached like the paths) and keeps the faster; ``"channels_last"`` sets it without
    timing; ``"input"`` keeps each layer in its input's layout. Either of the first two
    first runs the model that way: if it raises (code that needs NCHW memory, e.g.
    ``x.view(n, -1)`` on a feature map) or returns other values, the layers keep their
    inputs' layout, with a warning that says why; under ``"auto"`` they keep it too where
    the model would return a feature map in another layout than it did (a backbone's NCHW
    features stay NCHW; ``"channels_last"`` accepts channels-last ones).

    ``"auto"`` (unfused) also times a third way, where the model's 4-D and 5-D floating
    inputs are made channels-last as it is called (a forward pre-hook on ``model``, see
    :func:`add_entry`), so that the layers before the first tied one (a dense stem, its
    batch norm and pooling) compute on channels-last too, and keeps it only where it is
    faster than both others and the model's outputs are unchanged. On a 2-vCPU Zen 5 EPYC
    (2026-12-04, ResNet-50 with every bottleneck conv at B = 4, 224×224 NCHW input, 2
    threads) PyTorch's max pooling after the stem took 2.7 ms on NCHW and 0.29 ms on
    channels-last at batch 1 (21.3 and 1.6 ms at batch 8), 20% of the tied model's NCHW-fed
    forward at batch 8. The hook is kept by ``copy.deepcopy`` and ``torch.save`` of the
    model, not by :func:`tieify.fuse`'s traced copy; ``layout="input"`` or
    ``"channels_last"`` in a later call removes it (:func:`remove_entry` does too). A model
    with no tied convolution to move (a dense model, such as the baseline ``tieify
    search`` times its candidates against with ``latency.optimize``) is timed two ways,
    its inputs as given and through this hook, and keeps the faster: a tied model is not
    credited with the dense model's own gain from channels-last.

    With ``fused=True``, ``"auto"`` times the two layouts as :func:`tieify.fuse` will run
    them (each configuration fused on a copy, with ``example_inputs``): the batch norm, add
    and ReLU go into the kernel's epilogue on channels-last inputs only, so a layout that
    loses unfused can win fused. The README's default ResNet-8 (B = 4, 16×16 NCHW input,
    batch 1, one thread, 2026-12-03): unfused, the two layouts ran 1.06× and 1.01× the dense
    model's time (a choice the host's noise decides), fused 1.02× and 0.79×; in a later run
    ``"auto"`` kept NCHW (fused: 1.072×) where ``fused=True`` moved the layers to
    channels-last (0.832×).

    Args:
        model: a module holding tied convolutions (others are left alone; a model without
            any can get the entry hook only).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs,
            laid out as in production (e.g. ``channels_last``).
        repeats: interleaved timing rounds per layer configuration.
        cache: read and write the on-disk cache.
        threads: time with this many threads (default: ``torch.get_num_threads()``).
        layout: ``"auto"``, ``"channels_last"`` or ``"input"`` (above).
        fused: the model will be fused (:func:`tieify.fuse`) after: time the layouts fused.

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
    if layout not in LAYOUTS:
        raise ValueError(
            f"tieify.optimize: layout must be one of {', '.join(map(repr, LAYOUTS))}, but got "
            f"{layout!r}; 'auto' times the model with its tied layers in channels-last and in "
            "their inputs' layout and keeps the faster."
        )
    convs = [m for m in model.modules() if isinstance(m, _TiedConvNd)]
    for layer in convs:  # each layer in its input's layout, the reference
        layer.channels_last = False
    remove_entry(model)  # and the model's inputs as given
    inputs, reference = _capture(model, example_inputs, (_TiedConvNd,))
    kept = _choose_paths(inputs, repeats=repeats, cache=cache, threads=threads)
    movable = [
        layer
        for layer, x in inputs.items()
        if isinstance(layer, _TiedConvNd)
        and layer._ndim in (2, 3)
        and not _paths.is_channels_last(x)
    ]
    if layout == "input":
        return model
    configs = {"input": kept}
    if movable:
        moved = _channels_last_config(
            model, example_inputs, movable, reference, layout == "auto", repeats, cache, threads
        )
        if moved is None:  # it does not run channels-last (the warning says why)
            _apply(kept, movable, False)
            return model
        if layout != "auto":
            _apply(moved, movable, True)
            return model
        configs["channels_last"] = moved
    elif layout != "auto":  # no tied conv to move (a dense model): nothing to set
        return model
    if not fused and _entry_applies(example_inputs):
        entered = _entry_config(model, example_inputs, reference, repeats, cache, threads)
        if entered is not None:
            configs["entry"] = entered
    if len(configs) == 1:  # nothing to move and no entry: the inputs' layout, as pinned
        return model
    choice = _fastest(
        model,
        example_inputs,
        movable,
        configs,
        repeats=repeats,
        threads=threads,
        cache=cache,
        fused=fused,
    )
    _apply(configs[choice], movable, choice != "input")
    if choice == "entry":
        add_entry(model)
    return model


#: ``optimize``'s layouts: timed, channels-last, the inputs'.
LAYOUTS = ("auto", "channels_last", "input")

#: Each tied conv's pinned path, in one layout configuration.
_Paths = dict[_TiedConvNd, str]


def _choose_paths(inputs: dict[nn.Module, torch.Tensor], **kw: Any) -> _Paths:
    """Pin each tied conv's fastest path on its captured input (:func:`choose_path`)."""
    paths = {}
    for layer, x in inputs.items():
        if isinstance(layer, _TiedConvNd):
            layer.path = paths[layer] = choose_path(layer, x, **kw)
    return paths


def _apply(paths: _Paths, movable: list[_TiedConvNd], channels_last: bool) -> None:
    """Pin ``paths``, with the ``movable`` layers in channels-last or in their inputs' layout."""
    for layer, path in paths.items():
        layer.path = path
    for layer in movable:
        layer.channels_last = channels_last


def _channels_last_config(
    model: nn.Module,
    example_inputs: Any,
    movable: list[_TiedConvNd],
    reference: Any,
    layouts: bool,
    repeats: int,
    cache: bool,
    threads: int | None,
) -> _Paths | None:
    """With ``movable`` in channels-last: the model run once on ``example_inputs`` and its
    output checked against ``reference``, then each tied conv's path chosen on the inputs it
    now receives. None where the model does not run so: it raises or returns other values
    (with a warning that says why), or, with ``layouts``, returns a tensor laid out
    otherwise (``"auto"``'s rule: a feature map is returned as the model returned it).
    The layers are left in channels-last either way: the caller applies the configuration
    it keeps."""
    for layer in movable:
        layer.channels_last = True
    problem: str | None
    try:
        inputs, out = _capture(model, example_inputs, (_TiedConvNd,))
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        problem = f"the model raised {type(e).__name__}: {e}"
    else:
        problem = _output_difference(out, reference)
    relaid = problem is None and layouts and _relaid(out, reference)
    if problem is not None:
        warnings.warn(
            f"tieify.optimize: the tied convolutions keep their inputs' (NCHW) layout: with "
            f"them in channels-last, {problem}. Code that needs NCHW memory after a tied "
            "layer (x.view(n, -1) on a feature map) works on both layouts as x.reshape or "
            "torch.flatten; layout='input' skips this check.",
            RuntimeWarning,
            stacklevel=3,
        )
    if problem is not None or relaid:
        return None
    return _choose_paths(inputs, repeats=repeats, cache=cache, threads=threads)


class _Mismatch(ValueError):
    """The model's output has another structure than the reference run's."""


def _tensor_pairs(out: Any, reference: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The tensors of ``out`` (the model run with tied convs in channels-last) paired with
    those of ``reference`` (run in its inputs' layout), walking tuples, lists and dicts;
    :class:`_Mismatch` where the structures differ."""
    if isinstance(reference, torch.Tensor):
        if not isinstance(out, torch.Tensor):
            raise _Mismatch(f"it returned {type(out).__name__} instead of a tensor")
        yield out, reference
    elif isinstance(reference, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(reference):
            raise _Mismatch(f"it returned {type(out).__name__} instead of {reference!r:.60}")
        for o, r in zip(out, reference, strict=True):
            yield from _tensor_pairs(o, r)
    elif isinstance(reference, Mapping):
        if not isinstance(out, Mapping) or set(out) != set(reference):
            raise _Mismatch(f"it returned other keys than {sorted(map(str, reference))}")
        for k in reference:
            yield from _tensor_pairs(out[k], reference[k])


#: The relative difference (``‖out − reference‖ / ‖reference‖``) a model's output may show
#: between its channels-last and NCHW runs, in units of its dtype's epsilon (floor:
#: :data:`LAYOUT_MIN_TOLERANCE`): the layouts' paths sum in other orders, and the rounding
#: compounds over depth. Code that misreads channels-last memory as NCHW (``x.view(n, -1)``
#: on a feature map) permutes the values, a relative difference of order 1. On an H200 the
#: bfloat16 ResNet-50 with every bottleneck conv tied at B = 4 (batch 64) failed the former
#: element-wise check (rtol 1e-3) from rounding alone and stayed in NCHW.
LAYOUT_TOLERANCE_EPS = 8
LAYOUT_MIN_TOLERANCE = 1e-3


def rounding_tolerance(dtype: torch.dtype, device_type: str = "cpu") -> float:
    """The relative difference between two runs of a model in ``dtype`` on ``device_type``
    taken as rounding: :data:`LAYOUT_TOLERANCE_EPS` epsilons of the dtype, or of TF32 (10
    mantissa bits) for float32 on CUDA while PyTorch allows TF32 there."""
    eps = torch.finfo(dtype).eps
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    if device_type == "cuda" and dtype in (torch.float32, torch.complex64) and tf32:
        eps = max(eps, 2.0**-10)
    return max(LAYOUT_MIN_TOLERANCE, LAYOUT_TOLERANCE_EPS * eps)


def _relative_difference(out: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖out − reference‖ / ‖reference‖`` in double precision, positions where both hold
    the same value (equal infinities, both NaN) counting as equal; NaN where they differ
    otherwise in a non-finite value."""
    wide = torch.complex128 if reference.is_complex() else torch.float64
    o, r = out.detach().to(wide), reference.detach().to(wide)
    same = (o == r) | (o.isnan() & r.isnan())
    if bool(same.all()):
        return 0.0
    diff = float(torch.linalg.vector_norm((o - r).masked_fill(same, 0)))
    norm = float(torch.linalg.vector_norm(r.masked_fill(~r.isfinite(), 0)))
    floor = 1e-6 * r.numel() ** 0.5  # an RMS of 1e-6: a reference of zeros
    return diff / max(norm, floor)


def _output_difference(out: Any, reference: Any) -> str | None:
    """Why ``out`` differs from ``reference``, or None: the same structure, each tensor of
    the same shape and dtype and, for floating tensors, within its dtype's rounding
    (:func:`rounding_tolerance`) in relative norm; other tensors equal."""
    try:
        pairs = list(_tensor_pairs(out, reference))
    except _Mismatch as e:
        return str(e)
    for o, r in pairs:
        if o.shape != r.shape or o.dtype != r.dtype:
            return (
                f"it returned a {o.dtype} tensor of shape {tuple(o.shape)} instead of "
                f"{r.dtype} {tuple(r.shape)}"
            )
        if r.is_floating_point() or r.is_complex():
            tolerance = rounding_tolerance(r.dtype, r.device.type)
            relative = _relative_difference(o, r)
            if not relative <= tolerance:  # NaN too
                return (
                    f"its output {tuple(o.shape)} differs from the NCHW run's (relative "
                    f"difference {relative:.3g}, beyond {str(r.dtype).removeprefix('torch.')} "
                    f"rounding's {tolerance:.3g})"
                )
        elif not torch.equal(o, r):
            return f"its output {tuple(o.shape)} differs from the NCHW run's"
    return None


def _relaid(out: Any, reference: Any) -> bool:
    """Whether a tensor of ``out`` (of ``reference``'s structure) with spatial dims is laid
    out otherwise than the reference run's."""
    return any(
        o.dim() >= 3 and _paths.layout_of(o) != _paths.layout_of(r)
        for o, r in _tensor_pairs(out, reference)
    )


def _fastest(
    model: nn.Module,
    example_inputs: Any,
    movable: list[_TiedConvNd],
    configs: dict[str, _Paths],
    *,
    repeats: int,
    cache: bool,
    threads: int | None,
    fused: bool = False,
) -> str:
    """Which of ``configs`` runs ``model`` fastest on ``example_inputs``: ``"input"`` (the
    tied layers in their inputs' layout), ``"channels_last"`` (the ``movable`` layers in
    channels-last) and, where given, ``"entry"`` (the model's inputs made channels-last as
    it is called, :func:`add_entry`, so the layers before the first tied one compute on
    channels-last too). Whole-model forwards in interleaved rounds; a configuration is taken
    only where it is faster than every one before it in that order (ties keep the inputs'
    layout). Cached per model structure, inputs, candidates, threads, versions and
    machine; with ``fused``, forwards of each configuration fused on a copy
    (:func:`tieify.fuse`), cached apart."""
    tensors = example_tensors(example_inputs)
    paths = {path for config in configs.values() for path in config.values()}
    key = json.dumps(
        {
            "model": hashlib.sha256(repr(model).encode()).hexdigest()[:24],
            "inputs": [input_signature(t) for t in tensors],
            "threads": torch.get_num_threads() if threads is None else threads,
            **software_key(kernel="kernel" in paths),
            "machine": machine_key(tensors[0].device if tensors else "cpu"),
            **({"fused": True} if fused else {}),
            **({"entry": True} if "entry" in configs else {}),
            # A model converted to channels-last runs other convolutions than the same
            # model with NCHW weights (weight_signature); NCHW models' keys are unchanged.
            **({"weights": "channels_last"} if _weights_channels_last(model) else {}),
        },
        sort_keys=True,
    )
    if cache:
        hit = PATH_CACHE.get(key)
        if isinstance(hit, dict) and hit.get("layout") in configs:
            return str(hit["layout"])

    def configure(name: str) -> None:
        _apply(configs[name], movable, name != "input")
        if name == "entry":
            add_entry(model)
        else:
            remove_entry(model)

    def run(name: str) -> Callable[[], Any]:
        def call() -> Any:
            configure(name)
            return run_model(model, example_inputs)

        return call

    def run_fused(name: str) -> Callable[[], Any]:
        from .._fuse import fuse

        configure(name)
        with warnings.catch_warnings():  # a model that does not trace runs as it is
            warnings.simplefilter("ignore")
            gm = fuse(model, example_inputs)  # a copy, configured as the model is now
        return lambda: run_model(gm, example_inputs)

    device = tensors[0].device if tensors and tensors[0].device.type == "cuda" else None
    try:
        with eval_mode(model), num_threads(threads):
            make = run_fused if fused else run  # tieify.fuse copies outside inference_mode
            fns = {name: make(name) for name in configs}
            with torch.inference_mode():
                times = _timer(fns, repeats=repeats, warmup=1, target_s=0.05, device=device)
    finally:
        remove_entry(model)  # the caller applies the configuration it keeps
    choice = "input"
    for name in configs:
        if times[name] < times[choice]:
            choice = name
    if cache:
        PATH_CACHE.set(key, {"layout": choice, "seconds": times})
    return choice


def _weights_channels_last(model: nn.Module) -> bool:
    """Whether any of ``model``'s 4-D or 5-D parameters is (unambiguously) channels-last."""
    return any(
        p.dim() in (4, 5) and _unambiguous_layout(p) == "channels_last" for p in model.parameters()
    )


def _entry_tensor(x: Any) -> bool:
    """Whether ``x`` is a batched 2-D or 3-D image (a 4-D or 5-D floating tensor) that is
    not channels-last: what :func:`add_entry`'s hook copies."""
    return (
        isinstance(x, torch.Tensor)
        and x.dim() in (4, 5)
        and x.is_floating_point()
        and not _paths.is_channels_last(x)
    )


def _to_channels_last(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The forward pre-hook of :func:`add_entry`: the model's image inputs, positional or
    keyword, as channels-last copies."""
    relaid = tuple(_paths.to_channels_last(a) if _entry_tensor(a) else a for a in args)
    return relaid, {
        k: _paths.to_channels_last(v) if _entry_tensor(v) else v for k, v in kwargs.items()
    }


def add_entry(model: nn.Module) -> None:
    """Make ``model``'s 4-D and 5-D floating inputs channels-last as it is called (a
    forward pre-hook, once): the layers before its first tied convolution then compute on
    channels-last too. Kept by ``copy.deepcopy`` and ``torch.save`` of the model; not by
    :func:`tieify.fuse` (a traced copy) or a ``state_dict``."""
    if not has_entry(model):
        model.register_forward_pre_hook(_to_channels_last, with_kwargs=True)


def has_entry(model: nn.Module) -> bool:
    """Whether :func:`add_entry` has been applied to ``model``."""
    return any(hook is _to_channels_last for hook in model._forward_pre_hooks.values())


def remove_entry(model: nn.Module) -> None:
    """Undo :func:`add_entry`: ``model`` takes its inputs as given."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _to_channels_last:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)


def _entry_applies(example_inputs: Any) -> bool:
    """Whether :func:`add_entry` would change any of ``example_inputs``."""
    return any(_entry_tensor(t) for t in example_tensors(example_inputs))


def _entry_config(
    model: nn.Module,
    example_inputs: Any,
    reference: Any,
    repeats: int,
    cache: bool,
    threads: int | None,
) -> _Paths | None:
    """With the model's inputs made channels-last (:func:`add_entry`; its tied layers are
    channels-last already): each tied conv's path chosen on the input it then receives, or
    None where the model does not run so as it ran on its inputs as given (it raises,
    returns other values, or returns a feature map laid out otherwise). No warning: the
    tied layers alone in channels-last passed these checks, and the model keeps them."""
    add_entry(model)
    try:
        inputs, out = _capture(model, example_inputs, (_TiedConvNd,))
    except Exception:  # noqa: BLE001 - the user's code may raise anything
        return None
    finally:
        remove_entry(model)
    if _output_difference(out, reference) is not None or _relaid(out, reference):
        return None
    return _choose_paths(inputs, repeats=repeats, cache=cache, threads=threads)
