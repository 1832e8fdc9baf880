"""The kernel's stores: outputs streamed past the cache from 1 MiB or from half of it.

tieify's kernel writes an output with non-temporal stores where it has at least
``tieify.nn._kernel.STREAM_MIN_BYTES`` bytes: half the last-level cache where that holds at
least 64 MiB, else 1 MiB (``stream_min_bytes``). This times both choices on this machine,
whichever its rule takes: whole models fused by ``tieify.fuse`` (channels-last, so that
most layers run the kernel), each in two copies whose kernel calls were made ready under
the two thresholds (a call keeps its stores), in interleaved rounds with the dense
channels-last model (medians of per-round ratios).

Usage::

    python benchmarks/streaming.py                # ~3 minutes on 2 cores
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import against_table, run_facts, run_model_benchmark, timing_facts  # noqa: E402
from models import CL, against, build_case, median_ratio, time_models  # noqa: E402

import tieify  # noqa: E402
from tieify.nn import _kernel  # noqa: E402

CASES = ["resnet50_all_B4", "resnet50_3x3_B2", "mobilenet_v3_large_B2"]
SMALL = 1 << 20  # the threshold of a cache under 64 MiB


def half_cache() -> int:
    """Half the last-level cache (at least 1 MiB): the threshold of a cache of 64 MiB or more."""
    return max(SMALL, (_kernel.last_level_cache_bytes() or 0) // 2)


def case_rows(args) -> list[dict]:
    rows = []
    for case in args.cases:
        dense, tied = build_case(case)
        dense = dense.to(memory_format=CL)
        tied = tied.to(memory_format=CL)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=CL)
            thresholds = {"half_cache": half_cache(), "from_1mib": SMALL}
            fused = {k: tieify.fuse(copy.deepcopy(tied), x) for k in thresholds}
            with torch.inference_mode():
                for name, threshold in thresholds.items():  # kernel calls made ready with it
                    with mock.patch.object(_kernel, "STREAM_MIN_BYTES", threshold):
                        fused[name](x)
                samples = time_models({"dense": dense, **fused}, x, args.rounds, args.target_s)
            row = {
                "case": case,
                "batch": batch,
                "chains": len(getattr(fused["half_cache"], "fused", {})),
                **against(samples, tuple(thresholds), "dense"),
            }
            row["from_1mib_over_half_cache"] = median_ratio(samples, "from_1mib", "half_cache")
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = [
        "# The kernel's stores: streamed from 1 MiB against from half the last-level cache",
        "",
        f"Fused tied models (`tieify.fuse`), channels-last, {res['size']}×{res['size']}, "
        f"{timing_facts(res)} Last-level cache "
        f"{res['llc_bytes']} bytes: half of it {res['half_cache_bytes'] / 2**20:.0f} MiB; "
        f"this machine's rule streams outputs from {res['stream_min_bytes'] / 2**20:.0f} MiB. "
        f"{run_facts(res)}",
        "",
    ]
    lines += against_table(
        "case | batch | chains | dense ms | streamed from half the cache: ms (/ dense) | "
        "streamed from 1 MiB: ms (/ dense) | from 1 MiB / from half the cache",
        res["rows"],
        lambda r: [r["case"], r["batch"], r["chains"]],
        ("half_cache", "from_1mib"),
        "from_1mib_over_half_cache",
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run_model_benchmark(
        "streaming",
        "The kernel's stores: streamed or regular.",
        CASES,
        lambda args: {"rows": case_rows(args)},
        markdown,
        argv,
        lambda: {
            "llc_bytes": _kernel.last_level_cache_bytes(),
            "half_cache_bytes": half_cache(),
            "stream_min_bytes": _kernel.STREAM_MIN_BYTES,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
