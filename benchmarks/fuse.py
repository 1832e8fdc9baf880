"""What ``tieify.fuse`` saves: tied layers and models, plain and fused, side by side.

- Layers: a tied conv on a channels-last input (ResNet-50's 1×1 shapes and its two largest
  3×3 ones at B = 4, batch 8) followed by its batch norm, a residual add (the 1×1 ones) and a
  ReLU, run as separate modules (the conv on its unfused path: the kernel for 1×1, widen for
  3×3) and as one fused call (``tieify.nn._fused.conv_bn_act``); the conv alone for scale.
- Models: the channels-last tied model after ``tieify.optimize``, the same model after
  ``tieify.fuse(model, x, dense=False)`` (the tied chains only) and after ``tieify.fuse(model,
  x)`` (the dense convs' batch norms folded too), in interleaved rounds (medians of per-round
  ratios).

Usage::

    python benchmarks/fuse.py                      # ~3 minutes here
    python benchmarks/fuse.py --max-bank 32768     # also against fuse timing k×k banks up to it
    python benchmarks/fuse.py --cases resnet50_all_B4 --batches 8
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import run_facts, run_model_benchmark, table, timing_facts  # noqa: E402
from models import CL, build_case, median_ratio, time_models, time_pair  # noqa: E402

import tieify  # noqa: E402
import tieify._fuse  # noqa: E402  (FUSED_MAX_BANK)
from tieify.nn import TiedConv2d, _fused  # noqa: E402

#: (C_in, C_out, size, kernel): the 1×1 layers with a residual add, the 3×3 ones without (as
#: in a bottleneck).
LAYERS = [
    (64, 256, 56, 1),
    (256, 64, 56, 1),
    (128, 512, 28, 1),
    (512, 128, 28, 1),
    (256, 1024, 14, 1),
    (64, 64, 56, 3),
    (128, 128, 28, 3),
]
CASES = ["resnet50_all_B4", "resnet50_3x3_B2", "resnext50_B2", "mobilenet_v3_large_B2"]


def _separate(conv: nn.Module, bn: nn.Module, x: torch.Tensor, res: torch.Tensor | None):
    y = bn(conv(x))
    return torch.relu_(y if res is None else y + res)


def layer_rows(args) -> list[dict]:
    rows = []
    for cin, cout, size, k in LAYERS:
        torch.manual_seed(0)
        conv = TiedConv2d(cin, cout, k, padding=k // 2, B=4, bias=False).eval()
        if k == 1:  # as the rule takes it on these inputs; k×k ones run widen unfused
            conv.path = "kernel"
        bn = nn.BatchNorm2d(cout).eval()
        x = torch.randn(8, cin, size, size).contiguous(memory_format=CL)
        res = torch.randn(8, cout, size, size).contiguous(memory_format=CL) if k == 1 else None
        fns = {
            "conv": lambda c=conv, x=x: c(x),
            "separate": lambda c=conv, b=bn, x=x, r=res: _separate(c, b, x, r),
            "fused": lambda c=conv, b=bn, x=x, r=res: _fused.conv_bn_act(x, c, b, r, True),
        }
        with torch.inference_mode():
            samples = time_pair(fns, args.rounds, args.target_s)
        ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        ratio = median_ratio(samples, "fused", "separate")
        name = f"{cin}→{cout} {k}×{k} {size}×{size}" + (" + add" if res is not None else "")
        rows.append({"layer": name, **ms, "fused_over_separate": ratio})
        print(rows[-1], flush=True)
    return rows


def model_rows(args) -> list[dict]:
    rows = []
    for case in args.cases:
        _, tied = build_case(case)
        tied = tied.to(memory_format=CL)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=CL)
            plain = copy.deepcopy(tied)
            with torch.inference_mode():
                tieify.optimize(plain, x)
            fused = tieify.fuse(plain, x)
            tied_only = tieify.fuse(plain, x, dense=False)
            models = {"plain": plain, "tied_only": tied_only, "fused": fused}
            if args.max_bank is not None:
                models["limited"] = _fused_with_max_bank(plain, x, args.max_bank)
            with torch.inference_mode():
                samples = time_models(models, x, args.rounds, args.target_s)

            rows.append(
                {
                    "case": case,
                    "batch": batch,
                    "chains": len(getattr(fused, "fused", {})),
                    "tied_chains": len(getattr(tied_only, "fused", {})),
                    "plain_ms": statistics.median(samples["plain"]) * 1e3,
                    "tied_only_ms": statistics.median(samples["tied_only"]) * 1e3,
                    "fused_ms": statistics.median(samples["fused"]) * 1e3,
                    "tied_only_over_plain": median_ratio(samples, "tied_only", "plain"),
                    "fused_over_plain": median_ratio(samples, "fused", "plain"),
                }
            )
            if args.max_bank is not None:
                rows[-1]["limited_chains"] = len(getattr(models["limited"], "fused", {}))
                rows[-1]["fused_over_limited"] = median_ratio(samples, "fused", "limited")
            print(rows[-1], flush=True)
    return rows


def _fused_with_max_bank(model: nn.Module, x: torch.Tensor, max_bank: int) -> nn.Module:
    """``tieify.fuse(model, x)`` timing k×k chains of at most ``max_bank`` bank entries."""
    with mock.patch.object(tieify._fuse, "FUSED_MAX_BANK", max_bank):
        return tieify.fuse(model, x)


def markdown(res: dict) -> str:
    lines = [
        "# tieify.fuse: plain against fused",
        "",
        f"Times are medians. {timing_facts(res)} {run_facts(res)}",
        "",
        "Layers (batch 8, channels-last, B = 4): the tied conv alone (1×1: tieify's kernel; 3×3: "
        "the rule's path, widen), with its batch norm, residual add (where named) and ReLU as "
        "separate modules, and fused (tieify's kernel with the epilogue).",
        "",
    ]
    lines += table(
        "layer | conv ms | separate ms | fused ms | fused / separate",
        "lrrrr",
        (
            [r["layer"]]
            + [f"{r[k]:.2f}" for k in ("conv", "separate", "fused")]
            + [f"{r['fused_over_separate']:.3f}"]
            for r in res["layers"]
        ),
    )
    lines += [
        "",
        f"Models ({res['size']}×{res['size']}, channels-last, after `tieify.optimize`): the "
        "tied model, the same after `tieify.fuse(model, x, dense=False)` (tied chains only) "
        "and after `tieify.fuse(model, x)` (the dense convs' batch norms folded too).",
        "",
    ]
    lines += table(
        "case | batch | chains (tied only) | plain ms | tied only ms | fused ms | "
        "tied only / plain | fused / plain",
        "lrrrrrrr",
        (
            [r["case"], r["batch"], f"{r['chains']} ({r['tied_chains']})"]
            + [f"{r[k]:.1f}" for k in ("plain_ms", "tied_only_ms", "fused_ms")]
            + [f"{r['tied_only_over_plain']:.3f}", f"{r['fused_over_plain']:.3f}"]
            for r in res["models"]
        ),
    )
    limited = [r for r in res["models"] if "fused_over_limited" in r]
    if limited:
        lines += [
            "",
            f"With `--max-bank {res['max_bank']}`: `tieify.fuse` timing only the k×k chains of "
            f"at most {res['max_bank']} bank entries, against this machine's limit "
            f"({res['fused_max_bank']}).",
            "",
        ]
        lines += table(
            "case | batch | chains (limited) | fused / limited",
            "lrrr",
            (
                [r["case"], r["batch"], f"{r['chains']} ({r['limited_chains']})"]
                + [f"{r['fused_over_limited']:.3f}"]
                for r in limited
            ),
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run_model_benchmark(
        "fuse",
        "tieify.fuse: plain against fused.",
        CASES,
        lambda args: {
            "max_bank": args.max_bank,
            "layers": layer_rows(args),
            "models": model_rows(args),
        },
        markdown,
        argv,
        lambda: {"fused_max_bank": tieify._fuse.FUSED_MAX_BANK},
        lambda p: p.add_argument(
            "--max-bank",
            type=int,
            default=None,
            help="also time each model fused with tieify.fuse timing only k×k chains of at "
            "most this many bank entries (tieify._fuse.FUSED_MAX_BANK)",
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
