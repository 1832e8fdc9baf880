"""What a tied layer costs beyond its arithmetic: the ``kernel`` path's per-call Python.

Three measurements, interleaved rounds, medians:

1. ResNet-50's pointwise shapes where the static rule runs tieify's kernel (batch 8,
   channels-last, B = 4 and 8): the tied layer's time (``layer(x)``: its kept, prepared call)
   over the bare kernel's (the library's entry point called with the same operands and a
   new output each call, as the layer allocates one), and the same for ``run_path(layer, x,
   "kernel")`` with ``--unkept`` (the call made and checked anew every time: what each call
   cost before calls were kept).
2. A tiny input (1×16×2×2), where the arithmetic is nothing: µs per call of the tied layer on
   each path (``layer.path`` pinned), and on the kernel path made anew (``unkept``), against
   the dense ``nn.Conv2d`` of the same shape.
3. Compiled models (``--no-compiled`` skips it): ResNet-50 with all bottleneck convs at B = 4
   and with its 3×3 ones at B = 2 (``benchmarks/models.py``'s cases), channels-last,
   ``tieify.optimize`` then ``torch.compile``, batch 1 and 8: the compiled tied model with
   the ``tieify::`` operators' kept calls against the same graph making each call anew
   (packing the bank every time, as before calls were kept), and both against the compiled
   dense model.

Usage::

    python benchmarks/call_overhead.py      # ~5 minutes on 2 cores (~1 without compiles)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _allocator_flag  # noqa: E402

import tieify  # noqa: E402
from tieify.latency._timing import interleaved_samples  # noqa: E402
from tieify.nn import TiedConv2d, _kernel, _paths  # noqa: E402

CL = torch.channels_last
SHAPES = [(64, 256, 56), (256, 64, 56), (512, 128, 28), (1024, 256, 14)]  # (C_in, C_out, H)
TINY_PATHS = [
    (1, "kernel", CL),
    (3, "kernel", CL),
    (1, "gemm", CL),
    (1, "widen", CL),
    (3, "widen", CL),
    (3, "lift", CL),
    (3, "grouped", CL),
    (1, "native", torch.contiguous_format),
    (3, "fold", torch.contiguous_format),
]


def unkept(layer: TiedConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward as it ran before calls were kept: the path selected, then the
    kernel's call made and checked anew."""
    assert _paths.select_path(layer, x) == "kernel"
    if not _paths._is_pointwise(layer):
        return _paths.kernel_conv_call(layer, x, layer.bias)
    a, unfold = _paths.kernel_rows(layer, x)
    return unfold(_paths.kernel_pointwise_call(layer, a, layer.bias))


def layer_against_kernel(rounds: int) -> None:
    lib = _kernel._library()
    assert lib is not None, _kernel.kernel_status()
    print("| C_in | C_out | H | B | bare kernel ms | layer / bare | unkept / bare |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for ci, co, h in SHAPES:
        for B in (4, 8):
            layer = TiedConv2d(ci, co, 1, B=B, bias=False).eval()
            layer.path = "kernel"  # what the rule picks on CPUs without AVX-512
            x = torch.randn(8, ci, h, h).contiguous(memory_format=CL)
            rows, k, n = 8 * h * h * B, ci // B, co // B
            bank = _kernel.pack(layer.weight.detach().reshape(n, k).t())

            def bare(x=x, bank=bank, rows=rows, k=k, n=n) -> torch.Tensor:
                out = torch.empty(rows, n)
                lib.tieify_pointwise(
                    x.data_ptr(), bank.data_ptr(), out.data_ptr(), rows, k, n,
                    None, torch.get_num_threads(), 1, *_kernel._NO_EPILOGUE,
                )  # fmt: skip
                return out

            fns = {"bare": bare, "layer": lambda m=layer, x=x: m(x)}
            fns["unkept"] = lambda m=layer, x=x: unkept(m, x)
            with torch.no_grad():
                s = interleaved_samples(fns, repeats=rounds, target_s=0.02)
            ratio = {
                f: statistics.median(t / b for t, b in zip(s[f], s["bare"], strict=True))
                for f in ("layer", "unkept")
            }
            bare_ms = statistics.median(s["bare"]) * 1e3
            print(
                f"| {ci} | {co} | {h} | {B} | {bare_ms:.3f} | {ratio['layer']:.3f} | "
                f"{ratio['unkept']:.3f} |",
                flush=True,
            )


def tiny_calls(rounds: int) -> None:
    print("\n| k | path | layout | tied layer µs | unkept µs | dense conv µs |")
    print("|---:|---|---|---:|---:|---:|")
    for k, path, layout in TINY_PATHS:
        layer = TiedConv2d(16, 16, k, padding=k // 2, B=4).eval()
        layer.path = path
        dense = torch.nn.Conv2d(16, 16, k, padding=k // 2).eval().to(memory_format=layout)
        x = torch.randn(1, 16, 2, 2).contiguous(memory_format=layout)
        fns = {"tied": lambda m=layer, x=x: m(x), "dense": lambda m=dense, x=x: m(x)}
        if path == "kernel":
            fns["unkept"] = lambda m=layer, x=x: unkept(m, x)
        with torch.no_grad():
            assert _paths.select_path(layer, x) == path
            s = interleaved_samples(fns, repeats=rounds, target_s=0.02)
        us = {f: statistics.median(v) * 1e6 for f, v in s.items()}
        name = "channels-last" if layout == CL else "NCHW"
        before = f"{us['unkept']:.1f}" if "unkept" in us else "–"
        print(
            f"| {k} | {path} | {name} | {us['tied']:.1f} | {before} | {us['dense']:.1f} |",
            flush=True,
        )


class _UnkeptOperatorCalls(_paths._OperatorCalls):
    """The operators' calls made anew every time (no call kept)."""

    def get(self, tensors, layout, make):
        with torch.no_grad():
            return make()


def compiled_models(rounds: int) -> None:
    import copy

    from models import build_case

    print("\n| case | batch | compiled dense ms | tied kept ms | tied unkept ms | kept / unkept "
          "| tied / dense kept | tied / dense unkept |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    kept_calls, unkept_calls = _paths._OPERATOR_CALLS, _UnkeptOperatorCalls()
    for case in ("resnet50_all_B4", "resnet50_3x3_B2"):
        dense, tied = (copy.deepcopy(m).to(memory_format=CL) for m in build_case(case))
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=CL)
            with torch.inference_mode():
                tieify.optimize(tied, x)
            torch._dynamo.reset()
            cd, ct = torch.compile(dense), torch.compile(tied)

            def with_calls(calls, ct=ct, x=x):
                _paths._OPERATOR_CALLS = calls
                try:
                    return ct(x)
                finally:
                    _paths._OPERATOR_CALLS = kept_calls

            fns = {
                "dense": lambda cd=cd, x=x: cd(x),
                "kept": lambda: with_calls(kept_calls),
                "unkept": lambda: with_calls(unkept_calls),
            }
            with torch.inference_mode():
                s = interleaved_samples(fns, repeats=rounds, target_s=0.3)
            ms = {f: statistics.median(v) * 1e3 for f, v in s.items()}

            def ratio(a: str, b: str, s=s) -> float:
                return statistics.median(p / q for p, q in zip(s[a], s[b], strict=True))

            print(
                f"| {case} | {batch} | {ms['dense']:.1f} | {ms['kept']:.1f} | "
                f"{ms['unkept']:.1f} | {ratio('kept', 'unkept'):.3f} | "
                f"{ratio('kept', 'dense'):.3f} | {ratio('unkept', 'dense'):.3f} |",
                flush=True,
            )


def main(argv=None) -> int:
    def options(p) -> None:
        help = "skip the compiled models (two compiles per case and batch)"
        p.add_argument("--no-compiled", dest="compiled", action="store_false", help=help)

    args = _allocator_flag.table_script_args(__doc__.splitlines()[0], 15, argv, options)
    layer_against_kernel(args.rounds)
    tiny_calls(args.rounds)
    if args.compiled:
        compiled_models(min(args.rounds, 7))
    return 0


if __name__ == "__main__":
    sys.exit(main())
