"""Where a model's NCHW (eager) forward spends the time its channels-last one saves.

Times one model case of ``models.py`` (default: ResNet-50 with every bottleneck conv at
B = 4), dense and tied, NCHW and channels-last, module by module: every leaf module's
forward is timed by a pre- and a post-hook (medians over interleaved rounds: one forward of
each model a round), and the times are summed by module type. The tied models run the
rule's paths (no ``tieify.optimize``), as in ``models.py``'s eager mode. Prints one table:
per module type, ms per forward in the four models; the whole forward, hooks included, in
the last row. The hooks add a little to every module, the same in all four models.

Usage::

    python benchmarks/layouts.py                        # ~1 minute here
    python benchmarks/layouts.py --case resnet50_3x3_B2 --batch 1
"""

from __future__ import annotations

import collections
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _allocator_flag  # noqa: E402
from models import CASES, CL, build_case  # noqa: E402


def module_times(models: dict[str, tuple[nn.Module, torch.Tensor]], rounds: int):
    """For each named (model, input): median ms per forward of each leaf module type, summed
    over the modules of that type, and ``"forward"``, the whole forward's median. The models
    run in interleaved rounds (one forward each a round)."""
    starts: dict[nn.Module, float] = {}
    per_round: dict[nn.Module, list[float]] = collections.defaultdict(list)

    def pre(module: nn.Module, _args) -> None:
        starts[module] = time.perf_counter()

    def post(module: nn.Module, _args, _out) -> None:
        per_round[module].append(time.perf_counter() - starts[module])

    leaves = {
        n: [m for m in model.modules() if not list(m.children())]
        for n, (model, _) in models.items()
    }
    handles = [
        h
        for ms in leaves.values()
        for m in ms
        for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))
    ]
    forward: dict[str, list[float]] = collections.defaultdict(list)
    try:
        with torch.inference_mode():
            for model, x in models.values():  # warm-up: paths chosen, calls kept, memory
                for _ in range(2):
                    model(x)
            per_round.clear()
            for _ in range(rounds):
                for name, (model, x) in models.items():
                    start = time.perf_counter()
                    model(x)
                    forward[name].append(time.perf_counter() - start)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[str, float]] = {}
    for name in models:
        sums: dict[str, float] = collections.defaultdict(float)
        for module in leaves[name]:  # a module called twice a forward: both calls
            times = per_round[module]
            sums[type(module).__name__] += statistics.median(times) * len(times) / rounds * 1e3
        sums["forward"] = statistics.median(forward[name]) * 1e3
        out[name] = sums
    return out


def main(argv=None) -> int:
    def options(p) -> None:
        p.add_argument("--case", choices=CASES, default="resnet50_all_B4")
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--size", type=int, default=224)

    args = _allocator_flag.table_script_args(__doc__.splitlines()[0], 5, argv, options)
    dense, tied = build_case(args.case)
    x = torch.randn(args.batch, 3, args.size, args.size)
    xc = x.contiguous(memory_format=CL)
    models = {
        "dense NCHW": (dense, x),
        "tied NCHW": (tied, x),
        "dense channels-last": (copy.deepcopy(dense).to(memory_format=CL), xc),
        "tied channels-last": (copy.deepcopy(tied).to(memory_format=CL), xc),
    }
    times = module_times(models, args.rounds)
    print(f"{args.case}, batch {args.batch}, {args.size}×{args.size}: ms per forward by module "
          "type (leaf modules, medians).\n")  # fmt: skip
    print("| module type | " + " | ".join(times) + " |")
    print("|---|" + "---:|" * len(times))
    kinds = sorted({k for t in times.values() for k in t} - {"forward"})
    kinds.sort(key=lambda k: -max(t.get(k, 0.0) for t in times.values()))
    for kind in [*kinds, "forward"]:
        cells = " | ".join(f"{t.get(kind, 0.0):.1f}" for t in times.values())
        print(f"| {kind} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
