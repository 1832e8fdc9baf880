"""widen, lift, grouped and kernel for 3×3 tied convs on channels-last input (the static rule).

Times the k×k paths side by side (interleaved rounds, medians) on ResNet-50's four 3×3
shapes (stride 1, padding 1), B ∈ {2, 4, 8}, at batch 1 and batch 8, and prints each path's
time, the fastest and the static rule's choice (``tieify.nn._paths.default_path``, which
takes tieify's kernel for outputs at least ``KERNEL_CONV_MIN_WIDTH`` wide);
``tieify.optimize`` picks per input instead. ``kernel`` is left out where tieify's kernel
cannot be built (the table says why).

Usage::

    python benchmarks/conv_paths.py      # ~3 minutes on 2 cores
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pointwise_paths import parse, table  # noqa: E402

from tieify.nn import TiedConv2d  # noqa: E402

SHAPES = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)]


def main(argv=None) -> int:
    args = parse(argv, __doc__)
    table(
        args,
        SHAPES,
        ("widen", "lift", "grouped", "kernel"),
        lambda ci, co, B: TiedConv2d(ci, co, 3, padding=1, B=B, bias=False),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
