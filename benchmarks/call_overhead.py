"""What an eager tied layer costs beyond its arithmetic: the ``kernel`` path's per-call Python.

Two measurements, interleaved rounds, medians:

1. ResNet-50's pointwise shapes where the static rule runs tieify's kernel (batch 8,
   channels-last, B = 4 and 8): the tied layer's time (``layer(x)``: its kept, prepared call)
   over the bare kernel's (the library's entry point called with the same operands and a
   new output each call, as the layer allocates one), and the same for ``run_path(layer, x,
   "kernel")`` with ``--unkept`` (the call made and checked anew every time: what each call
   cost before calls were kept).
2. A tiny input (1×16×2×2), where the arithmetic is nothing: µs per call of the tied layer on
   each path (``layer.path`` pinned), and on the kernel path made anew (``unkept``), against
   the dense ``nn.Conv2d`` of the same shape.

Usage::

    python benchmarks/call_overhead.py      # ~1 minute on 2 cores
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _allocator_flag  # noqa: E402

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


def main(argv=None) -> int:
    args = _allocator_flag.table_script_args(__doc__.splitlines()[0], 15, argv)
    layer_against_kernel(args.rounds)
    tiny_calls(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
