"""What glibc's default allocator costs CPU forward passes, and what ``tune_allocator`` saves.

Each workload runs in fresh child processes, alternately under the system allocator and after
``tieify.tune_allocator()`` (the setting is process-wide and one-way, so a child holds one
mode), for several rounds so that the host's load drift hits both modes alike. A child
reports, per workload, the median milliseconds per call and the minor page faults per call.

Workloads (channels-last, 2 threads, random weights, eval mode):

- ``conv1x1_b8`` / ``conv1x1_b16``: the 64→256 1×1 conv at 56×56, batch 8 and 16 (25.7 MB
  and 51.4 MB outputs), dense and tied at B = 4;
- ``resnet50_224_b8``: ResNet-50 at 224×224, batch 8 (its stem and first stage write
  25.7 MB tensors), dense and with every bottleneck conv at B = 4 (after
  ``tieify.optimize``); the tied/dense ratio is reported against its MAC ratio.

Usage::

    python benchmarks/allocator.py            # 3 rounds × 2 modes, ~5 minutes on 2 cores
    python benchmarks/allocator.py --quick    # 1 round, smaller samples
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("system", "tuned")
CL = torch.channels_last


def _workloads():
    """name -> (dense fn, tied fn, MAC ratio); built in the child."""
    from models import build_case, macs

    import tieify
    from tieify.nn import TiedConv2d

    out = {}
    for batch in (8, 16):
        x = torch.randn(batch, 64, 56, 56).contiguous(memory_format=CL)
        dense = torch.nn.Conv2d(64, 256, 1, bias=False).eval()
        tied = TiedConv2d.from_dense(dense, 4).eval()
        tieify.optimize(tied, x)
        out[f"conv1x1_b{batch}"] = (lambda m=dense, x=x: m(x), lambda m=tied, x=x: m(x), 0.25)
    dense, tied = build_case("resnet50_all_B4")
    x = torch.randn(8, 3, 224, 224).contiguous(memory_format=CL)
    dense = dense.eval().to(memory_format=CL)
    tied = tied.eval().to(memory_format=CL)
    ratio = macs(tied, x) / macs(dense, x)
    tieify.optimize(tied, x)
    out["resnet50_224_b8"] = (lambda: dense(x), lambda: tied(x), ratio)
    return out


def child(mode: str, samples: int, threads: int) -> dict:
    """Measure every workload in this process under ``mode``; returns a JSON-able dict."""
    from tieify.latency import allocator_state, tune_allocator
    from tieify.latency._allocator import minor_faults

    torch.set_num_threads(threads)
    if mode == "tuned":
        tune_allocator()
    res = {"allocator": str(allocator_state()), "workloads": {}}
    with torch.inference_mode():
        for name, (dense, tied, mac_ratio) in _workloads().items():
            row = {"mac_ratio": mac_ratio}
            for which, fn in (("dense", dense), ("tied", tied)):
                for _ in range(2):
                    fn()
                faults0 = minor_faults() or 0
                times = []
                for _ in range(samples):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                row[f"{which}_ms"] = statistics.median(times) * 1e3
                row[f"{which}_faults_per_call"] = ((minor_faults() or 0) - faults0) / samples
            res["workloads"][name] = row
    return res


def markdown(res: dict) -> str:
    lines = [
        "# Allocator: page faults in CPU forward passes",
        "",
        f"{res['rounds']} rounds; each round runs one child process per mode (system, then "
        f"tuned), {res['samples']} timed calls per workload, medians; {res['threads']} threads, "
        f"torch {res['torch']}, {res['machine']}. Load average at start "
        f"{res['load_start']}, at end {res['load_end']}. 'tuned' is "
        "`tieify.tune_allocator()` (glibc mallopt: freed blocks up to 1 GiB are kept for "
        "reuse). The tied/dense ratio is per round, then the median.",
        "",
        f"- system: {res['allocator']['system']}",
        f"- tuned: {res['allocator']['tuned']}",
        "",
    ]
    lines += table(
        "workload | mode | dense ms | tied ms | tied/dense | MAC ratio | dense faults/call "
        "| tied faults/call",
        "ll" + "r" * 6,
        (
            [name, mode]
            + [f"{s[k]:.2f}" for k in ("dense_ms", "tied_ms", "ratio", "mac_ratio")]
            + [f"{s[k]:.0f}" for k in ("dense_faults_per_call", "tied_faults_per_call")]
            for name, modes in res["summary"].items()
            for mode, s in modes.items()
        ),
    )
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 round, 7 samples")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.samples, args.threads)))
        return 0
    if args.quick:
        args.rounds, args.samples = 1, 7
    from tieify.latency._machine import describe_machine

    load_start = [round(v, 2) for v in os.getloadavg()]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--samples", str(args.samples)]
            cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {mode}: done", flush=True)
    summary: dict[str, dict[str, dict]] = {}
    for name in runs["system"][0]["workloads"]:
        summary[name] = {}
        for mode in MODES:
            rows = [run["workloads"][name] for run in runs[mode]]
            s = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
            s["ratio"] = statistics.median(row["tied_ms"] / row["dense_ms"] for row in rows)
            summary[name][mode] = s
    res = {
        "rounds": args.rounds,
        "samples": args.samples,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": describe_machine(),
        "load_start": load_start,
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "allocator": {m: runs[m][0]["allocator"] for m in MODES},
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "allocator.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "allocator.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
