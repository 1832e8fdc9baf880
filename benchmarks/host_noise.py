"""How far this machine's speed moves: one model timed call after call, read in windows.

A latency is only as reproducible as the machine under it. This script runs a torchvision
model (ResNet-50 at 96×96, batch 1, 2 threads by default) call after call for ``--seconds``
and cuts the calls into consecutive windows of 5 s to 2 minutes (a length is reported where
the run holds two complete windows of it: 2 minutes needs more than the default 240 s); per
window length it reports how far three readings of a window move between windows: the
median call, the 10th percentile and the fastest call (min–max over the windows and their
coefficient of variation). On a machine of its own every reading is flat; on a shared one the median
follows the other tenants' load and the fastest call is what reproduces, which is why
``tieify.predict_latency`` predicts, and ``tieify.latency.measure_latency`` returns, the
fastest round.

Usage::

    python benchmarks/host_noise.py                   # 4 minutes
    python benchmarks/host_noise.py --seconds 360 --model mobilenet_v3_large
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _allocator_flag  # noqa: E402
from _results import run_facts, table, write_results  # noqa: E402

from tieify.latency._machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WINDOWS = (5, 10, 20, 40, 60, 120)


def trace(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> list[tuple[float, float]]:
    """(start, seconds) of every call of ``model(x)`` for ``seconds`` (after 5 warm-up calls)."""
    calls = []
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        end = time.perf_counter() + seconds
        while (start := time.perf_counter()) < end:
            model(x)
            calls.append((start, time.perf_counter() - start))
    return calls


def windows(calls: list[tuple[float, float]], length: float) -> list[list[float]]:
    """The calls' times cut into consecutive windows of ``length`` seconds (the last, partial
    window dropped)."""
    t0 = calls[0][0]
    out: list[list[float]] = []
    for start, seconds in calls:
        index = int((start - t0) // length)
        if index >= len(out):
            out.extend([] for _ in range(index + 1 - len(out)))
        out[index].append(seconds)
    complete = int((calls[-1][0] - t0) // length)
    return [w for w in out[:complete] if len(w) >= 2]


def summarize(calls: list[tuple[float, float]], lengths=WINDOWS) -> list[dict]:
    """Per window length: each reading's spread (ms) over the windows."""
    rows = []
    readings = {
        "median": statistics.median,
        "p10": lambda v: statistics.quantiles(v, n=10)[0],
        "fastest": min,
    }
    for length in lengths:
        ws = windows(calls, length)
        if len(ws) < 2:
            continue
        row: dict = {"window_s": length, "windows": len(ws)}
        for name, read in readings.items():
            values = [read(w) * 1e3 for w in ws]
            row[name] = {
                "min": min(values),
                "max": max(values),
                "cv": statistics.pstdev(values) / statistics.mean(values),
            }
        rows.append(row)
    return rows


def markdown(res: dict) -> str:
    lines = [
        "# Host noise: one model timed call after call",
        "",
        f"{res['model']} at {res['size']}×{res['size']}, batch 1, {res['threads']} threads, "
        f"{res['calls']} calls over {res['seconds']:g} s ({res['start']}), torch {res['torch']}, "
        f"{res['machine']}. {run_facts(res)} All calls: median {res['median_ms']:.2f} ms, fastest "
        f"{res['fastest_ms']:.2f} ms.",
        "",
        "Per window length, each reading of a window (its median call, 10th percentile, "
        "fastest call) over all windows: lowest–highest ms (coefficient of variation).",
        "",
    ]
    lines += table(
        "window | windows | median call | 10th percentile | fastest call",
        "rrrrr",
        (
            [f"{r['window_s']} s", r["windows"]]
            + [
                f"{r[k]['min']:.2f}–{r[k]['max']:.2f} ({r[k]['cv'] * 100:.1f}%)"
                for k in ("median", "p10", "fastest")
            ]
            for r in res["rows"]
        ),
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torchvision.models as tvm

    p = argparse.ArgumentParser(description="How far this machine's speed moves.")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    _allocator_flag.add_flag(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = _allocator_flag.apply(args)
    torch.manual_seed(0)
    model = getattr(tvm, args.model)().eval()
    x = torch.randn(1, 3, args.size, args.size)
    load_start = os.getloadavg()
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    calls = trace(model, x, args.seconds)
    times = [s for _, s in calls]
    res = {
        "benchmark": "host_noise",
        "model": args.model,
        "size": args.size,
        "threads": args.threads,
        "seconds": args.seconds,
        "start": start,
        "calls": len(calls),
        "median_ms": statistics.median(times) * 1e3,
        "fastest_ms": min(times) * 1e3,
        "torch": torch.__version__,
        "machine": describe_machine(),
        "allocator": allocator,
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "rows": summarize(calls),
    }
    write_results(args.out, "host_noise", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
