"""gemm, widen and kernel for pointwise tied convs on channels-last input (the static rule).

Times the ``gemm``, ``widen`` and ``kernel`` paths side by side (interleaved rounds, medians)
on ResNet-50's pointwise shapes, the 64→64 1×1 at 56×56 and MobileNetV3-Large's pooled SE
layers, B ∈ {2, 4, 8}, at batch 1 and batch 8, and prints each path's time, the fastest and
the static rule's choice (``tieify.nn._paths.default_path``); ``tieify.optimize`` picks per
input instead. A pooled (N, C, 1, 1) input is NCHW too, so ``native`` is timed there ("–"
elsewhere). ``kernel`` is left out where tieify's kernel cannot be built (the table says
why).

Usage::

    python benchmarks/pointwise_paths.py      # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _allocator_flag  # noqa: E402

from tieify.latency._timing import interleaved_samples  # noqa: E402
from tieify.nn import TiedConv2d, _paths  # noqa: E402
from tieify.nn._kernel import kernel_available, kernel_status  # noqa: E402

RESNET50_POINTWISE = [  # (C_in, C_out, H) of ResNet-50's bottleneck 1×1 convs
    (64, 256, 56),
    (256, 64, 56),
    (128, 512, 28),
    (512, 128, 28),
    (256, 1024, 14),
    (1024, 256, 14),
    (512, 2048, 7),
    (2048, 512, 7),
]
SHAPES = [
    *RESNET50_POINTWISE,
    (64, 64, 56),
    (960, 240, 1),
    (240, 960, 1),
]


def parse(argv, doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=7)
    _allocator_flag.add_flag(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"Allocator: {_allocator_flag.apply(args)}; {args.threads} threads.\n")
    return args


def table(args, shapes, candidates, make) -> None:
    """Print the Markdown table: for every batch, shape (C_in, C_out, H) and B ∈ {2, 4, 8},
    the time of each candidate path that applies to ``make(C_in, C_out, B)`` on a
    channels-last input, the fastest and the rule's choice."""
    paths = [p for p in candidates if p != "kernel" or kernel_available()]
    if "kernel" not in paths:
        print(f"tieify's kernel is not available: {kernel_status()}\n")
    print(
        "| batch | C_in | C_out | H | B | bank K×N | "
        + " | ".join(f"{p} ms" for p in paths)
        + " | fastest | rule |"
    )
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(paths) + "---|---|")
    for batch in args.batches:
        for ci, co, h in shapes:
            x = torch.randn(batch, ci, h, h).contiguous(memory_format=torch.channels_last)
            for B in (2, 4, 8):
                layer = make(ci, co, B)
                timed = [p for p in paths if p in _paths.applicable_paths(layer, x)]
                fns = {p: (lambda p=p, m=layer, x=x: _paths.run_path(m, x, p)) for p in timed}
                with torch.inference_mode():  # the rule for inference, as the paths run
                    s = interleaved_samples(fns, repeats=args.rounds, target_s=0.01)
                    rule = _paths.default_path(layer, x)
                ms = {p: statistics.median(s[p]) * 1e3 for p in timed}
                cells = " | ".join(f"{ms[p]:.3f}" if p in ms else "–" for p in paths)
                print(
                    f"| {batch} | {ci} | {co} | {h} | {B} | {ci // B}×{co // B} | {cells} | "
                    f"{min(ms, key=ms.__getitem__)} | {rule} |",
                    flush=True,
                )


def main(argv=None) -> int:
    args = parse(argv, __doc__)
    table(
        args,
        SHAPES,
        ("gemm", "widen", "kernel", "native"),
        lambda ci, co, B: TiedConv2d(ci, co, 1, B=B, bias=False),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
