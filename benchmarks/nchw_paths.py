"""Where the static rule runs NCHW tied convs on PyTorch's native kernel (the ``native`` path)
or on tieify's channels-first product (the ``kernel`` path on NCHW input).

Times the paths side by side (interleaved rounds, medians) on contiguous (NCHW) inputs and
prints time ratios (> 1: ``native`` is faster):

1. pointwise layers (ResNet-50's and MobileNetV3-Large's 1×1 shapes), B ∈ {2, 4, 8},
   batch 1 and 8: fold / native, bmm / native and kernel / native — the rule takes the
   kernel from ``KERNEL_MIN_PIXELS`` pixels (batch × H × W) where it is built, ``native``
   below;
2. small 3×3 layers (the default search model's and a few more), B ∈ {2, 4}, batch 1, 2 and
   8: fold / native against the input's element count — the rule takes ``native`` for k×k
   layers up to ``tieify.nn._paths.NATIVE_MAX_NUMEL`` elements, batch included;
3. ResNet-50's strided 1×1 (downsample) layers, B ∈ {2, 4, 8}, batch 1 and 8: kernel (the
   channels-first product of the kept pixels, copied out) / native;
4. ResNet-50's 3×3 layers (stride 1), B ∈ {2, 4, 8}, batch 1 and 8: fold, grouped and
   native over the kernel (the convolution kernel on a channels-last copy, the output
   copied back), with the rule's choice — it takes the kernel where Winograd applies
   (at least ``WINOGRAD_MIN_CHANNELS`` channels a block) and the kernel wins alone.

Usage::

    python benchmarks/nchw_paths.py                # ~30 s here
    python benchmarks/nchw_paths.py --threads 1
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _allocator_flag  # noqa: E402
from pointwise_paths import RESNET50_POINTWISE  # noqa: E402

from tieify.latency._timing import interleaved_samples  # noqa: E402
from tieify.nn import TiedConv2d, _paths  # noqa: E402

POINTWISE = [  # (C_in, C_out, H): ResNet-50's, then MobileNetV3-Large's
    *RESNET50_POINTWISE,
    (16, 64, 112),
    (72, 24, 56),
    (40, 120, 28),
    (480, 80, 14),
    (960, 160, 7),
]
SMALL_3X3 = [(16, 16), (32, 8), (64, 4), (16, 32), (32, 16), (64, 8), (128, 8), (64, 16)]
DOWNSAMPLE = [(256, 512, 56), (512, 1024, 28), (1024, 2048, 14)]  # stride 2
RESNET50_3X3 = [(64, 56), (128, 28), (256, 14), (512, 7)]


def medians(layer: TiedConv2d, x: torch.Tensor, paths: tuple[str, ...], rounds: int):
    fns = {p: (lambda p=p: _paths.run_path(layer, x, p)) for p in paths}
    with torch.inference_mode():
        s = interleaved_samples(fns, repeats=rounds, target_s=0.01)
    return {p: statistics.median(v) for p, v in s.items()}


def main(argv=None) -> int:
    args = _allocator_flag.table_script_args(__doc__.splitlines()[0], 7, argv)

    print("Pointwise, NCHW: fold / native, bmm / native and kernel / native time ratios.\n")
    others = ("fold", "bmm", "kernel")
    cols = " | ".join(f"B={B} {p}" for B in (2, 4, 8) for p in others)
    print(f"| batch | C_in | C_out | H | {cols} |")
    print("|---:|---:|---:|---:|" + "---:|" * 9)
    for batch in (1, 8):
        for ci, co, h in POINTWISE:
            x = torch.randn(batch, ci, h, h)
            cells = []
            for B in (2, 4, 8):
                layer = TiedConv2d(ci, co, 1, B=B, bias=False)
                paths = [p for p in others if p in _paths.applicable_paths(layer, x)]
                t = medians(layer, x, (*paths, "native"), args.rounds)
                cells += [t[p] / t["native"] if p in t else math.nan for p in others]
            row = " | ".join(f"{r:.2f}" for r in cells)
            print(f"| {batch} | {ci} | {co} | {h} | {row} |", flush=True)

    print(f"\n3×3, NCHW: fold / native (rule: native up to {_paths.NATIVE_MAX_NUMEL} elements).\n")
    print("| batch | C | H | elements | B=2 | B=4 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 2, 8):
        for c, h in SMALL_3X3:
            x = torch.randn(batch, c, h, h)
            cells = []
            for B in (2, 4):
                layer = TiedConv2d(c, c, 3, padding=1, B=B, bias=False)
                t = medians(layer, x, ("fold", "native"), args.rounds)
                cells.append(t["fold"] / t["native"])
            row = " | ".join(f"{r:.2f}" for r in cells)
            print(f"| {batch} | {c} | {h} | {x.numel()} | {row} |", flush=True)

    print("\nStrided 1×1 (stride 2), NCHW: kernel / native.\n")
    print("| batch | C_in | C_out | H | B=2 | B=4 | B=8 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 8):
        for ci, co, h in DOWNSAMPLE:
            x = torch.randn(batch, ci, h, h)
            cells = []
            for B in (2, 4, 8):
                layer = TiedConv2d(ci, co, 1, stride=2, B=B, bias=False)
                t = medians(layer, x, ("kernel", "native"), args.rounds)
                cells.append(f"{t['kernel'] / t['native']:.2f}")
            print(f"| {batch} | {ci} | {co} | {h} | {' | '.join(cells)} |", flush=True)

    print("\n3×3, NCHW: fold / kernel, grouped / kernel, native / kernel; the rule's path.\n")
    print("| batch | C | H | B | C/B | fold | grouped | native | rule |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for batch in (1, 8):
        for c, h in RESNET50_3X3:
            x = torch.randn(batch, c, h, h)
            for B in (2, 4, 8):
                layer = TiedConv2d(c, c, 3, padding=1, B=B, bias=False)
                t = medians(layer, x, ("fold", "grouped", "native", "kernel"), args.rounds)
                others = ("fold", "grouped", "native")
                cells = " | ".join(f"{t[p] / t['kernel']:.2f}" for p in others)
                with torch.inference_mode():  # the rule for inference, as the paths ran
                    rule = _paths.default_path(layer, x)
                print(f"| {batch} | {c} | {h} | {B} | {c // B} | {cells} | {rule} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
