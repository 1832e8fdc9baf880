"""Benchmark: the default ``tieify search`` (no arguments) end to end.

Runs ``tieify search`` in a fresh output folder exactly as a user would (a subprocess, so
import time, baseline training and result files are included), then records the wall time,
trials per minute, the state counts and the feasible Pareto front from ``pareto.json``.
Writes ``benchmarks/results/search.json`` and ``search.md``.

Target (issue 4): within 10 minutes on the 2-core development machine, with at least 3
feasible points on the front.

    python benchmarks/search.py                 # the default search
    python benchmarks/search.py --trials 8      # extra flags go to ``tieify search``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux/macOS
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default: a fresh temporary folder)")
    parser.add_argument("--name", default="search", help="results file stem")
    args, extra = parser.parse_known_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tieify-bench-")) / "run"
    cmd = [sys.executable, "-m", "tieify", "search", "--out", str(out), *extra]
    load_before = _load()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        return proc.returncode
    summary = json.loads((out / "pareto.json").read_text())
    states = summary["states"]
    result = {
        "command": "tieify search " + " ".join(["--out", str(out), *extra]),
        "wall_seconds": round(wall, 1),
        "trials": summary["trials"],
        "trials_per_minute": round(60 * summary["trials"] / wall, 2),
        "states": states,
        "feasible": summary["feasible"],
        "front_size": len(summary["front"]),
        "target_met": wall <= 600 and len(summary["front"]) >= 3,
        "budgets": summary["budgets"],
        "baseline": summary["baseline"],
        "front": [
            {
                k: p[k]
                for k in (
                    "trial",
                    "decisions",
                    "accuracy",
                    "accuracy_drop",
                    "latency_ms",
                    "latency_ratio",
                    "params",
                    "macs",
                )
            }
            for p in summary["front"]
        ],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": _load(),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r: dict) -> str:
    b = r["baseline"]
    lines = [
        "# Default `tieify search` benchmark",
        "",
        f"- command: `{r['command']}`",
        f"- wall time: **{r['wall_seconds']:.0f} s** ({r['wall_seconds'] / 60:.1f} min), "
        f"{r['trials']} trials, **{r['trials_per_minute']:.2f} trials/min** "
        "(dense baseline training, imports and result files included)",
        f"- states: {r['states']}; feasible: {r['feasible']}; front: {r['front_size']} points; "
        f"target (≤ 600 s, ≥ 3 front points) met: {r['target_met']}",
        f"- budgets: {r['budgets']}",
        f"- dense baseline: accuracy {100 * b['accuracy']:.2f}%, latency "
        f"{b['latency_ms']:.3f} ms, {b['params']} params, {b['macs']} MACs",
        f"- machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, torch "
        f"{r['machine']['torch']}, load average before/after "
        f"{r['machine']['load_average_before']} / {r['machine']['load_average_after']} "
        "(shared machine)",
        "",
        "| trial | decisions | accuracy | drop | latency ms | x dense | params | MACs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["front"]:
        dec = " ".join(f"{k.removeprefix('B_')}={v}" for k, v in p["decisions"].items())
        lines.append(
            f"| {p['trial']} | {dec} | {100 * p['accuracy']:.2f}% | "
            f"{100 * p['accuracy_drop']:+.2f} pt | {p['latency_ms']:.3f} | "
            f"{p['latency_ratio']:.3f} | {p['params']} | "
            f"{p['macs']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
