"""Training steps on the rule's paths: the training rule against the inference rule.

The static rule's choices of tieify's kernel are timed on forwards; a forward that trains
(the layer in training mode, autograd recording it: ``tieify.nn._paths._trains``) leaves
the kernel, whose backward is the fold's convolution backward on a copy of the input laid
out for it. This times both rules under training:

- whole models, one training step each (forward, cross-entropy, backward, in training
  mode): ResNet-50 with all bottleneck convs at B = 4 and with its 3×3 convs at B = 2
  (224×224, batch 8 by default), NCHW and channels-last, and the default search's model
  (``cifar_resnet`` depth 8, width 16, one input channel, at B = 2 and 4, on the digits'
  8×8 images at the search's batch of 64), each in two copies, one stepped under the
  training rule and one under the inference rule (``_TRAINING_RULE`` off during
  its steps), in interleaved rounds (medians of per-round ratios);
- with ``--layers`` also single layers, forward and backward, on every path that applies:
  ResNet-50's pointwise, 3×3 and strided 3×3 shapes at batch 8, and layers of 16-128
  channels at 8×8 at the search's batches, each with the path each rule takes.

Usage::

    python benchmarks/training.py             # ~2 minutes on 2 cores
    python benchmarks/training.py --layers    # ~4 minutes
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import run_facts, run_model_benchmark, table, timing_facts  # noqa: E402
from models import CL, build_case  # noqa: E402

import tieify  # noqa: E402
from tieify.latency._timing import interleaved_samples  # noqa: E402
from tieify.nn import TiedConv2d, _paths  # noqa: E402
from tieify.search._cifar_resnet import cifar_resnet  # noqa: E402

CASES = ["resnet50_all_B4", "resnet50_3x3_B2", "cifar_resnet_B2", "cifar_resnet_B4"]
#: The default search's data and batch: the digits' 8×8 one-channel images, 64 a step.
DIGITS = {"batch": 64, "channels": 1, "size": 8, "classes": 10}
#: (C_in, C_out, H, k, stride, B, batch) of the single layers timed with --layers.
LAYERS = [
    (64, 256, 56, 1, 1, 4, 8),
    (256, 64, 56, 1, 1, 4, 8),
    (512, 128, 28, 1, 1, 4, 8),
    (1024, 256, 14, 1, 1, 4, 8),
    (2048, 512, 7, 1, 1, 4, 8),
    (256, 1024, 14, 1, 1, 4, 1),
    (512, 2048, 7, 1, 1, 4, 1),
    (64, 64, 56, 3, 1, 2, 8),
    (128, 128, 28, 3, 1, 2, 8),
    (256, 256, 14, 3, 1, 4, 8),
    (128, 128, 56, 3, 2, 4, 8),
    (256, 256, 28, 3, 2, 2, 8),
    (512, 512, 14, 3, 2, 4, 8),
    (128, 128, 56, 3, 2, 2, 8),
    (512, 512, 14, 3, 2, 8, 8),
    (32, 32, 112, 3, 2, 2, 8),
    (64, 64, 28, 5, 2, 4, 8),
    (32, 64, 8, 1, 1, 2, 128),
    (16, 32, 8, 1, 2, 4, 64),
    (32, 64, 4, 1, 2, 4, 64),
    (32, 32, 8, 3, 1, 2, 128),
    (64, 64, 8, 3, 1, 2, 128),
    (128, 128, 8, 3, 1, 4, 64),
]
LAYOUTS = ("nchw", "channels_last")


def as_inference_rule(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run with the rule as for inference: the kernel taken where it wins forward."""

    def run() -> None:
        with mock.patch.object(_paths, "_TRAINING_RULE", False):
            step()

    return run


def build(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """The tied model of a case in training mode, an input batch, labels and the batch."""
    torch.manual_seed(0)
    if case.startswith("cifar_resnet"):
        dense = cifar_resnet(depth=8, width=16, num_classes=10, in_channels=DIGITS["channels"])
        tied = tieify.tieify(dense, B=int(case.rsplit("B", 1)[1]))
        n, c, s = DIGITS["batch"], DIGITS["channels"], DIGITS["size"]
        return tied.train(), torch.randn(n, c, s, s), torch.randint(0, 10, (n,)), n
    _, tied = build_case(case)
    return tied.train(), torch.randn(1, 3, 224, 224), torch.randint(0, 1000, (1,)), 0


def model_rows(args) -> list[dict]:
    rows = []
    loss = nn.CrossEntropyLoss()
    for case in args.cases:
        tied, x1, y1, fixed = build(case)
        for batch in [fixed] if fixed else args.batches:
            x = x1 if fixed else torch.randn(batch, *x1.shape[1:])
            y = y1 if fixed else torch.randint(0, 1000, (batch,))
            for layout in LAYOUTS:
                fmt = CL if layout == "channels_last" else torch.contiguous_format
                models = {
                    "training": copy.deepcopy(tied).to(memory_format=fmt),
                    "inference": copy.deepcopy(tied).to(memory_format=fmt),
                }
                xl = x.contiguous(memory_format=fmt)

                def step(m: nn.Module, xl: torch.Tensor = xl, y: torch.Tensor = y) -> None:
                    m.zero_grad(set_to_none=True)
                    loss(m(xl), y).backward()

                fns = {
                    "training": lambda m=models["training"]: step(m),
                    "inference": as_inference_rule(lambda m=models["inference"]: step(m)),
                }
                samples = interleaved_samples(fns, repeats=args.rounds, target_s=args.target_s)
                ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
                ratio = statistics.median(
                    a / b for a, b in zip(samples["inference"], samples["training"], strict=True)
                )
                row = {
                    "case": case,
                    "layout": layout,
                    "batch": batch,
                    "training_ms": ms["training"],
                    "inference_ms": ms["inference"],
                    "inference_over_training": ratio,
                }
                rows.append(row)
                print(row, flush=True)
    return rows


def layer_rows(args) -> list[dict]:
    rows = []
    for ci, co, h, k, stride, B, batch in LAYERS:
        for layout in LAYOUTS:
            fmt = CL if layout == "channels_last" else torch.contiguous_format
            layer = TiedConv2d(ci, co, k, stride=stride, padding=k // 2, B=B).train()
            x = torch.randn(batch, ci, h, h).contiguous(memory_format=fmt).requires_grad_()
            paths = [p for p in _paths.applicable_paths(layer, x) if p != "expanded"]

            def step(path: str, layer: TiedConv2d = layer, x: torch.Tensor = x) -> None:
                y = _paths.run_path(layer, x, path)
                y.backward(torch.ones_like(y))

            fns = {p: (lambda p=p: step(p)) for p in paths}
            samples = interleaved_samples(fns, repeats=args.rounds, target_s=0.02)
            ms = {p: statistics.median(v) * 1e3 for p, v in samples.items()}
            training = _paths.default_path(layer, x)
            with mock.patch.object(_paths, "_TRAINING_RULE", False):
                inference = _paths.default_path(layer, x)
            row = {
                "C_in": ci,
                "C_out": co,
                "H": h,
                "k": k,
                "stride": stride,
                "B": B,
                "batch": batch,
                "layout": layout,
                "ms": ms,
                "fastest": min(ms, key=ms.__getitem__),
                "training_rule": training,
                "inference_rule": inference,
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def measure(args) -> dict:
    res = {"rows": model_rows(args)}
    if args.layers:
        res["layers"] = layer_rows(args)
    return res


def markdown(res: dict) -> str:
    lines = [
        "# Training steps: the training rule against the inference rule",
        "",
        "One training step (forward, cross-entropy, backward; training mode) of each tied "
        "model, in two copies: one under the rule for training (tieify's kernel left to "
        "fused layers), one under the rule for inference (the kernel where it wins forward). "
        f"{timing_facts(res)} {run_facts(res)}",
        "",
    ]
    lines += table(
        "case | layout | batch | training rule ms | inference rule ms | inference / training",
        "llrrrr",
        (
            [
                r["case"],
                r["layout"],
                r["batch"],
                f"{r['training_ms']:.1f}",
                f"{r['inference_ms']:.1f}",
                f"{r['inference_over_training']:.3f}",
            ]
            for r in res["rows"]
        ),
    )
    if "layers" in res:
        paths = sorted({p for r in res["layers"] for p in r["ms"]}, key=_paths.PATHS.index)
        lines += [
            "",
            "Single layers, forward and backward (the output's gradient all ones), each "
            "applicable path; the path each rule takes, and the rule's time over the "
            "fastest path's.",
            "",
        ]
        lines += table(
            ["layout", "C_in", "C_out", "H", "k", "stride", "B", "batch"]
            + [f"{p} ms" for p in paths]
            + ["fastest", "training rule", "/ fastest", "inference rule", "/ fastest"],
            "l" + "r" * (7 + len(paths)) + "lllll",
            (
                [r["layout"], r["C_in"], r["C_out"], r["H"], r["k"], r["stride"], r["B"]]
                + [r["batch"]]
                + [f"{r['ms'][p]:.2f}" if p in r["ms"] else "–" for p in paths]
                + [r["fastest"], r["training_rule"]]
                + [f"{r['ms'][r['training_rule']] / r['ms'][r['fastest']]:.2f}"]
                + [r["inference_rule"]]
                + [f"{r['ms'][r['inference_rule']] / r['ms'][r['fastest']]:.2f}"]
                for r in res["layers"]
            ),
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    def options(p) -> None:
        p.add_argument(
            "--layers", action="store_true", help="also single layers, every path (~2 min)"
        )
        p.set_defaults(batches=[8], rounds=7, target_s=0.3)

    return run_model_benchmark(
        "training",
        "Training steps: the training rule against the inference rule.",
        CASES,
        measure,
        markdown,
        argv,
        options=options,
    )


if __name__ == "__main__":
    raise SystemExit(main())
