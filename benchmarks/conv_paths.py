"""widen, lift, grouped and kernel for k×k tied convs on channels-last input (the static rule).

Times the k×k paths side by side (interleaved rounds, medians) at batch 1 and batch 8, B ∈
{2, 4, 8}, and prints each path's time, the fastest and the static rule's choice
(``tieify.nn._paths.default_path``); ``tieify.optimize`` picks per input instead. Two
tables: ResNet-50's four 3×3 shapes (stride 1, padding 1), where the rule takes tieify's
kernel by Winograd or at a batch of one and ``widen`` otherwise; and strided layers (stride
2, padding k // 2: ResNet-50's three strided 3×3 convs, then 3×3, 5×5 and 7×7 layers of
other sizes), which ``widen`` cannot run (a stride along the widened axis would step across
blocks) and where the rule takes the kernel; and ResNeXt-50 32×4d's three strided grouped
3×3 convs (32 groups: a tied grouped convolution, which the kernel does not compute), where
the rule takes ``grouped``, as for every strided layer the kernel does not run. ``kernel``
is left out where tieify's kernel cannot be built (the table says why).

Usage::

    python benchmarks/conv_paths.py      # ~1 minute on 2 cores
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pointwise_paths import parse, table  # noqa: E402

from tieify.nn import TiedConv2d  # noqa: E402

SHAPES = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)]
#: (C_in, C_out, H, k) of strided layers: ResNet-50's three strided 3×3 convs (their input
#: sizes), then others of the sizes and kernels other networks stride with.
STRIDED = [
    (128, 128, 56, 3),
    (256, 256, 28, 3),
    (512, 512, 14, 3),
    (32, 32, 112, 3),
    (64, 64, 14, 3),
    (16, 32, 6, 3),
    (64, 64, 28, 5),
    (32, 64, 56, 7),
]
#: (C_in, C_out, H) of ResNeXt-50 32×4d's strided grouped 3×3 convs (their input sizes).
STRIDED_GROUPED = [(256, 256, 56), (512, 512, 28), (1024, 1024, 14)]
GROUPS = 32
PATHS = ("widen", "lift", "grouped", "kernel")


def main(argv=None) -> int:
    args = parse(argv, __doc__)
    print("Stride 1, 3×3, padding 1 (H: input and output size):\n")
    table(args, SHAPES, PATHS, lambda ci, co, B: TiedConv2d(ci, co, 3, padding=1, B=B, bias=False))
    for k in sorted({s[3] for s in STRIDED}):
        print(f"\nStride 2, {k}×{k}, padding {k // 2} (H: input size):\n")
        table(
            args,
            [s[:3] for s in STRIDED if s[3] == k],
            PATHS,
            lambda ci, co, B, k=k: TiedConv2d(ci, co, k, stride=2, padding=k // 2, B=B, bias=False),
        )
    print(f"\nStride 2, 3×3, padding 1, {GROUPS} groups (H: input size):\n")
    table(
        args,
        STRIDED_GROUPED,
        PATHS,
        lambda ci, co, B: TiedConv2d(
            ci, co, 3, stride=2, padding=1, groups=GROUPS, B=B, bias=False
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
