"""Model-level latency: dense vs tied, against the multiply-add (MAC) ratio.

Cases (torchvision models, random weights, eval mode):

- ``resnet50_3x3_B2``: ResNet-50 with every bottleneck 3×3 conv tied at B = 2;
- ``resnet50_all_B4``: every bottleneck conv (1×1, 3×3, 1×1 and the downsample) at B = 4;
- ``resnext50_B2``: ResNeXt-50 32×4d, every bottleneck conv at B = 2 (TGC inside the groups);
- ``mobilenet_v3_large_B2``: every non-depthwise conv outside the stem and head at B = 2;
- ``mobilenet_v3_large_TiedSE``: only the squeeze-and-excitation convs, at B = 8 (TiedSE).

For each case and batch size (1 and 8) the dense and tied models run in interleaved rounds
(medians) in five modes: ``eager`` (NCHW inputs, both models after ``tieify.optimize`` on
them, which may run the tied layers in channels-last, one copy in and no copies back, and
may make either model's inputs channels-last at its entry where that is faster),
``eager_unoptimized`` (NCHW, both models as they are: the tied one as ``tieify.tieify``
returns it),
``channels_last`` (both models and the input in channels-last, after ``tieify.optimize``),
``fused`` (channels-last inference fusion, each model with its own tool: the dense one with
torch.fx's conv-BN folding, the tied one with ``tieify.fuse``) and ``compile``
(``torch.compile(dynamic=False)`` of the channels-last models, once per batch size, for
every case; ``--compile-cases`` narrows that, since each CPU compile takes about a minute
here). The row ``fused_vs_channels_last`` compares, from the same rounds, the fused tied
model with the plain channels-last dense one. The MAC ratio counts convolution and linear
multiply-adds (one fused multiply-add = 1 MAC), tied over dense.

Usage::

    python benchmarks/models.py                  # ~3-5 minutes here (20 compiles)
    python benchmarks/models.py --quick          # 128×128 inputs, no compile, ~3 minutes
    python benchmarks/models.py --compile-dynamic  # torch.compile(dynamic=True) instead
    python benchmarks/models.py --profile --batches 8   # where the time goes, module by module
    python benchmarks/models.py --bandwidth 150 --cases resnet50_all_B4 --batches 8

Each round also times a copy of 128 MiB (``copy GB/s``: the host's memory bandwidth in the
same rounds). A tied layer does B times fewer multiply-adds than the dense one but reads and
writes the same activations, as do the batch norms, activations and adds around it, so a
tied model's ratio moves with the bandwidth the host gives it at the time. ``--bandwidth
SECONDS`` measures that: dense and tied forwards (channels-last, last batch size), each
beside a copy, for that long; the ratio in the rounds of the lowest and the highest third of
the bandwidth, and their correlation (``models_bandwidth.json``/``.md``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _allocator_flag  # noqa: E402
from _results import run_facts, table, write_results  # noqa: E402

import tieify  # noqa: E402
from tieify.latency._machine import describe_machine  # noqa: E402
from tieify.latency._optimize import has_entry  # noqa: E402
from tieify.latency._timing import calibrate_iters, time_once  # noqa: E402
from tieify.nn import TiedConv1d, TiedConv2d, TiedConv3d, TiedLinear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CL = torch.channels_last


# -- building tied models -----------------------------------------------------------------


def tie_convs(model: nn.Module, choose: Callable[[str, nn.Conv2d], int | None]) -> nn.Module:
    """``tieify.tieify(model, B=...)`` with B chosen per layer by ``choose(name, conv)`` (None:
    leave dense) and ``strict=True``, so a layer the case asks for but tieify leaves is an
    error rather than a silently smaller saving. The original model is untouched."""

    def spec(name: str, module: nn.Module) -> int | None:
        return choose(name, module) if type(module) is nn.Conv2d else None

    return tieify.tieify(model, B=spec, attention_B=spec, strict=True)


def divisible(conv: nn.Conv2d, B: int) -> bool:
    g = conv.groups
    return conv.in_channels % (g * B) == 0 and conv.out_channels % (g * B) == 0


def is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv + linear multiply-adds of one forward pass (tied layers counted as computed)."""
    total = 0

    def hook(m: nn.Module, args, out) -> None:
        nonlocal total
        if isinstance(m, (nn.Conv2d, TiedConv2d)):
            B = getattr(m, "B", 1)
            k = math.prod(m.kernel_size)
            total += out.numel() * (m.in_channels // (m.groups * B)) * k
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, TiedConv2d, nn.Linear))
    ]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return total


def _bottleneck_conv(name: str) -> bool:
    return name.startswith("layer") and (".conv" in name or ".downsample.0" in name)


def build_case(case: str) -> tuple[nn.Module, nn.Module]:
    """(dense, tied) models of one benchmark case."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    if case.startswith("resnet50"):
        dense = tvm.resnet50()
        if case == "resnet50_3x3_B2":
            tied = tie_convs(
                dense, lambda n, c: 2 if _bottleneck_conv(n) and c.kernel_size == (3, 3) else None
            )
        else:
            tied = tie_convs(
                dense, lambda n, c: 4 if _bottleneck_conv(n) and divisible(c, 4) else None
            )
    elif case == "resnext50_B2":
        dense = tvm.resnext50_32x4d()
        tied = tie_convs(dense, lambda n, c: 2 if _bottleneck_conv(n) and divisible(c, 2) else None)
    elif case == "mobilenet_v3_large_B2":
        dense = tvm.mobilenet_v3_large()

        def choose(n: str, c: nn.Conv2d) -> int | None:
            body = n.startswith("features.") and not n.startswith(("features.0.", "features.16."))
            return 2 if body and not is_depthwise(c) and divisible(c, 2) else None

        tied = tie_convs(dense, choose)
    elif case == "mobilenet_v3_large_TiedSE":
        dense = tvm.mobilenet_v3_large()

        def choose_se(n: str, c: nn.Conv2d) -> int | None:
            if ".fc1" not in n and ".fc2" not in n:
                return None
            return next((b for b in (8, 4, 2) if divisible(c, b)), None)

        tied = tie_convs(dense, choose_se)
    else:
        raise ValueError(f"unknown case {case!r}")
    return dense.eval(), tied.eval()


MODES = ("eager", "channels_last", "fused")

CASES = [
    "resnet50_3x3_B2",
    "resnet50_all_B4",
    "resnext50_B2",
    "mobilenet_v3_large_B2",
    "mobilenet_v3_large_TiedSE",
]


# -- timing ---------------------------------------------------------------------------------


def time_pair(fns: dict[str, Callable[[], object]], rounds: int, target_s: float):
    """Interleaved timing samples: each of ``fns``'s seconds a call, one per round."""
    for f in fns.values():
        f()
    iters = {n: calibrate_iters(f, target_s) for n, f in fns.items()}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            samples[n].append(time_once(f, iters[n]))
    return samples


def time_models(
    models: dict[str, Callable[[torch.Tensor], object]],
    x: torch.Tensor,
    rounds: int,
    target_s: float,
):
    """:func:`time_pair` of each model's forward on ``x``, under the names of ``models``."""
    return time_pair({k: (lambda m=m: m(x)) for k, m in models.items()}, rounds, target_s)


#: The bytes the host probe copies (:func:`copy_probe`): well past the last-level cache.
COPY_BYTES = 128 * 2**20


def copy_probe(nbytes: int = COPY_BYTES) -> tuple[Callable[[], object], int]:
    """A call that copies ``nbytes`` from one buffer to another, and the bytes it moves (read
    and written): its time gives the host's memory bandwidth at that moment."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def gb_per_s(moved: int, seconds: float) -> float:
    return moved / seconds / 1e9


def median_ratio(samples: dict[str, list[float]], top: str, bottom: str) -> float:
    """The median over rounds of ``top``'s time over ``bottom``'s in the same round."""
    pairs = zip(samples[top], samples[bottom], strict=True)
    return statistics.median(t / b for t, b in pairs)


def against(samples: dict[str, list[float]], names: tuple[str, ...], base: str) -> dict:
    """``<name>_ms`` (median ms) for ``base`` and each of ``names``, and ``<name>``: its
    :func:`median_ratio` over ``base``."""
    row = {f"{k}_ms": statistics.median(samples[k]) * 1e3 for k in (base, *names)}
    return row | {k: median_ratio(samples, k, base) for k in names}


def rule_setting_rows(
    args, settings: dict[str, dict[str, object]], layouts: tuple[str, ...] = ("channels_last",)
) -> list[dict]:
    """Whole models under the static rule with its machine flags
    (``tieify.nn._paths.<flag>``) set in several ways: per case of ``args.cases``, input
    layout (``channels_last`` or ``nchw``) and batch, in interleaved rounds (medians of
    per-round ratios to the dense model in the same layout), the tied model with the rule as
    this machine has it (``rule``), with the flags as each entry of ``settings`` (variant
    name to {flag: value}) sets them, and after ``tieify.optimize``. Each copy decides its
    layers' paths on its first call, under its own setting, and keeps them (the layers
    remember their choice per input)."""
    from contextlib import ExitStack
    from unittest import mock

    from tieify.nn import _paths

    variants = ("rule", *settings, "optimize")
    rows = []
    for case in args.cases:
        dense, tied = build_case(case)
        for layout in layouts:
            fmt = CL if layout == "channels_last" else torch.contiguous_format
            dense = dense.to(memory_format=fmt)
            for batch in args.batches:
                x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=fmt)
                models = {v: copy.deepcopy(tied).to(memory_format=fmt) for v in variants}
                with torch.inference_mode():
                    for variant, flags in settings.items():
                        with ExitStack() as stack:
                            for flag, value in flags.items():
                                stack.enter_context(mock.patch.object(_paths, flag, value))
                            models[variant](x)
                    models["rule"](x)
                    tieify.optimize(models["optimize"], x)
                    samples = time_models({"dense": dense, **models}, x, args.rounds, args.target_s)
                row = {"case": case, "layout": layout, "batch": batch}
                rows.append(row | against(samples, variants, "dense"))
                print(rows[-1], flush=True)
    return rows


def run_case(case: str, args) -> list[dict]:
    dense, tied = build_case(case)
    dense_cl = copy.deepcopy(dense).to(memory_format=CL)
    tied_cl = copy.deepcopy(tied).to(memory_format=CL)
    tied_eager = copy.deepcopy(tied)  # tieify.optimize'd for the NCHW inputs
    dense_eager = copy.deepcopy(dense)  # likewise: the entry hook where faster
    compile_case = args.compile and case in args.compile_cases
    rows = []
    # Inference fusion of the dense model with its own tool, torch.fx's conv-BN folding (BN
    # into the conv weights), once: it does not depend on the batch.
    dense_fused = fx_fuse(dense_cl)
    probe, moved = copy_probe()
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        mac_ratio = macs(tied, x) / macs(dense, x)
        xc = x.contiguous(memory_format=CL)
        with torch.inference_mode():
            tieify.optimize(tied_cl, xc)
            tieify.optimize(tied_eager, x)
            tieify.optimize(dense_eager, x)
        # The tied model fused for this input's paths (tieify.fuse: BN, residual add and
        # ReLU in the kernel's epilogue; the weights stay tied).
        tied_fused = tieify.fuse(tied_cl, xc)
        fns = {
            "eager|dense": lambda x=x: dense_eager(x),
            "eager|tied": lambda x=x: tied_eager(x),
            "eager_unoptimized|dense": lambda x=x: dense(x),
            "eager_unoptimized|tied": lambda x=x: tied(x),
            "channels_last|dense": lambda m=dense_cl, x=xc: m(x),
            "channels_last|tied": lambda m=tied_cl, x=xc: m(x),
            "fused|dense": lambda m=dense_fused, x=xc: m(x),
            "fused|tied": lambda m=tied_fused, x=xc: m(x),
            "host|copy": probe,  # the host's memory bandwidth, in the same rounds
        }
        # mode: (dense, tied) series; "fused_vs_channels_last" is the fused tied model against
        # the plain channels-last dense one (the user's model as it is), same rounds.
        pairs = {mode: (f"{mode}|dense", f"{mode}|tied") for mode in MODES}
        pairs["eager_unoptimized"] = ("eager_unoptimized|dense", "eager_unoptimized|tied")
        pairs["fused_vs_channels_last"] = ("channels_last|dense", "fused|tied")
        if compile_case:
            # A static-shape compile per batch size, after tieify.optimize pinned the paths
            # for it (--compile-dynamic: one dynamic-shape compile per batch instead).
            torch._dynamo.reset()
            cd = torch.compile(dense_cl, dynamic=args.compile_dynamic)
            ct = torch.compile(tied_cl, dynamic=args.compile_dynamic)
            fns["compile|dense"], fns["compile|tied"] = (
                lambda m=cd, x=xc: m(x),
                lambda m=ct, x=xc: m(x),
            )
            pairs["compile"] = ("compile|dense", "compile|tied")
        with torch.inference_mode():
            samples = time_pair(fns, args.rounds, args.target_s)
        copy_gbs = statistics.median(gb_per_s(moved, s) for s in samples["host|copy"])
        for mode, (dense_key, tied_key) in pairs.items():
            d, t = samples[dense_key], samples[tied_key]
            ratio = statistics.median(b / a for a, b in zip(d, t, strict=True))
            rows.append(
                {
                    "case": case,
                    "batch": batch,
                    "mode": mode,
                    "size": args.size,
                    "dense_ms": statistics.median(d) * 1e3,
                    "tied_ms": statistics.median(t) * 1e3,
                    "latency_ratio": ratio,
                    "mac_ratio": mac_ratio,
                    "gap": ratio - mac_ratio,
                    "copy_gbs": copy_gbs,
                }
            )
            if mode == "eager":  # whether optimize gave the dense model the entry hook
                rows[-1]["dense_entry"] = has_entry(dense_eager)
            r = rows[-1]
            print(
                f"{case} b{batch} {mode}: dense {r['dense_ms']:.1f} ms, tied {r['tied_ms']:.1f} "
                f"ms, ratio {ratio:.3f} vs MAC {mac_ratio:.3f}",
                flush=True,
            )
    return rows


#: Modules whose time counts as the convolutions' (tied or dense, with the classifier).
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CONV_MODULES += (TiedConv1d, TiedConv2d, TiedConv3d, TiedLinear)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONV_MODULES)


def module_split(model: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """One forward's wall time split by module: convolutions (and the classifier),
    normalization, activations, pooling, the other modules and the rest (the code between
    modules: residual adds, flattening), in ms; the fastest of ``rounds`` forwards, each timed
    whole and module by module (forward hooks). Hooks, not torch.profiler: tieify's kernel
    runs outside PyTorch's operators in eager calls, so the profiler does not see its time."""
    spans: dict[str, float] = {}
    started: dict[int, float] = {}

    def kind(module: nn.Module) -> str:
        if _is_conv(module):
            return "conv"
        name = type(module).__name__
        for group in ("Norm", "Pool"):
            if group in name:
                return group.lower()
        if module.__module__.startswith("torch.nn.modules.activation"):
            return "act"
        return "other"

    counted = [m for m in model.modules() if _is_conv(m)]
    inside = {id(c) for m in counted for c in m.modules() if c is not m}
    leaves = [
        m
        for m in model.modules()
        if id(m) not in inside and (_is_conv(m) or not list(m.children()))
    ]
    kinds = {id(m): kind(m) for m in leaves}  # decided once, outside the timed spans

    def pre(module, _inputs):
        started[id(module)] = time.perf_counter()

    def post(module, _inputs, _output):
        end = time.perf_counter()
        key = kinds[id(module)]
        spans[key] = spans.get(key, 0.0) + end - started[id(module)]

    hooks = [
        h for m in leaves for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))
    ]
    best: dict[str, float] | None = None
    try:
        for _ in range(rounds):
            spans.clear()
            t0 = time.perf_counter()
            model(x)
            total = time.perf_counter() - t0
            row = {k: v * 1e3 for k, v in spans.items()}
            row["rest"] = total * 1e3 - sum(row.values())
            row["total"] = total * 1e3
            if best is None or row["total"] < best["total"]:
                best = row
    finally:
        for h in hooks:
            h.remove()
    assert best is not None
    return {k: best.get(k, 0.0) for k in ("conv", "norm", "act", "pool", "other", "rest", "total")}


def warm_channels_last_pair(case: str, args) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The studies' models and input: ``case``'s dense and tied models in channels-last, the
    tied one after ``tieify.optimize``, and a channels-last input at the last batch size,
    each model run on it once (paths chosen, kernels built, buffers allocated)."""
    dense, tied = build_case(case)
    dense, tied = dense.to(memory_format=CL), tied.to(memory_format=CL)
    x = torch.randn(args.batches[-1], 3, args.size, args.size).contiguous(memory_format=CL)
    with torch.inference_mode():
        tieify.optimize(tied, x)
        for model in (dense, tied):
            model(x)
    return dense, tied, x


def profile_case(case: str, args) -> dict:
    """One forward's time split by module (:func:`module_split`), dense and tied,
    channels-last, eager (the tied model after ``tieify.optimize``): where the tied model's
    time goes against the dense one's. Everything but the convolutions costs both models the
    same (the activations are the same size), so where it is a large part of the dense
    time, the whole model's ratio stays above the MAC ratio however fast the tied layers."""
    dense, tied, x = warm_channels_last_pair(case, args)
    out = {"case": case, "batch": args.batches[-1], "size": args.size}
    with torch.inference_mode():
        splits = {"dense": [], "tied": []}
        for _ in range(args.rounds):  # interleaved, one forward each at a time
            for name, model in (("dense", dense), ("tied", tied)):
                splits[name].append(module_split(model, x, 1))
    for name, rows in splits.items():  # each model's fastest forward, its parts as they were
        fastest = min(rows, key=lambda r: r["total"])
        for key, ms in fastest.items():
            out[f"{name}_{key}_ms"] = ms
        out[f"{name}_fixed_ms"] = fastest["total"] - fastest["conv"]
    out["conv_ratio"] = out["tied_conv_ms"] / out["dense_conv_ms"]
    out["latency_ratio"] = out["tied_total_ms"] / out["dense_total_ms"]
    out["mac_ratio"] = macs(tied, x) / macs(dense, x)
    # The ratio the whole model would reach with its convolutions at the MAC ratio exactly.
    out["bound_ratio"] = (out["mac_ratio"] * out["dense_conv_ms"] + out["tied_fixed_ms"]) / out[
        "dense_total_ms"
    ]
    return out


def profile_markdown(rows: list[dict], args, allocator: str) -> str:
    lines = [
        "# Where a forward's time goes: dense and tied, module by module",
        "",
        f"Channels-last, eager, {args.threads} threads, the tied model after "
        "`tieify.optimize`; each model's fastest forward of "
        f"{args.rounds} interleaved rounds, split into its parts, in ms, "
        "timed by forward hooks on the modules. conv: convolutions and the classifier, "
        "tied or dense; norm, act, pool: batch norms, activations, pooling; rest: the code "
        "between modules (residual adds, flattening). 'bound' is the ratio the model "
        "would reach with its convolutions exactly at the MAC ratio and the rest as measured "
        f"in the tied model. {describe_machine()}; torch {torch.__version__}. Allocator: "
        f"{allocator}.",
        "",
    ]
    parts = ("total", "conv", "norm", "act", "pool", "other", "rest")
    lines += table(
        "case | batch | model | " + " | ".join(parts),
        "lrl" + "r" * len(parts),
        (
            [r["case"], r["batch"], name] + [f"{r[f'{name}_{k}_ms']:.1f}" for k in parts]
            for r in rows
            for name in ("dense", "tied")
        ),
    )
    lines.append("")
    ratios = ("latency_ratio", "conv_ratio", "mac_ratio", "bound_ratio")
    lines += table(
        "case | batch | latency ratio | conv ratio | MAC ratio | bound",
        "lrrrrr",
        ([r["case"], r["batch"]] + [f"{r[k]:.3f}" for k in ratios] for r in rows),
    )
    return "\n".join(lines) + "\n"


def bandwidth_case(case: str, args) -> dict:
    """Dense and tied forwards (channels-last, the tied model after ``tieify.optimize``, the
    last batch size), one each after the host's bandwidth is read (the fastest of three
    copies, :func:`copy_probe`), for ``args.bandwidth`` seconds: how the tied model's ratio
    moves with the bandwidth (:func:`bandwidth_summary`)."""
    dense, tied, x = warm_channels_last_pair(case, args)
    batch = x.shape[0]
    probe, moved = copy_probe()
    samples = []
    with torch.inference_mode():
        end = time.perf_counter() + args.bandwidth
        while time.perf_counter() < end:
            seconds = min(time_once(probe) for _ in range(3))
            d, t = time_once(lambda: dense(x)), time_once(lambda: tied(x))
            samples.append({"copy_gbs": gb_per_s(moved, seconds), "dense_s": d, "tied_s": t})
    return {"case": case, "batch": batch, "size": args.size} | bandwidth_summary(samples)


def bandwidth_summary(samples: list[dict]) -> dict:
    """Of samples ``{"copy_gbs", "dense_s", "tied_s"}`` (at least three): the Pearson
    correlation of the bandwidth with the tied / dense ratio, and the medians of the
    bandwidth, both times (ms) and the ratio over all samples and over the lowest and the
    highest third of them by bandwidth."""
    if len(samples) < 3:
        raise ValueError(
            f"{len(samples)} samples: the bandwidth study needs at least 3; give "
            "--bandwidth more seconds"
        )
    ordered = sorted(samples, key=lambda s: s["copy_gbs"])
    third = len(ordered) // 3

    def medians(part: list[dict]) -> dict:
        return {
            "copy_gbs": statistics.median(s["copy_gbs"] for s in part),
            "dense_ms": statistics.median(s["dense_s"] for s in part) * 1e3,
            "tied_ms": statistics.median(s["tied_s"] for s in part) * 1e3,
            "ratio": statistics.median(s["tied_s"] / s["dense_s"] for s in part),
        }

    gbs = [s["copy_gbs"] for s in samples]
    ratios = [s["tied_s"] / s["dense_s"] for s in samples]
    return {
        "samples": len(samples),
        "correlation": statistics.correlation(gbs, ratios),
        "all": medians(ordered),
        "low": medians(ordered[:third]),
        "high": medians(ordered[-third:]),
        "raw": samples,
    }


def bandwidth_markdown(rows: list[dict], args, allocator: str) -> str:
    lines = [
        "# Tied / dense against the host's memory bandwidth",
        "",
        f"Channels-last, eager, {args.threads} threads, the tied model after "
        f"`tieify.optimize`; for {args.bandwidth:.0f} s a case, the host's bandwidth read "
        "(the fastest of three copies of 128 MiB, read and written), then one dense and one "
        "tied forward. Medians over all samples and over the lowest and the highest third "
        "by bandwidth; r: the correlation of the bandwidth with the tied / dense ratio. "
        f"{describe_machine()}; torch {torch.__version__}. Allocator: {allocator}.",
        "",
    ]
    parts = ("low", "high", "all")
    lines += table(
        "case | batch | samples | GB/s low / high / all | dense ms low / high | "
        "tied ms low / high | ratio low / high / all | r",
        "lrrrrrrr",
        (
            [r["case"], r["batch"], r["samples"]]
            + [" / ".join(f"{r[p]['copy_gbs']:.0f}" for p in parts)]
            + [" / ".join(f"{r[p][k]:.1f}" for p in parts[:2]) for k in ("dense_ms", "tied_ms")]
            + [" / ".join(f"{r[p]['ratio']:.3f}" for p in parts), f"{r['correlation']:+.2f}"]
            for r in rows
        ),
    )
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    lines = [
        "# Model latency: tied / dense against the MAC ratio",
        "",
        f"Input {res['size']}×{res['size']}, {res['threads']} threads, {res['rounds']} "
        f"interleaved rounds, medians of per-round ratios; torch {res['torch']}, "
        f"{res['machine']}. torch.compile: {res.get('compile', 'static shapes, per batch')}. "
        f"{res['note']} {run_facts(res)}",
        "",
        "Modes: `eager`, NCHW input, both models after `tieify.optimize` (marked `dense "
        "entry` where it made the dense model's inputs channels-last at its entry); "
        "`eager_unoptimized`, NCHW input, both models as they are; `channels_last`, both "
        "models and the input in channels-last, the tied one after `tieify.optimize`; "
        "`fused`, each channels-last model fused by its own tool; `fused_vs_channels_last`, "
        "the fused tied model against the plain channels-last dense one; `compile`, "
        "`torch.compile` of the channels-last models. `copy GB/s`: the host's memory "
        "bandwidth in the same rounds (a copy of 128 MiB, read and written; median), which "
        "the memory-bound parts of a tied model move with.",
        "",
    ]
    lines += table(
        "case | batch | mode | dense ms | tied ms | latency ratio | MAC ratio | gap | copy GB/s",
        "lrlrrrrrr",
        (
            [r["case"], r["batch"], r["mode"] + (" (dense entry)" if r.get("dense_entry") else "")]
            + [f"{r['dense_ms']:.1f}", f"{r['tied_ms']:.1f}", f"{r['latency_ratio']:.3f}"]
            + [f"{r['mac_ratio']:.3f}", f"{r['gap']:+.3f}"]
            + [f"{r['copy_gbs']:.0f}" if "copy_gbs" in r else "-"]
            for r in res["rows"]
        ),
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Dense vs tied model latency against MAC ratio.")
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--target-s", type=float, default=0.2)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--compile-cases",
        nargs="+",
        default=CASES,
        choices=CASES,
        help="cases also timed under torch.compile (a CPU compile takes ~1 min per model)",
    )
    p.add_argument(
        "--compile-dynamic",
        action="store_true",
        help="compile with dynamic=True (dynamic shapes) instead of static shapes",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: one forward (last batch size, channels-last) split module "
        "by module into convolutions, batch norms, activations, pooling and the rest, dense "
        "and tied; writes models_profile.json/.md",
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        metavar="SECONDS",
        help="instead of timing the modes: for SECONDS a case, the host's memory bandwidth "
        "and one dense and one tied forward (last batch size, channels-last), and how the "
        "ratio moves with the bandwidth; writes models_bandwidth.json/.md",
    )
    p.add_argument("--quick", action="store_true", help="128×128, 3 rounds, no compile")
    p.add_argument("--out", type=Path, default=RESULTS)
    _allocator_flag.add_flag(p)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.compile, args.target_s = 128, 3, False, 0.05
    torch.set_num_threads(args.threads)
    allocator = _allocator_flag.apply(args)
    # The two studies instead of the modes: each case's rows, written with the run's facts.
    studies = {
        "profile": (args.profile, profile_case, profile_markdown, {"rounds": args.rounds}),
        "bandwidth": (
            args.bandwidth is not None,
            bandwidth_case,
            bandwidth_markdown,
            {"seconds_a_case": args.bandwidth},
        ),
    }
    for study, (chosen, run, render, settings) in studies.items():
        if chosen:
            rows = [run(case, args) for case in args.cases]
            res = {"benchmark": f"models_{study}", "threads": args.threads, **settings}
            res |= {"torch": torch.__version__, "machine": describe_machine()}
            res |= {"allocator": allocator, "rows": rows}
            write_results(args.out, f"models_{study}", res, render(rows, args, allocator))
            return 0
    load_start = os.getloadavg()
    start = time.time()
    rows = []
    for case in args.cases:
        rows += run_case(case, args)
    res = {
        "benchmark": "models",
        "size": args.size,
        "threads": args.threads,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "machine": describe_machine(),
        "note": "Cores shared with other jobs: noisy; dense and tied interleaved per round.",
        "compile": "dynamic shapes" if args.compile_dynamic else "static shapes, per batch",
        "seconds": round(time.time() - start, 1),
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "allocator": allocator,
        "rows": rows,
    }
    suffix = "_quick" if args.quick else ""
    write_results(args.out, f"models{suffix}", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
