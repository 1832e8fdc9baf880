"""Whole models under the rule for a BLAS that runs behind oneDNN, for one the kernel
outruns, and for one that keeps up with both.

Where PyTorch's BLAS runs well under oneDNN's rate (MKL on an AMD CPU with full-width
AVX-512: ``tieify.nn._paths.blas_behind_onednn``), the static rule keeps pointwise layers
off it (``_paths._BLAS_BEHIND_ONEDNN``); where tieify's kernel outruns a BLAS that keeps up
with oneDNN (AMD's Zen and Zen+: ``kernel_outruns_blas``), it keeps channels-last pointwise
layers off it (``_paths._KERNEL_OUTRUNS_BLAS``). This times, per model, input layout
(channels-last and NCHW) and batch, in interleaved rounds (medians of per-round ratios to
the dense model in the same layout): the tied model as ``tieify.tieify`` returns it with the
rule as this machine has it, with the rule for a BLAS that runs behind (``blas_behind``),
for one the kernel outruns (``kernel_outruns``), for one that keeps up with both
(``blas_keeps_up``), and after ``tieify.optimize``. Each copy decides its layers' paths on
its first call, under its own setting. The header gives the BLAS's rate and oneDNN's on one
product each, measured before the models on the run's threads.

Usage::

    python benchmarks/blas_rule.py                  # ~4 minutes on 2 cores
    python benchmarks/blas_rule.py --cases resnext50_B2 --batches 8
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import against_table, run_facts, run_model_benchmark, timing_facts  # noqa: E402
from models import rule_setting_rows  # noqa: E402

from tieify.nn import _paths  # noqa: E402

CASES = ["resnext50_B2", "resnet50_all_B4", "mobilenet_v3_large_B2"]
SETTINGS: dict[str, dict[str, object]] = {
    "blas_behind": {"_BLAS_BEHIND_ONEDNN": True, "_KERNEL_OUTRUNS_BLAS": False},
    "kernel_outruns": {"_BLAS_BEHIND_ONEDNN": False, "_KERNEL_OUTRUNS_BLAS": True},
    "blas_keeps_up": {"_BLAS_BEHIND_ONEDNN": False, "_KERNEL_OUTRUNS_BLAS": False},
}
VARIANTS = ("rule", *SETTINGS, "optimize")


def gflops(fn, flop: float, calls: int = 10, repeats: int = 5) -> float:
    """The best of ``repeats`` rates (GFLOP/s) of ``calls`` back-to-back calls of ``fn``."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return flop / best / 1e9


def rates() -> dict:
    """The BLAS's rate (a 2048² ``torch.mm``) and oneDNN's (a 1×1 convolution of 1024
    channels at 14×14, batch 8, channels-last: the same kind of product), in GFLOP/s."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(8, 1024, 14, 14).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1024, 1024, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        blas = gflops(lambda: torch.mm(a, b), 2 * 2048**3)
        onednn = gflops(lambda: torch.nn.functional.conv2d(x, w), 2 * 8 * 14 * 14 * 1024**2)
    return {"blas_gflops": round(blas), "onednn_gflops": round(onednn)}


def case_rows(args) -> list[dict]:
    return rule_setting_rows(args, SETTINGS, ("channels_last", "nchw"))


def markdown(res: dict) -> str:
    lines = [
        "# The rule for a BLAS that runs behind oneDNN, for one the kernel outruns, and for "
        "one that keeps up",
        "",
        f"Tied / dense latency, {res['size']}×{res['size']}, {timing_facts(res)} On this "
        f"machine the kernel outruns the BLAS: {res['kernel_outruns_blas']}; PyTorch's "
        f"BLAS runs behind oneDNN: {res['blas_behind_onednn']} (MKL: "
        f"{res['mkl']}; a 2048² mm at {res['blas_gflops']} GFLOP/s, a 1×1 convolution of 1024 "
        f"channels at 14×14, batch 8, channels-last, at {res['onednn_gflops']}). "
        f"{run_facts(res)}",
        "",
    ]
    lines += against_table(
        "case | layout | batch | dense ms | " + " | ".join(v.replace("_", " ") for v in VARIANTS),
        res["rows"],
        lambda r: [r["case"], r["layout"], r["batch"]],
        VARIANTS,
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run_model_benchmark(
        "blas_rule",
        "The rule for a BLAS behind oneDNN, for one the kernel outruns, and for one that keeps up.",
        CASES,
        lambda args: {"rows": case_rows(args)},
        markdown,
        argv,
        lambda: {
            "blas_behind_onednn": _paths._BLAS_BEHIND_ONEDNN,
            "kernel_outruns_blas": _paths._KERNEL_OUTRUNS_BLAS,
            "mkl": torch.backends.mkl.is_available(),
            **rates(),
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
