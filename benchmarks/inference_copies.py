"""Tied models converted or copied under ``torch.inference_mode``, against the same models
converted outside it.

A model moved to channels-last (``.to(memory_format=...)``) or deep-copied inside
``torch.inference_mode()`` holds inference tensors as parameters: they have no version
counter, so a kernel call prepared from them cannot learn of an in-place change by its
version. tieify's tied layers keep such calls with a copy of the parameters' values,
compared before each run (``tieify.nn._paths._stamp``), and so do the operators a
``torch.compile`` d graph calls (``tieify.nn._paths._OperatorCalls``). This times, per case
and batch, channels-last and after ``tieify.optimize``, in interleaved rounds (medians of
per-round ratios): the dense model, the tied model converted outside ``inference_mode``,
and the tied model converted inside it; eager, and each of the three compiled
(``torch.compile(dynamic=False)``, ``--no-compile`` leaves them out).

Usage::

    python benchmarks/inference_copies.py     # ~2 minutes on 2 cores
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import against_table, run_facts, run_model_benchmark, timing_facts  # noqa: E402
from models import CL, against, build_case, median_ratio, time_models  # noqa: E402

import tieify  # noqa: E402

CASES = ["resnet50_all_B4", "resnet50_3x3_B2"]


def case_rows(args) -> list[dict]:
    rows = []
    for case in args.cases:
        dense, tied = build_case(case)
        dense = copy.deepcopy(dense).to(memory_format=CL)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=CL)
            outside = copy.deepcopy(tied).to(memory_format=CL)
            with torch.inference_mode():
                inside = copy.deepcopy(tied).to(memory_format=CL)
                assert all(p.is_inference() for p in inside.parameters())
                tieify.optimize(outside, x)
                tieify.optimize(inside, x)
            models = {"eager": {"dense": dense, "outside": outside, "inside": inside}}
            if args.compile:
                torch._dynamo.reset()
                models["compile"] = {
                    k: torch.compile(m, dynamic=False) for k, m in models["eager"].items()
                }
            for mode, ms in models.items():
                with torch.inference_mode():
                    torch.testing.assert_close(ms["inside"](x), ms["outside"](x))
                    samples = time_models(ms, x, args.rounds, args.target_s)
                row = {"case": case, "batch": batch, "mode": mode}
                row |= against(samples, ("outside", "inside"), "dense")
                row["inside_over_outside"] = median_ratio(samples, "inside", "outside")
                rows.append(row)
                print(row, flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = [
        "# Tied models converted under inference_mode against outside it",
        "",
        f"Channels-last, {res['size']}×{res['size']}, after `tieify.optimize`, eager and "
        f"`torch.compile(dynamic=False)`, {timing_facts(res)} {run_facts(res)}",
        "",
    ]
    lines += against_table(
        "case | batch | mode | dense ms | converted outside: ms (/ dense) | converted inside: "
        "ms (/ dense) | inside / outside",
        res["rows"],
        lambda r: [r["case"], r["batch"], r["mode"]],
        ("outside", "inside"),
        "inside_over_outside",
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run_model_benchmark(
        "inference_copies",
        "Tied models converted under inference_mode against outside it.",
        CASES,
        lambda args: {"rows": case_rows(args)},
        markdown,
        argv,
        options=lambda p: p.add_argument(
            "--no-compile", dest="compile", action="store_false", help="eager models only"
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
