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
   layers up to ``tieify.nn._paths.NATIVE_MAX_NUMEL`` elements, batch included.

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
