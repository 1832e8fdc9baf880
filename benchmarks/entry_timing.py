"""How the latency table's entries are timed: one by one, or together in spread rounds.

``tieify.predict_latency`` times the layer configurations a prediction is missing together
(``tieify.latency._table.time_modules``: interleaved rounds spread over at least
``ENTRY_SECONDS``). This benchmark judges that against timing each entry on its own, as
tieify did before (the same function, one module at a time, without the spread), on the
same random plans and the same ground truth, alternately first and second in each trial.

Per trial: a dense model and ``--plans`` random plans of it (as in ``latency_model.py``);
both ways predict every model from an empty table; then all models are measured in
interleaved rounds (each model's fastest, what ``predict_latency`` predicts). Reported per
way: the median absolute percentage error of the plans rescaled by the dense model's
measured / predicted time in the same rounds ("in-round": the table's own error, which is
what a latency ratio to the dense model depends on), and without the rescaling ("total":
mostly the host's drift between the one-off calibration and the measurement), and in how
many trials each way was the closer one.

Usage::

    python benchmarks/entry_timing.py                          # 12 trials of ResNet-50, ~6 min
    python benchmarks/entry_timing.py --model mobilenet_v3_large --trials 10
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

from _results import run_facts, table, write_results  # noqa: E402
from latency_model import MODELS, random_plan_model  # noqa: E402

from tieify.latency import LatencyTable, _table, measure_latency, predict_latency  # noqa: E402
from tieify.latency._machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WAYS = ("one_by_one", "together")


class OneByOneTable(LatencyTable):
    """A table that times each missing entry on its own, without the spread."""

    def _time(self, items, *, threads, repeats):
        seconds = {}
        for key, pair in items.items():
            single = {key: pair}
            seconds.update(
                _table.time_modules(single, threads=threads, repeats=repeats, min_seconds=0.0)
            )
        return seconds


def errors(predicted: list[float], measured: list[float]) -> dict[str, float]:
    """In-round and total MdAPE of ``predicted`` against ``measured`` (index 0: the dense
    model, not counted; it sets the in-round factor)."""
    factor = measured[0] / predicted[0]
    pairs = list(zip(predicted[1:], measured[1:], strict=True))
    return {
        "in_round": statistics.median(abs(p * factor - m) / m for p, m in pairs),
        "total": statistics.median(abs(p - m) / m for p, m in pairs),
        "dense_ratio": predicted[0] / measured[0],
    }


def trial(index: int, args) -> dict:
    import torchvision.models as tvm

    torch.manual_seed(0)
    dense = getattr(tvm, args.model)().eval()
    stem, head = MODELS[args.model]
    rng = random.Random(args.seed + index)
    models = [dense] + [
        random_plan_model(dense, rng, stem, head)[0].eval() for _ in range(args.plans)
    ]
    x = torch.randn(1, 3, args.size, args.size)
    order = WAYS if index % 2 == 0 else WAYS[::-1]
    predicted = {}
    for way in order:
        table = (OneByOneTable if way == "one_by_one" else LatencyTable)(persist=False)
        predicted[way] = [predict_latency(m, x, table=table) for m in models]
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(args.rounds):
        for i, m in enumerate(models):
            samples[i].append(measure_latency(m, x, repeats=3))
    measured = [min(s) for s in samples]  # the fastest round: what predict_latency predicts
    row = {"trial": index, "first": order[0], "time": time.strftime("%H:%M:%S")}
    for way in WAYS:
        row[way] = errors(predicted[way], measured)
    print(
        f"trial {index}: "
        + ", ".join(
            f"{w} in-round {row[w]['in_round'] * 100:.1f}% total {row[w]['total'] * 100:.1f}%"
            for w in WAYS
        ),
        flush=True,
    )
    return row


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for way in WAYS:
        out[way] = {m: statistics.median(r[way][m] for r in rows) for m in ("in_round", "total")}
    for m in ("in_round", "total"):
        out[f"together_closer_{m}"] = sum(r["together"][m] < r["one_by_one"][m] for r in rows)
    out["n"] = len(rows)
    return out


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = [
        "# Latency table entries: timed one by one or together",
        "",
        f"{res['model']}, {res['plans']} random plans a trial, batch 1, {res['size']}×"
        f"{res['size']}, {res['threads']} threads, torch {res['torch']}, {res['machine']}. "
        f"{run_facts(res)} The run took {res['seconds']:.0f} s.",
        "",
    ]

    def closer(way: str, measure: str) -> str:
        together = s[f"together_closer_{measure}"]
        return f"{together if way == 'together' else s['n'] - together} of {s['n']}"

    lines += table(
        "entries timed | in-round MdAPE (median over trials) | total MdAPE (median over "
        "trials) | trials closer in-round | trials closer in total",
        "lrrrr",
        (
            [way.replace("_", " ")]
            + [f"{s[way][m] * 100:.1f}%" for m in ("in_round", "total")]
            + [closer(way, m) for m in ("in_round", "total")]
            for way in WAYS
        ),
    )
    lines.append("")
    lines += table(
        "trial | first | one by one: in-round | total | dense predicted / measured "
        "| together: in-round | total | dense predicted / measured",
        "rl" + "r" * 6,
        (
            [r["trial"], r["first"].replace("_", " ")]
            + [
                cell
                for w in WAYS
                for cell in (
                    f"{r[w]['in_round'] * 100:.1f}%",
                    f"{r[w]['total'] * 100:.1f}%",
                    f"{r[w]['dense_ratio']:.2f}",
                )
            ]
            for r in res["rows"]
        ),
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Latency table entries: one by one or together.")
    p.add_argument("--model", default="resnet50", choices=list(MODELS))
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--plans", type=int, default=10)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = [round(v, 2) for v in os.getloadavg()]
    start = time.time()
    rows = [trial(i, args) for i in range(args.trials)]
    res = {
        "benchmark": "entry_timing",
        "model": args.model,
        "plans": args.plans,
        "size": args.size,
        "threads": args.threads,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "machine": describe_machine(),
        "seconds": round(time.time() - start, 1),
        "loadavg_start": load_start,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "entry_seconds": _table.ENTRY_SECONDS,
        "summary": summarize(rows),
        "rows": rows,
    }
    write_results(args.out, f"entry_timing_{args.model}", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
