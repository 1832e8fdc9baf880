"""``tieify search [RECIPE]``: search per-layer / per-stage B under budgets (see tieify.search)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  tieify search                                  # the embedded default (ResNet-8 on digits)
  tieify search --trials 40 --max-accuracy-drop 0.02 --out runs/strict
  tieify search recipes/resnet18-cifar10.yaml --space per_layer --latency measured
  tieify search --out runs/default --resume      # continue a killed search
  tieify search RECIPE --backend ray --ray-address auto --max-concurrent 4
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tieify search``."""
    p = subparsers.add_parser(
        "search",
        help="search per-stage / per-layer B under accuracy, latency and size budgets",
        description=(
            "Search tied-block plans (B per layer, stage or model) with Optuna: each candidate\n"
            "is the dense model rewritten, fine-tuned briefly, measured (accuracy, latency,\n"
            "params, MACs) and checked against the budgets. Writes pareto.json, trials.csv,\n"
            "pareto.png, report.md, best_plan.json and front/N/ to --out."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "recipe",
        nargs="?",
        default=None,
        metavar="RECIPE",
        help="recipe YAML file or built-in name (default: 'default', ResNet-8 on digits)",
    )
    g = p.add_argument_group("search")
    g.add_argument("--space", help="uniform, per_stage, per_layer, roots, a YAML file or module:fn")
    g.add_argument("--trials", type=int, help="number of trials in the study (default: recipe)")
    g.add_argument(
        "--timeout",
        type=float,
        help="seconds for the trials of this run (no new trial starts after)",
    )
    g.add_argument("--out", help="output folder (default: runs/<recipe name>)")
    g.add_argument(
        "--storage", help="Optuna storage URL or journal path (default: OUT/study.journal)"
    )
    g.add_argument("--resume", action="store_true", help="continue the study in the store")
    g.add_argument("--seed", type=int, help="sampler seed (default: recipe)")
    g.add_argument("--study-name", help="study name in the store (default: tieify-<recipe>)")
    g.add_argument(
        "--latency",
        choices=("auto", "predicted", "measured"),
        help="latency from the model (a per-layer table cached on this machine) or measured; "
        "auto (the recipes' default): predicted when the table is already warm for the dense "
        "model, else measured. Either way timed after tieify.tune_allocator() unless the "
        "recipe sets latency.allocator: system, and after tieify.optimize of each candidate "
        "where it sets latency.optimize: true",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    m = p.add_argument_group("model and budgets (override the recipe)")
    m.add_argument(
        "--model", help="MODEL string (torchvision name, timm:NAME, module:fn, file.py:fn)"
    )
    m.add_argument("--epochs", type=int, help="fine-tuning epochs per candidate")
    m.add_argument("--min-accuracy", type=float, help="minimum top-1 accuracy (fraction)")
    m.add_argument(
        "--max-accuracy-drop", type=float, help="max drop against the dense model (fraction)"
    )
    m.add_argument("--max-latency-ms", type=float, help="max latency in milliseconds")
    m.add_argument(
        "--max-latency-ratio",
        type=float,
        help="max latency over the dense model's (0.5: half its time); measured side by side "
        "with it in interleaved rounds, so a shared machine's drift over a long search "
        "moves both alike",
    )
    m.add_argument("--max-params", type=int, help="max parameters")
    m.add_argument("--max-macs", type=int, help="max multiply-adds per sample")
    r = p.add_argument_group("Ray backend")
    r.add_argument("--backend", choices=("optuna", "ray"), default="optuna")
    r.add_argument("--ray-address", help="join a Ray cluster ('auto' or host:port)")
    r.add_argument("--cpus-per-trial", type=float, default=1)
    r.add_argument("--gpus-per-trial", type=float, default=0)
    r.add_argument("--max-concurrent", type=int)
    r.add_argument("--max-failures", type=int, default=2, help="retries of a dead trial")
    p.set_defaults(func=run)
    return p  # type: ignore[no-any-return]


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe overrides from the flags that were given."""
    out: dict[str, Any] = {
        "search.space": args.space,
        "latency.mode": args.latency,
        "model.name": args.model,
        "train.epochs": args.epochs,
        "budgets.min_accuracy": args.min_accuracy,
        "budgets.max_accuracy_drop": args.max_accuracy_drop,
        "budgets.max_latency_ms": args.max_latency_ms,
        "budgets.max_latency_ratio": args.max_latency_ratio,
        "budgets.max_params": args.max_params,
        "budgets.max_macs": args.max_macs,
    }
    if args.model is not None:
        out["model.kwargs"] = {}
    return {k: v for k, v in out.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    """Handler of ``tieify search``."""
    import optuna

    from ..search import search

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tieify prints its own lines
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if not args.quiet:
        logging.getLogger("tieify.search").setLevel(logging.INFO)
    search(
        args.recipe,
        backend=args.backend,
        out_dir=args.out,
        trials=args.trials,
        timeout=args.timeout,
        storage=args.storage,
        resume=args.resume,
        seed=args.seed,
        ray_address=args.ray_address,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
        max_failures=args.max_failures,
        study_name=args.study_name,
        overrides=overrides(args),
        progress=not args.quiet,
    )
    return 0
