"""The kernel's stores: outputs streamed past the cache from 1 MiB, against this machine's rule.

tieify's kernel writes an output with non-temporal stores where it has at least
``tieify.nn._kernel.STREAM_MIN_BYTES`` bytes (half the last-level cache, at least 1 MiB:
``stream_min_bytes``). This times whole models fused by ``tieify.fuse`` (channels-last, so
that most layers run the kernel), each in two copies whose kernel calls were made ready
under the two thresholds (a call keeps its stores), in interleaved rounds with the dense
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

from _results import run_model_benchmark  # noqa: E402
from models import CL, against, build_case, median_ratio, time_models  # noqa: E402

import tieify  # noqa: E402
from tieify.nn import _kernel  # noqa: E402

CASES = ["resnet50_all_B4", "resnet50_3x3_B2", "mobilenet_v3_large_B2"]
STREAM_FROM = 1 << 20  # the threshold before it followed the cache


def case_rows(args) -> list[dict]:
    rows = []
    for case in args.cases:
        dense, tied = build_case(case)
        dense = dense.to(memory_format=CL)
        tied = tied.to(memory_format=CL)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=CL)
            fused = {k: tieify.fuse(copy.deepcopy(tied), x) for k in ("machine", "from_1mib")}
            with torch.inference_mode():
                fused["machine"](x)  # its kernel calls made ready with this machine's stores
                with mock.patch.object(_kernel, "STREAM_MIN_BYTES", STREAM_FROM):
                    fused["from_1mib"](x)
                samples = time_models({"dense": dense, **fused}, x, args.rounds, args.target_s)
            row = {
                "case": case,
                "batch": batch,
                "chains": len(getattr(fused["machine"], "fused", {})),
                **against(samples, ("machine", "from_1mib"), "dense"),
            }
            row["from_1mib_over_machine"] = median_ratio(samples, "from_1mib", "machine")
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = [
        "# The kernel's stores: streamed from 1 MiB against this machine's threshold",
        "",
        f"Fused tied models (`tieify.fuse`), channels-last, {res['size']}×{res['size']}, "
        f"{res['threads']} threads, {res['rounds']} interleaved rounds (medians of per-round "
        f"ratios); torch {res['torch']}, {res['machine']}. Last-level cache "
        f"{res['llc_bytes']} bytes; this machine streams outputs from "
        f"{res['stream_min_bytes'] / 2**20:.0f} MiB. Load average at start "
        f"{res['loadavg_start']}, at end {res['loadavg_end']}.",
        "",
        "| case | batch | chains | dense ms | this machine's stores: ms (/ dense) | streamed "
        "from 1 MiB: ms (/ dense) | streamed / this machine's |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['chains']} | {r['dense_ms']:.1f} | "
            f"{r['machine_ms']:.1f} ({r['machine']:.3f}) | {r['from_1mib_ms']:.1f} "
            f"({r['from_1mib']:.3f}) | {r['from_1mib_over_machine']:.3f} |"
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
            "stream_min_bytes": _kernel.STREAM_MIN_BYTES,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
