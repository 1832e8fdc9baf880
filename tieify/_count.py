"""Counting: parameters (de-duplicated by storage), multiply-adds and FLOPs.

Units, stated once and used everywhere in tieify:

- **params**: number of scalar weights a model stores. Tensors that share storage (tied or
  shared weights) are counted once.
- **MACs (multiply-adds)**: fvcore's unit, "one fused multiply-add counts as one". A dense
  ``Conv2d(C_in, C_out, k)`` producing ``H×W`` outputs costs ``H·W·k²·C_in·C_out/groups`` MACs
  per sample; counts cover the whole batch of ``example_inputs``.
- **FLOPs = 2·MACs.**

fvcore's :class:`~fvcore.nn.FlopCountAnalysis` (a ``torch.jit`` trace) is the primary
counter. When its trace fails, :class:`torch.utils.flop_counter.FlopCounterMode` (which counts
FLOPs = 2·MACs; converted here) is the fallback. Following fvcore, element-wise operations
(activations, additions, the multiply of an attention gate) are not counted; every tensor
operation neither counter covers is listed in :attr:`Counts.unsupported_ops` instead of being
dropped silently.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._modes import eval_mode

__all__ = ["Counts", "count", "count_params", "params_by_module"]

COUNTERS = ("auto", "fvcore", "flop_counter")

# Arithmetic ops that jit traces also emit for shape arithmetic on Python ints (for example
# the ``N·B`` of a tied layer's fold); these get a handle that counts nothing and lists the
# op only when it acted on a tensor.
_ARITHMETIC_OPS = (
    "aten::mul",
    "aten::mul_",
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::sub_",
    "aten::div",
    "aten::div_",
    "aten::rsub",
    "aten::neg",
)

# Data movement fvcore does not know (the "grouped" tied path repeats the filter bank); they
# get a handle that counts nothing, like fvcore's own ignore list.
_FVCORE_FREE_OPS = (
    "aten::repeat",
    "aten::expand_as",
    "aten::view_as",
    "aten::reshape_as",
    "aten::movedim",
    "aten::unflatten",
    "aten::clone",
    "aten::as_strided",
    "aten::alias",
    "aten::pad",
)

# Ops that move or allocate data without arithmetic; never listed as unsupported by the
# fallback counter (mirrors fvcore's ignore list).
_FREE_OPS = frozenset(
    """
    _to_copy _unsafe_view alias arange as_strided cat chunk clone constant_pad_nd contiguous
    copy copy_ detach dropout empty empty_like empty_strided expand fill_ flatten full full_like
    index lift_fresh lift_fresh_copy narrow native_dropout new_empty new_empty_strided new_full
    new_ones new_zeros ones ones_like permute repeat expand_as movedim unflatten relu relu_
    reshape select slice split
    split_with_sizes squeeze stack sym_size t transpose unbind unsqueeze unsqueeze_ view zero_
    zeros zeros_like _local_scalar_dense
    """.split()
)


@dataclass(frozen=True)
class Counts:
    """What :func:`count` measured.

    Attributes:
        params: parameters, tensors sharing storage counted once.
        macs: multiply-adds (one fused multiply-add = 1) for the whole batch of inputs.
        params_by_module: parameters of every named module, recursive (``""`` = the model).
        macs_by_module: MACs of every named module, recursive (``""`` = the model).
        macs_by_operator: MACs per operator (``conv``, ``linear``, ``batch_norm``...).
        counter: ``"fvcore"`` or ``"flop_counter"`` (the fallback).
        unsupported_ops: tensor operations that were not counted, with how often they ran.
        notes: why the fallback was used, and other caveats.
        input_shapes: shapes of the example inputs the MACs refer to.
    """

    params: int
    macs: int
    params_by_module: dict[str, int] = field(default_factory=dict)
    macs_by_module: dict[str, int] = field(default_factory=dict)
    macs_by_operator: dict[str, int] = field(default_factory=dict)
    counter: str = "fvcore"
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    input_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def flops(self) -> int:
        """FLOPs = 2·MACs."""
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, with units labelled."""
        return {
            "params": self.params,
            "macs": self.macs,
            "flops": self.flops,
            "units": {"macs": "multiply-adds (one fused multiply-add = 1)", "flops": "2·MACs"},
            "counter": self.counter,
            "input_shapes": [list(s) for s in self.input_shapes],
            "macs_by_operator": dict(self.macs_by_operator),
            "unsupported_ops": dict(self.unsupported_ops),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return (
            f"params={self.params:,}  MACs (multiply-adds)={self.macs:,}  "
            f"FLOPs (=2·MACs)={self.flops:,}  [counter: {self.counter}]"
        )


# -- parameters ----------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> Any:
    if t.device.type == "meta":
        return ("meta", id(t))
    try:
        return (t.device.type, t.device.index, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return ("id", id(t))


def _unique_numel(tensors: list[torch.Tensor]) -> int:
    """Elements covered by ``tensors``, counting each storage element once."""
    by_storage: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        by_storage.setdefault(_storage_key(t), []).append(t)
    total = 0
    for group in by_storage.values():
        spans: set[tuple[int, int]] = set()
        for t in group:
            if t.numel() == 0:
                continue
            if t.is_contiguous():
                start = int(t.storage_offset())
                stop = start + t.numel()
            else:  # conservative: the extent of a strided view
                extent = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
                start = int(t.storage_offset())
                stop = start + int(extent) + 1
            spans.add((start, stop))
        covered, end = 0, -1
        for start, stop in sorted(spans):
            if start >= end:
                covered += stop - start
                end = stop
            elif stop > end:
                covered += stop - end
                end = stop
        total += covered
    return total


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, tensors sharing storage (tied/shared weights) counted once.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 4)
        >>> model = torch.nn.Sequential(lin, lin)  # the same layer twice
        >>> count_params(model)
        20
    """
    return _unique_numel([p for p in module.parameters()])


def params_by_module(model: nn.Module) -> dict[str, int]:
    """:func:`count_params` of every named module (``""`` is the model itself)."""
    return {name: count_params(m) for name, m in model.named_modules(remove_duplicate=False)}


# -- multiply-adds --------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list) and all(
        isinstance(x, torch.Tensor) for x in example_inputs
    ):
        return tuple(example_inputs)
    return (example_inputs,)


def _shapes(inputs: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor))


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the count; restores every module's training flag."""
    with eval_mode(model), torch.no_grad():
        yield


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet_fvcore() -> Iterator[_Capture]:
    """Capture fvcore's log records and silence trace/deprecation warnings."""
    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("fvcore", "fvcore.nn.jit_analysis")]
    saved = [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(capture)
        lg.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield capture
    finally:
        for lg, propagate in saved:
            lg.removeHandler(capture)
            lg.propagate = propagate


def _arithmetic_handle(kind: str, seen: Counter[str]) -> Any:
    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        out = outputs[0] if outputs else None
        if out is None or out.type().kind() != "TensorType":
            return 0
        # 0-dim results are traced shape arithmetic (sizes become scalar tensors).
        if not out.isCompleteTensor() or len(out.type().sizes()) > 0:
            seen[kind] += 1
        return 0

    return handle


def _free_handle(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


def _matmul_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of ``torch.matmul`` with broadcasting on either side.

    fvcore's own handle multiplies the first operand's elements by the last dimension of the
    second, which misses the batch of a ``(n, k) @ (batch, k, m)`` product.
    """
    from fvcore.nn.jit_handles import get_shape

    a, b = get_shape(inputs[0]), get_shape(inputs[1])
    if not a or not b:
        raise ValueError(f"matmul operand shapes unknown: {a}, {b}")
    a = [1, *a] if len(a) == 1 else list(a)
    b = [*b, 1] if len(b) == 1 else list(b)
    batch_a, batch_b = a[:-2], b[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = [1] * (width - len(batch_a)) + batch_a
    batch_b = [1] * (width - len(batch_b)) + batch_b
    batch = 1
    for x, y in zip(batch_a, batch_b, strict=True):
        batch *= max(x, y)
    return int(batch * a[-2] * a[-1] * b[-1])


def _count_fvcore(model: nn.Module, inputs: tuple[Any, ...]) -> Counts:
    elementwise: Counter[str] = Counter()
    with _quiet_fvcore():
        from fvcore.nn import FlopCountAnalysis

        analysis = (
            FlopCountAnalysis(model, inputs)
            .unsupported_ops_warnings(False)
            .uncalled_modules_warnings(False)
            .tracer_warnings("none")
        )
        for kind in _ARITHMETIC_OPS:
            analysis.set_op_handle(kind, _arithmetic_handle(kind, elementwise))
        for kind in _FVCORE_FREE_OPS:
            analysis.set_op_handle(kind, _free_handle)
        analysis.set_op_handle("aten::matmul", _matmul_handle)
        total = int(analysis.total())
        by_module = {k: int(v) for k, v in analysis.by_module().items()}
        by_operator = {k: int(v) for k, v in analysis.by_operator().items() if v}
        unsupported = Counter(dict(analysis.unsupported_ops()))
    unsupported.update(elementwise)
    return Counts(
        params=count_params(model),
        macs=total,
        params_by_module=params_by_module(model),
        macs_by_module=by_module,
        macs_by_operator=by_operator,
        counter="fvcore",
        unsupported_ops=dict(sorted(unsupported.items())),
        input_shapes=_shapes(inputs),
    )


def _op_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", func)
    return str(getattr(packet, "__name__", packet))


def _count_flop_counter(model: nn.Module, inputs: tuple[Any, ...], note: str) -> Counts:
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    counted = {_op_name(op) for op in flop_registry}
    seen: Counter[str] = Counter()

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen[_op_name(func)] += 1
            return func(*args, **(kwargs or {}))

    counter = FlopCounterMode(display=False)
    with counter, _Recorder():
        model(*inputs)
    root = type(model).__name__
    by_module: dict[str, int] = {name: 0 for name, _ in model.named_modules()}
    by_operator: Counter[str] = Counter()
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            for op, flops in ops.items():
                by_operator[_op_name(op)] += int(flops) // 2
            continue
        if key == root:
            name = ""
        elif key.startswith(root + "."):
            name = key[len(root) + 1 :]
        else:
            continue
        by_module[name] = sum(int(v) for v in ops.values()) // 2
    unsupported = {
        op: n for op, n in sorted(seen.items()) if op not in counted and op not in _FREE_OPS
    }
    total = int(counter.get_total_flops()) // 2
    by_module[""] = total
    return Counts(
        params=count_params(model),
        macs=total,
        params_by_module=params_by_module(model),
        macs_by_module=by_module,
        macs_by_operator={k: v for k, v in by_operator.items() if v},
        counter="flop_counter",
        unsupported_ops=unsupported,
        notes=(note,),
        input_shapes=_shapes(inputs),
    )


def count(model: nn.Module, example_inputs: Any, *, counter: str = "auto") -> Counts:
    """Count parameters, multiply-adds (MACs) and FLOPs of ``model`` on ``example_inputs``.

    The model runs once in eval mode under ``torch.no_grad``; its training flags are restored
    and nothing else is touched. MACs cover the whole batch of ``example_inputs``.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor, or a tuple of positional inputs.
        counter: ``"auto"`` (fvcore, falling back to ``torch.utils.flop_counter`` when its
            jit trace fails), ``"fvcore"`` or ``"flop_counter"``.

    Returns:
        A :class:`Counts`; ``counts.counter`` names the counter used.

    Raises:
        ValueError: for an unknown ``counter``.

    Example:
        >>> import torch
        >>> from tieify.nn import TiedConv2d
        >>> c = count(TiedConv2d(64, 64, 3, padding=1, bias=False, B=4), torch.randn(1, 64, 8, 8))
        >>> c.params, c.macs  # 64·64·9/4² weights; 8·8·64·64·9/4 multiply-adds
        (2304, 589824)
    """
    if counter not in COUNTERS:
        raise ValueError(f"`counter` must be one of {COUNTERS}, but got {counter!r}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"count() expects an nn.Module, but got {type(model).__name__}.")
    inputs = _as_tuple(example_inputs)
    with _eval_no_grad(model):
        if counter == "flop_counter":
            return _count_flop_counter(model, inputs, "counted with torch.utils.flop_counter")
        try:
            return _count_fvcore(model, inputs)
        except Exception as err:  # noqa: BLE001 - any trace failure triggers the fallback
            if counter == "fvcore":
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            note = (
                f"fvcore's jit trace failed ({type(err).__name__}: {reason[:200]}); counted "
                "with torch.utils.flop_counter (batch-norm, pooling and upsampling not counted)"
            )
            return _count_flop_counter(model, inputs, note)
