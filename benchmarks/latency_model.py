"""Accuracy of ``tieify.predict_latency`` against measured latency on random plans.

For each model (ResNet-50 and MobileNetV3-Large by default) draw random plans (every
eligible conv: B ∈ {1, 2, 4}, drawn per layer; depthwise convs, the stem and the head stay
dense), build the tied models, predict each one's latency from the lookup table (filled
lazily; the first plans pay for the new layer configurations) and measure it (interleaved
rounds over all the plans of a model; each plan's fastest sample, the figure
``predict_latency`` predicts and ``measure_latency`` returns). Reports the median absolute
percentage error (MdAPE), the worst error, the error against each plan's median sample, and
how many table entries had to be measured.

The "in-round calibration" error applies the same predictions rescaled by the dense model's
measured / predicted time in the plans' rounds: the table's own error, without the host's
drift between the one-off calibration and the measurement. The "measured twice" error is the
ground truth against itself (the fastest sample of the first half of each plan's rounds
against that of the second half): how far the ground truth moves on its own within one run. The
"stubbed calibration" error applies the same table with the one-point remainder tieify used
before the two-point calibration (the dense model, and the dense model with its layers
stubbed out), judged on the same measurements.

Usage::

    python benchmarks/latency_model.py              # 2 × 20 plans at 96×96, ~4 minutes
    python benchmarks/latency_model.py --repeat 3   # three runs, each from an empty table
    python benchmarks/latency_model.py --quick      # 2 × 10 plans at 64×64
    python benchmarks/latency_model.py --threads 1  # written as latency_model_threads1.*
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _allocator_flag  # noqa: E402
from _results import run_facts, table, write_results  # noqa: E402
from models import divisible, is_depthwise, tie_convs  # noqa: E402

from tieify.latency import (  # noqa: E402
    LatencyTable,
    _predict,
    cache_dir,
    predict_latency,
)
from tieify.latency._machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_THREADS = 2


def random_plan_model(dense, rng: random.Random, stem: str, head: str):
    choices: dict[str, int] = {}

    def choose(name, conv):
        if name.startswith((stem, head)) or is_depthwise(conv) or conv.in_channels < 8:
            return None
        b = rng.choice([1, 2, 4])
        while b > 1 and not divisible(conv, b):
            b //= 2
        choices[name] = b
        return b

    return tie_convs(dense, choose), choices


MODELS = {
    "resnet50": ("conv1", "fc"),
    "mobilenet_v3_large": ("features.0.", "features.16."),
}


def run_model(name: str, args, table: LatencyTable) -> list[dict]:
    import torchvision.models as tvm

    torch.manual_seed(0)
    dense = getattr(tvm, name)().eval()
    stem, head = MODELS[name]
    rng = random.Random(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # Warm-up: the dense model fills its layers' entries and calibrates the shared remainder
    # (so no evaluated plan is its own calibration).
    base = dense.to(memory_format=torch.channels_last) if args.channels_last else dense
    before = table.measured
    base_pred = predict_latency(base, x, table=table)
    print(f"{name}: dense model measured {table.measured - before} entries", flush=True)
    remainder, stubbed = stubbed_remainder(base, x, base_pred, table)
    plans = [
        {
            "model": name,
            "plan": "dense",
            "predicted_ms": base_pred * 1e3,
            "mean_B": 1.0,
            "new_entries": table.measured - before,
            "predict_s": 0.0,
            "_module": base,
        }
    ]
    for i in range(args.plans):
        tied, choices = random_plan_model(dense, rng, stem, head)
        tied.eval()
        if args.channels_last:
            tied = tied.to(memory_format=torch.channels_last)
        before, t0 = table.measured, time.time()
        predicted = predict_latency(tied, x, table=table)
        plans.append(
            {
                "model": name,
                "plan": i,
                "predicted_ms": predicted * 1e3,
                "mean_B": statistics.mean(choices.values()),
                "new_entries": table.measured - before,
                "predict_s": time.time() - t0,
                "_module": tied,
            }
        )
        print(
            f"{name} plan {i}: predicted {predicted * 1e3:.2f} ms "
            f"({plans[-1]['new_entries']} new entries)",
            flush=True,
        )
    # Ground truth: measure_latency's samples (what `--latency measured` reads), one plan after
    # the other, repeated in rounds over all plans (ABAB) so that load changes hit every plan,
    # for at least --rounds rounds spanning at least --seconds: the host's slow phases last
    # tens of seconds, and a plan's fastest sample is its own time only where its rounds
    # reach a phase the machine is not slowed in.
    samples: dict[object, list[list[float]]] = {p["plan"]: [] for p in plans}
    start = time.perf_counter()
    while len(samples["dense"]) < args.rounds or time.perf_counter() - start < args.seconds:
        for p in plans:
            timed = _predict.measure_side_by_side({"m": p["_module"]}, x, repeats=SAMPLES_PER_ROUND)
            samples[p["plan"]].append(timed["m"])
    for p in plans:
        del p["_module"]
    return score_plans(plans, samples, remainder, stubbed)


#: Samples of each plan per round (each about 20 ms of back-to-back calls).
SAMPLES_PER_ROUND = 3


def score_plans(
    plans: list[dict], samples: dict[object, list[list[float]]], remainder: dict, stubbed: dict
) -> list[dict]:
    """Each plan's errors from its measured ``samples`` (seconds; a list per round, rounds in
    time order) and its ``predicted_ms``; ``plans[0]`` is the dense model. ``remainder`` is
    the calibrated (two-point) remainder the predictions used, ``stubbed`` the one-point one.

    The measured latency is the fastest sample (what tieify predicts and
    ``measure_latency`` returns); the median sample is scored too (``ape_median``)."""
    for p in plans:
        rounds = samples[p["plan"]]
        flat = [v for r in rounds for v in r]
        p["rounds"] = len(rounds)
        p["measured_ms"] = min(flat) * 1e3
        p["measured_median_ms"] = statistics.median(flat) * 1e3
        # How much the ground truth itself moves between rounds (its noise).
        per_round = [statistics.median(r) for r in rounds]
        p["spread"] = (max(per_round) - min(per_round)) / statistics.median(per_round)
        p["ape"] = abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"]
        p["ape_median"] = abs(p["predicted_ms"] - p["measured_median_ms"]) / p["measured_median_ms"]
    # The same predictions rescaled by the dense model's measured / predicted time in these
    # rounds, instead of calibrated once before them: what the error is without the host's
    # drift between the calibration and the ground truth (the layer table's own error). A
    # host that slows down slows every plan alike, so the rescaling is a factor.
    dense_row = plans[0]
    drift = dense_row["measured_ms"] / dense_row["predicted_ms"]
    for p in plans:
        in_rounds = p["predicted_ms"] * drift
        p["ape_in_rounds"] = abs(in_rounds - p["measured_ms"]) / p["measured_ms"]
        # The ground truth against itself: the fastest sample of the first half of the rounds
        # against that of the second half (the same plan, measured twice, about half a run
        # apart).
        first, second = split_halves(samples[p["plan"]])
        p["ape_self"] = abs(first - second) / second
        # The same plan's Σ table entries under the stubbed one-point remainder.
        entries = (p["predicted_ms"] / 1e3 - remainder["nonlayer"]) / remainder["scale"]
        p["predicted_stubbed_ms"] = (stubbed["nonlayer"] + stubbed["scale"] * entries) * 1e3
        p["ape_stubbed"] = abs(p["predicted_stubbed_ms"] - p["measured_ms"]) / p["measured_ms"]
    return plans


def split_halves(rounds: list[list[float]]) -> tuple[float, float]:
    """The fastest sample of the first and of the second half of ``rounds`` (in time order)."""
    half = len(rounds) // 2
    return min(min(r) for r in rounds[:half]), min(min(r) for r in rounds[half:])


def stubbed_remainder(base, x, base_pred: float, table: LatencyTable) -> tuple[dict, dict]:
    """The cached (two-point) remainder of ``base``, and the stubbed one-point remainder on
    the same dense time: the line through (Σ entries, ``base_pred``) and (0, the model's time
    with its layers stubbed out)."""
    layers, _, outs = _predict._traced_layers(base, x)
    key = _predict._remainder_key(base, outs, x, torch.get_num_threads())
    remainder = table.get_value(key)
    entries = (base_pred - remainder["nonlayer"]) / remainder["scale"]
    nonlayer = _predict._stubbed_total(base, x, layers, outs, repeats=7)  # base is in eval
    return remainder, {"nonlayer": nonlayer, "scale": (base_pred - nonlayer) / entries}


def summarize(rows: list[dict], models: list[str]) -> dict:
    """MdAPE etc. over the non-dense rows, overall and per model."""
    plans = [r for r in rows if r["plan"] != "dense"]

    def stats(rs: list[dict]) -> dict:
        return {
            "mdape": statistics.median(r["ape"] for r in rs),
            "mdape_median": statistics.median(r["ape_median"] for r in rs),
            "mdape_in_rounds": statistics.median(r["ape_in_rounds"] for r in rs),
            "mdape_stubbed": statistics.median(r["ape_stubbed"] for r in rs),
            "mdape_self": statistics.median(r["ape_self"] for r in rs),
            "max_ape": max(r["ape"] for r in rs),
            "n": len(rs),
            "entries": sum(r["new_entries"] for r in rs),
        }

    out = stats(plans)
    out["spread"] = statistics.median(r["spread"] for r in rows)
    out["per_model"] = {m: stats([r for r in plans if r["model"] == m]) for m in models}
    return out


#: The error columns of the tables per repetition and per model, after their MdAPE.
MDAPE_COLUMNS = (
    "MdAPE (in-round calibration) | MdAPE (stubbed calibration) | MdAPE (against the median) "
    "| measured twice | max APE"
)


def percentages(errors: dict) -> list[str]:
    """The MdAPE and :data:`MDAPE_COLUMNS` of one repetition or model, as percentages."""
    keys = ("mdape", "mdape_in_rounds", "mdape_stubbed", "mdape_median", "mdape_self", "max_ape")
    return [f"{errors[k] * 100:.1f}%" for k in keys]


def markdown(res: dict) -> str:
    s = res["summary"]
    reps = res["repetitions"]
    lines = [
        "# Latency model accuracy (predicted vs measured)",
        "",
        f"{res['plans_per_model']} random plans per model, batch {res['batch']}, "
        f"{res['size']}×{res['size']}, {res['layout']}, {res['threads']} threads, torch "
        f"{res['torch']}, {res['machine']}. {res['note']} {run_facts(res)}",
        "",
        f"**Median absolute percentage error: {s['mdape'] * 100:.1f}%** over {s['n']} plans "
        f"({len(reps)} repetition(s); max {s['max_ape'] * 100:.1f}%) against the measured "
        "latency, each plan's fastest sample over all its rounds (what `predict_latency` "
        "predicts and `measure_latency` returns); "
        f"{s['mdape_in_rounds'] * 100:.1f}% with the predictions rescaled by the dense model's "
        "measured / predicted time in the same rounds as the plans (the table's own error, "
        "without the host's drift between calibration and measurement); "
        f"{s['mdape_stubbed'] * 100:.1f}% with the stubbed one-point calibration tieify used "
        "before (same table, same measurements); "
        f"{s['mdape_median'] * 100:.1f}% against each plan's median sample instead (the "
        "typical time under the load of the run, which the predictions do not aim at).",
        "",
        f"The measured latency itself moves by a median {s['spread'] * 100:.1f}% between "
        "rounds ((max − min) / median of the per-round medians over each plan's "
        f"{min(r['rounds'] for r in res['rows'])}–{max(r['rounds'] for r in res['rows'])} "
        f"rounds, at least {res['rounds']} spanning at least {res['ground_truth_seconds']:g} s "
        "per model): how noisy the host was at the time of the run. Measured twice "
        "(the fastest sample of the first half of each plan's rounds against that of the second "
        f"half), the ground truth differs from itself by a median {s['mdape_self'] * 100:.1f}%: "
        "how far it moves on its own within one run.",
        "",
        "The `dense` rows calibrated the remainder and are not counted in the error.",
        "",
    ]
    if len(reps) > 1:
        lines += [
            "Each repetition starts from an empty table (every entry and the remainder measured "
            "again), so the spread between repetitions is the host's, not the plans':",
            "",
        ]
        lines += table(
            "repetition | MdAPE | " + MDAPE_COLUMNS + " | load average at start",
            "r" * 7 + "l",
            ([i, *percentages(r), r["loadavg_start"]] for i, r in enumerate(reps)),
        )
        lines.append("")
    lines += table(
        "model | MdAPE | " + MDAPE_COLUMNS + " | table entries measured",
        "l" + "r" * 7,
        ([m, *percentages(v), v["entries"]] for m, v in s["per_model"].items()),
    )
    lines.append("")
    lines += table(
        "rep | model | plan | mean B | predicted ms | measured (fastest) ms | median ms | APE "
        "| stubbed calibration ms",
        "rlrrrrrrr",
        (
            [r["rep"], r["model"], r["plan"], f"{r['mean_B']:.2f}"]
            + [f"{r[k]:.2f}" for k in ("predicted_ms", "measured_ms", "measured_median_ms")]
            + [f"{r['ape'] * 100:.1f}%", f"{r['predicted_stubbed_ms']:.2f}"]
            for r in res["rows"]
        ),
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Latency model error on random plans.")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--plans", type=int, default=20)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--rounds", type=int, default=7, help="the least rounds over each model's plans")
    p.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="each model's rounds span at least this long (the ground truth)",
    )
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore the on-disk table")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole benchmark this many times, each from an empty table (implies "
        "--fresh when above 1); the error is reported over all runs and per run",
    )
    p.add_argument("--quick", action="store_true", help="10 plans per model at 64×64")
    p.add_argument("--out", type=Path, default=RESULTS)
    _allocator_flag.add_flag(p)
    args = p.parse_args(argv)
    if args.quick:
        args.plans, args.size, args.rounds, args.seconds = 10, 64, 3, 10.0
    torch.set_num_threads(args.threads)
    allocator = _allocator_flag.apply(args)
    load_start = os.getloadavg()
    start = time.time()
    rows: list[dict] = []
    reps = []
    for rep in range(args.repeat):
        table = LatencyTable(persist=not (args.fresh or args.repeat > 1))
        rep_load = [round(v, 2) for v in os.getloadavg()]
        mine = []
        for m in args.models:
            mine += [{"rep": rep, **r} for r in run_model(m, args, table)]
        reps.append({**summarize(mine, args.models), "loadavg_start": rep_load})
        rows += mine
    res = {
        "benchmark": "latency_model",
        "plans_per_model": args.plans,
        "rounds": args.rounds,
        "ground_truth_seconds": args.seconds,
        "batch": args.batch,
        "size": args.size,
        "threads": args.threads,
        "torch": torch.__version__,
        "layout": "channels_last" if args.channels_last else "contiguous",
        "machine": describe_machine(),
        "cache": "(in memory)" if args.fresh or args.repeat > 1 else str(cache_dir()),
        "note": "Measured = the fastest of each plan's samples over all rounds (rounds cycle "
        "through all plans of a model); the table entries were measured in the same session; "
        "the remainder was calibrated on the dense model and its variant with every eligible layer "
        "tied at B = 4, neither of which is among the plans.",
        "seconds": round(time.time() - start, 1),
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "allocator": allocator,
        "summary": summarize(rows, args.models),
        "repetitions": reps,
        "rows": rows,
    }
    suffix = "_quick" if args.quick else ""
    if args.threads != DEFAULT_THREADS:  # kept beside the default run, not over it
        suffix += f"_threads{args.threads}"
    write_results(args.out, f"latency_model{suffix}", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
