"""Kernel efficiency of tied convolutions on ResNet-50's twelve conv shapes.

E = (dense time / B) / tied time: 1.0 means the tied layer turns its B-fold multiply-add
saving into a B-fold speed-up. For each shape and B ∈ {2, 4, 8}, measured side by side in one
interleaved run (ABAB rounds, medians of per-round ratios):

- ``fold``: the authors' reference forward (reshape to (N·B, C/B, H, W), thin conv), NCHW;
- ``grouped``: ``nn.Conv2d`` with ``groups=B`` (what a group conv with G = B costs), best of
  NCHW and channels-last;
- ``tieify``: ``TiedConv2d`` with the path ``tieify.optimize`` picks, timed afresh in the run
  (not read from the cache), on a channels-last input (the layout tieify recommends), and on
  an NCHW input; the better of the two is the headline column.

Dense time is the faster of NCHW and channels-last ``nn.Conv2d`` in the same round (a strict
baseline). Batch 8, 2 threads by default.

Two ceilings bound E for *any* implementation on the machine at hand:

- memory: a layer must at least read its input and allocate and write its output (timed as a
  sum over the input plus the faster of a fill of the output and a write of it with
  non-temporal stores by tieify's kernel, in the same rounds);
- compute: the tied layer's multiply-adds (the dense layer's / B) at the machine's peak rate,
  the highest float32 rate any kernel of the run reached (a 2048² sgemm, timed every round,
  and every dense convolution). E_compute = peak rate / the dense layer's own rate: where the
  dense convolution already runs at the peak, E = 1 asks the thin tied layer for the peak too.
  This binds the direct algorithm: tieify's kernel runs 3×3 convs of at least 32 channels a
  block by Winograd's F(2×2, 3×3), 2.25 times fewer multiply-adds, and can pass it.

The roofline ceiling is the smaller of the two (its time is the larger), and
``of roofline`` = E tieify / roofline ceiling. Writes ``results/kernels.json`` and
``results/kernels.md``.

Usage::

    python benchmarks/kernels.py            # ~80 s on 2 cores
    python benchmarks/kernels.py --quick    # fewer rounds, ~30 s
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
from tieify.latency._optimize import choose_path  # noqa: E402
from tieify.latency._timing import calibrate_iters, time_once  # noqa: E402
from tieify.nn import (
    TiedConv2d,  # noqa: E402
    _kernel,  # noqa: E402
    _paths,  # noqa: E402
)

RESULTS = Path(__file__).resolve().parent / "results"

# (C_in, C_out, H, k) of ResNet-50's convolutions (stride 1 versions).
SHAPES = [
    (64, 64, 56, 3),
    (64, 256, 56, 1),
    (256, 64, 56, 1),
    (128, 128, 28, 3),
    (128, 512, 28, 1),
    (512, 128, 28, 1),
    (256, 256, 14, 3),
    (256, 1024, 14, 1),
    (1024, 256, 14, 1),
    (512, 512, 7, 3),
    (512, 2048, 7, 1),
    (2048, 512, 7, 1),
]
CL = torch.channels_last
#: Side of the square sgemm timed as the machine's arithmetic peak (2·n³ flops per call).
PEAK_GEMM_N = 2048
#: Columns of the streamed write in the memory floor.
STREAM_WIDTH = 64


def stream_writer(numel):
    """A call that allocates a float32 output of at least ``numel`` elements and writes it
    with tieify's kernel, which streams large outputs (non-temporal stores): a (rows, 1)
    column of ones times a (1, 64) bank of ones, rows = ⌈numel / 64⌉, so it reads 1/64 of
    what it writes. Returns the output (all ones)."""
    rows = -(-numel // STREAM_WIDTH)
    a = torch.ones(rows, 1)
    bank = _kernel.pack(torch.ones(1, STREAM_WIDTH))
    return lambda: _kernel.pointwise(a, bank, None, torch.empty(rows, STREAM_WIDTH))


def bench_shape(ci, co, h, k, Bs, batch, rounds, target_s):
    """Interleaved rounds over every candidate of one shape; returns per-B medians."""
    pad = k // 2
    x = torch.randn(batch, ci, h, h)
    xc = x.contiguous(memory_format=CL)
    dense = torch.nn.Conv2d(ci, co, k, padding=pad, bias=False)
    dense_cl = torch.nn.Conv2d(ci, co, k, padding=pad, bias=False).to(memory_format=CL)
    out_numel = batch * co * h * h
    ga, gb = torch.randn(PEAK_GEMM_N, PEAK_GEMM_N), torch.randn(PEAK_GEMM_N, PEAK_GEMM_N)
    fns = {
        "dense_nchw": lambda: dense(x),
        "dense_cl": lambda: dense_cl(xc),
        # Memory floor: every path reads the whole input once and allocates and writes the
        # whole output; timed separately as a reduction over the input and a fill.
        "read_input": lambda: xc.sum(),
        "write_output": lambda: torch.empty(out_numel).fill_(1.0),
        # The same write with non-temporal stores, which skip reading the output's lines
        # first (fill_ does not); the floor takes the faster of the two in each round.
        **({"stream_output": stream_writer(out_numel)} if _kernel.kernel_available() else {}),
        # The machine's arithmetic peak, in the same rounds (see the module docstring).
        "peak_gemm": lambda: torch.mm(ga, gb),
    }
    paths = {}
    for B in Bs:
        tied = TiedConv2d.from_dense(dense, B)
        tied_cl = TiedConv2d.from_dense(dense, B)
        with torch.inference_mode():
            # Timed afresh (what tieify.optimize does on a new machine): never a choice
            # cached by an earlier run of other code.
            tied.path = choose_path(tied, x, cache=False)
            tied_cl.path = choose_path(tied_cl, xc, cache=False)
        paths[B] = {"nchw": tied.path, "channels_last": tied_cl.path}
        g = torch.nn.Conv2d(ci, co, k, padding=pad, groups=B, bias=False)
        g_cl = torch.nn.Conv2d(ci, co, k, padding=pad, groups=B, bias=False).to(memory_format=CL)
        fns[f"fold|{B}"] = lambda t=tied: _paths.fold_forward(t, x)
        fns[f"grouped_nchw|{B}"] = lambda m=g: m(x)
        fns[f"grouped_cl|{B}"] = lambda m=g_cl: m(xc)
        fns[f"tieify_nchw|{B}"] = lambda t=tied: t(x)
        fns[f"tieify_cl|{B}"] = lambda t=tied_cl: t(xc)
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        iters = {n: calibrate_iters(f, target_s) for n, f in fns.items()}
        samples = {n: [] for n in fns}
        for _ in range(rounds):
            for n, f in fns.items():
                samples[n].append(time_once(f, iters[n]))
    # Per-round ratios (the same round's dense time), then medians over rounds.
    dense_r = [min(a, b) for a, b in zip(samples["dense_nchw"], samples["dense_cl"], strict=True)]
    flops = 2 * batch * h * h * ci * co * k * k  # the dense layer's; the tied one's is / B

    def gflops(n_flops, times):
        return statistics.median(n_flops / t for t in times) / 1e9

    # The output's write: the faster of the fill and the streamed write in each round.
    streamed = samples.get("stream_output", samples["write_output"])
    writes = [min(f, s) for f, s in zip(samples["write_output"], streamed, strict=True)]
    rates = {
        "dense_gflops": gflops(flops, dense_r),
        "dense_nchw_gflops": gflops(flops, samples["dense_nchw"]),
        "dense_cl_gflops": gflops(flops, samples["dense_cl"]),
        "peak_gemm_gflops": gflops(2 * PEAK_GEMM_N**3, samples["peak_gemm"]),
    }
    rows = []
    for B in Bs:

        def eff(name, B=B):
            return statistics.median(d / B / t for d, t in zip(dense_r, samples[name], strict=True))

        def best(a, b, B=B):
            return statistics.median(
                d / B / min(s, u) for d, s, u in zip(dense_r, samples[a], samples[b], strict=True)
            )

        row = {
            "C_in": ci,
            "C_out": co,
            "H": h,
            "k": k,
            "B": B,
            "dense_ms": statistics.median(dense_r) * 1e3,
            "dense_nchw_ms": statistics.median(samples["dense_nchw"]) * 1e3,
            "dense_cl_ms": statistics.median(samples["dense_cl"]) * 1e3,
            **rates,
            "E_fold": eff(f"fold|{B}"),
            "E_ceiling": statistics.median(
                d / B / (r + w)
                for d, r, w in zip(dense_r, samples["read_input"], writes, strict=True)
            ),
            "E_grouped": best(f"grouped_nchw|{B}", f"grouped_cl|{B}"),
            "E_tieify": best(f"tieify_nchw|{B}", f"tieify_cl|{B}"),
            "E_tieify_cl": eff(f"tieify_cl|{B}"),
            "E_tieify_nchw": eff(f"tieify_nchw|{B}"),
            # Best-of-rounds estimates (least disturbed by other jobs).
            "E_fold_best": min(dense_r) / B / min(samples[f"fold|{B}"]),
            "E_grouped_best": min(dense_r)
            / B
            / min(min(samples[f"grouped_nchw|{B}"]), min(samples[f"grouped_cl|{B}"])),
            "E_tieify_best": min(dense_r)
            / B
            / min(min(samples[f"tieify_nchw|{B}"]), min(samples[f"tieify_cl|{B}"])),
            "speedup_vs_fold": statistics.median(
                f / min(a, b)
                for f, a, b in zip(
                    samples[f"fold|{B}"],
                    samples[f"tieify_nchw|{B}"],
                    samples[f"tieify_cl|{B}"],
                    strict=True,
                )
            ),
            "path_cl": paths[B]["channels_last"],
            "path_nchw": paths[B]["nchw"],
        }
        for n in ("fold", "tieify_cl", "tieify_nchw", "grouped_nchw", "grouped_cl"):
            row[f"{n}_ms"] = statistics.median(samples[f"{n}|{B}"]) * 1e3
        rows.append(row)
    return rows


def add_compute_ceiling(rows):
    """Set each row's compute and roofline ceilings from the run's peak float32 rate.

    The peak is the highest median rate of any kernel timed in the run (the sgemm of every
    shape's rounds, every dense convolution in either layout): a rate this machine reached.
    """
    peak = max(
        r[k] for r in rows for k in ("peak_gemm_gflops", "dense_nchw_gflops", "dense_cl_gflops")
    )
    for r in rows:
        r["peak_gflops"] = peak
        r["E_compute_ceiling"] = peak / r["dense_gflops"]
        r["E_roofline"] = min(r["E_ceiling"], r["E_compute_ceiling"])
        r["of_roofline"] = r["E_tieify"] / r["E_roofline"]
    return peak


#: The floor the issue sets for tieify's E on every (shape, B) case.
MIN_E = 0.6


def below_target(rows, target=MIN_E):
    """The cases where tieify's E is under ``target``, each with its roofline ceiling (the
    smaller of the memory and compute ceilings) and which of the two it is: where that
    ceiling is under ``target`` too, no forward path could reach it in this run."""
    return [
        {
            "C_in": r["C_in"],
            "C_out": r["C_out"],
            "H": r["H"],
            "k": r["k"],
            "B": r["B"],
            "E_tieify": r["E_tieify"],
            "E_roofline": r["E_roofline"],
            "ceiling": "memory" if r["E_ceiling"] <= r["E_compute_ceiling"] else "compute",
            "bound": r["E_roofline"] < target,
        }
        for r in rows
        if r["E_tieify"] < target
    ]


def below_target_line(cases, target=MIN_E):
    """One Markdown line on :func:`below_target`'s cases."""
    if not cases:
        return f"Every case at E ≥ {target}."
    parts = [
        f"{c['C_in']}→{c['C_out']} {c['k']}×{c['k']} at {c['H']}×{c['H']}, B = {c['B']}: "
        f"E {c['E_tieify']:.2f}, {c['ceiling']} ceiling {c['E_roofline']:.2f}"
        + (f" (no forward path reaches {target} in this run)" if c["bound"] else "")
        for c in cases
    ]
    return f"Below E = {target}: " + "; ".join(parts) + "."


def summarize(rows):
    out = {}
    for col in (
        "E_fold",
        "E_grouped",
        "E_tieify",
        "E_tieify_cl",
        "E_tieify_nchw",
        "E_ceiling",
        "E_compute_ceiling",
        "E_roofline",
        "of_roofline",
        "E_fold_best",
        "E_grouped_best",
        "E_tieify_best",
        "dense_gflops",
    ):
        vals = [r[col] for r in rows]
        out[col] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    out["faster_than_fold"] = sum(r["speedup_vs_fold"] > 1.0 for r in rows)
    out["below_target"] = below_target(rows)
    out["n"] = len(rows)
    return out


def markdown(res):
    s = res["summary"]
    lines = [
        "# Tied conv kernel efficiency, ResNet-50 shapes",
        "",
        f"E = (dense time / B) / tied time; batch {res['batch']}, {res['threads']} threads, "
        f"{res['rounds']} interleaved rounds, medians of per-round ratios. Machine: "
        f"{res['machine']}, torch {res['torch']}. Peak float32 rate reached in the run: "
        f"{res['peak_gflops']:.0f} GFLOP/s; the dense convolutions ran at "
        f"{s['dense_gflops']['min']:.0f}-{s['dense_gflops']['max']:.0f} GFLOP/s (median "
        f"{s['dense_gflops']['median']:.0f}). {res['note']} {run_facts(res)}",
        "",
    ]
    summary_rows = (
        ("E_fold", "reference fold (NCHW)"),
        ("E_grouped", "grouped conv G=B (best layout)"),
        ("E_tieify", "**tieify** (best layout)"),
        ("E_tieify_cl", "tieify, channels_last"),
        ("E_tieify_nchw", "tieify, NCHW"),
        ("E_ceiling", "memory ceiling (time to read the input and write the output)"),
        ("E_compute_ceiling", "compute ceiling (peak rate / the dense layer's rate)"),
        ("E_roofline", "roofline ceiling (the smaller of the two)"),
        ("of_roofline", "tieify E / roofline ceiling"),
        ("E_fold_best", "fold, best-of-rounds times"),
        ("E_grouped_best", "grouped, best-of-rounds times"),
        ("E_tieify_best", "tieify, best-of-rounds times"),
    )
    lines += table(
        " | median E | min E | max E",
        "lrrr",
        (
            [label] + [f"{s[col][k]:.2f}" for k in ("median", "min", "max")]
            for col, label in summary_rows
        ),
    )
    lines += [
        "",
        f"tieify faster than the reference fold on {s['faster_than_fold']}/{s['n']} "
        "(shape, B) cases.",
        "",
        below_target_line(s["below_target"]),
        "",
    ]
    columns = ("E_fold", "E_grouped", "E_tieify", "E_tieify_cl", "E_tieify_nchw", "E_ceiling")
    columns += ("E_compute_ceiling", "of_roofline", "speedup_vs_fold")
    lines += table(
        "C_in | C_out | H | k | B | dense ms | E fold | E grouped | E tieify | E tieify CL "
        "| E tieify NCHW | E memory | E compute | of roofline | × vs fold | path CL | path NCHW",
        "r" * 15 + "ll",
        (
            [r["C_in"], r["C_out"], r["H"], r["k"], r["B"], f"{r['dense_ms']:.2f}"]
            + [f"**{r[c]:.2f}**" if c == "E_tieify" else f"{r[c]:.2f}" for c in columns]
            + [r["path_cl"], r["path_nchw"]]
            for r in res["rows"]
        ),
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Tied conv kernel efficiency (ResNet-50 shapes).")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--B", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--target-s", type=float, default=0.01)
    p.add_argument("--quick", action="store_true", help="5 rounds, shorter samples")
    p.add_argument("--out", type=Path, default=RESULTS)
    _allocator_flag.add_flag(p)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.target_s = 5, 0.005
    torch.set_num_threads(args.threads)
    allocator = _allocator_flag.apply(args)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    start = time.time()
    rows = []
    for ci, co, h, k in SHAPES:
        rows += bench_shape(ci, co, h, k, args.B, args.batch, args.rounds, args.target_s)
        r = rows[-1]
        print(f"{ci}->{co} {h}x{h} k{k}: E_tieify(B={r['B']})={r['E_tieify']:.2f}", flush=True)
    res = {
        "benchmark": "kernels",
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "B": args.B,
        "torch": torch.__version__,
        "machine": describe_machine(),
        "note": "The machine's cores are shared with other jobs: timings are noisy, candidates "
        "are interleaved (ABAB) and E is a median of per-round ratios. 'E memory' is the E of "
        "a layer that only reads its input once and allocates and writes its output (the "
        "memory floor of every path, timed as a sum over the input plus the faster of a fill "
        "of the output and a write of it with non-temporal stores). 'E compute' is the peak "
        "rate over the dense layer's own rate: the E of a tied layer doing the dense "
        "layer's multiply-adds / B at the peak. 'of roofline' is E tieify over the smaller of "
        "the two. Where the memory ceiling is below 1, no implementation can reach E = 1 on "
        "this machine; the compute ceiling binds the direct algorithm only: the kernel's "
        "Winograd F(2x2, 3x3) convolution (3x3 convs of at least 32 channels a block) does "
        "2.25 times fewer multiply-adds and can pass it.",
        "seconds": round(time.time() - start, 1),
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "allocator": allocator,
        "rows": rows,
    }
    res["peak_gflops"] = add_compute_ceiling(rows)
    res["summary"] = summarize(rows)
    write_results(args.out, "kernels", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
