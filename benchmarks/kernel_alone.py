"""Whole models with the kernel as the rule's default for unfused layers, and without it.

The static rule (``tieify.nn._paths.default_path``) takes tieify's kernel for an unfused
layer only where ``_paths._KERNEL_WINS_ALONE`` holds (see its note). This times, per model
and batch, in interleaved rounds (medians of per-round ratios to the dense channels-last
model): the channels-last tied model with the rule as this machine has it, the same with
the kernel taken alone (``_KERNEL_WINS_ALONE`` True), without it (False), and after
``tieify.optimize``. Each copy decides its layers' paths on its first call, under its own
setting; the kernel's stores are this machine's (``tieify.nn._kernel.STREAM_MIN_BYTES``).

Usage::

    python benchmarks/kernel_alone.py                  # ~6 minutes on 2 cores
    python benchmarks/kernel_alone.py --cases resnet50_all_B4 --batches 1
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import against_table, run_facts, run_model_benchmark, timing_facts  # noqa: E402
from models import rule_setting_rows  # noqa: E402

from tieify.nn import _kernel, _paths  # noqa: E402

CASES = ["resnet50_all_B4", "resnet50_3x3_B2", "resnext50_B2", "mobilenet_v3_large_B2"]
VARIANTS = ("rule", "kernel_alone", "no_kernel_alone", "optimize")


def case_rows(args) -> list[dict]:
    settings = {
        "kernel_alone": {"_KERNEL_WINS_ALONE": True},
        "no_kernel_alone": {"_KERNEL_WINS_ALONE": False},
    }
    return rule_setting_rows(args, settings)


def markdown(res: dict) -> str:
    lines = [
        "# The kernel as the rule's default for unfused layers",
        "",
        f"Tied / dense latency, channels-last, {res['size']}×{res['size']}, "
        f"{timing_facts(res)} This machine's rule takes the kernel alone: "
        f"{res['kernel_wins_alone']}; the kernel streams outputs from "
        f"{res['stream_min_bytes'] / 2**20:.0f} MiB. {run_facts(res)}",
        "",
    ]
    lines += against_table(
        "case | batch | dense ms | " + " | ".join(v.replace("_", " ") for v in VARIANTS),
        res["rows"],
        lambda r: [r["case"], r["batch"]],
        VARIANTS,
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run_model_benchmark(
        "kernel_alone",
        "The kernel as the rule's default, and not.",
        CASES,
        lambda args: {"rows": case_rows(args)},
        markdown,
        argv,
        lambda: {
            "kernel_wins_alone": _paths._KERNEL_WINS_ALONE,
            "stream_min_bytes": _kernel.STREAM_MIN_BYTES,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
