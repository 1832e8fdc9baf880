"""The paper's timing experiment: group conv time against G, tied conv time against B.

A 3×3 convolution on a C×H×W feature map (the paper: 2048×56×56) with G groups (dense when
G = 1) and the tied convolution with B blocks (tieify's layer, every applicable forward path,
and the path tieify picks), timed side by side in interleaved rounds (medians). Runs on a CUDA
GPU when there is one; on CPU it uses a smaller map (``--channels 256 --size 28`` by default)
so that it finishes in a minute or two. Writes JSON + Markdown.

Usage::

    python benchmarks/gpu_timing.py                      # GPU if present, else small CPU map
    python benchmarks/gpu_timing.py --device cpu --quick
    python benchmarks/gpu_timing.py --check-paths        # every path == reference, on the GPU
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

from tieify.latency._timing import interleaved_medians  # noqa: E402
from tieify.nn import (
    TiedConv2d,  # noqa: E402
    _paths,  # noqa: E402
)

RESULTS = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    C, S, N = args.channels, args.size, args.batch
    factors = [f for f in (1, 2, 4, 8, 16, 32, 64) if f <= args.max_factor]
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(N, C, S, S, device=device, dtype=dtype).to(memory_format=fmt)
            fns = {}
            for G in factors:
                conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=G, bias=False)
                conv = conv.to(device=device, dtype=dtype, memory_format=fmt)
                fns[("group", G, "-")] = lambda m=conv, x=x: m(x)
            for B in factors[1:]:
                tied = TiedConv2d(C, C, 3, padding=1, bias=False, B=B).to(device, dtype)
                for path in _paths.applicable_paths(tied, x):
                    fns[("tied", B, path)] = lambda m=tied, p=path, x=x: _paths.run_path(m, x, p)
                fns[("tied", B, "auto")] = lambda m=tied, x=x: m(x)
            named = {f"{k}|{f}|{p}": fn for (k, f, p), fn in fns.items()}
            with torch.inference_mode():
                med = interleaved_medians(
                    named,
                    repeats=args.repeats,
                    warmup=2,
                    target_s=args.target_s,
                    device=device if gpu else None,
                )
            dense = med["group|1|-"]
            for name, t in med.items():
                kind, f, path = name.split("|")
                f = int(f)
                rows.append(
                    {
                        "dtype": dtype_name,
                        "layout": layout,
                        "op": kind,
                        "factor": f,
                        "path": path,
                        "ms": t * 1e3,
                        "speedup_vs_dense": dense / t,
                        "ideal_speedup": f,
                    }
                )
            print(f"done {dtype_name} {layout}", flush=True)
    return {
        "benchmark": "gpu_timing",
        "feature_map": {"N": N, "C": C, "H": S, "W": S},
        "kernel": 3,
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "note": "medians of interleaved rounds; speedup = dense (G=1) time / time",
        "rows": rows,
    }


def check_paths() -> int:
    """Every forward path equals the reference fold on the GPU (forward and backward)."""
    if not torch.cuda.is_available():
        print("no CUDA device; the CPU test suite covers the paths (tests/test_paths.py)")
        return 0
    dev = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    failures = 0
    n = 0
    for cin, cout, k, s, B in [
        (64, 256, 1, 1, 4),
        (256, 64, 1, 2, 8),
        (64, 64, 3, 1, 4),
        (96, 192, 3, 2, 2),
        (128, 128, 3, 1, 8),
    ]:
        for dtype in (torch.float32, torch.bfloat16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                layer = TiedConv2d(cin, cout, k, stride=s, padding=k // 2, B=B).to(dev, dtype)
                x = torch.randn(4, cin, 14, 14, device=dev, dtype=dtype)
                x = x.contiguous(memory_format=fmt).requires_grad_()
                ref = _paths.fold_forward(layer, x)
                g = torch.randn_like(ref)
                rg = torch.autograd.grad(ref, [x, layer.weight, layer.bias], g)
                tol = 1e-4 if dtype == torch.float32 else 4e-2
                for path in _paths.applicable_paths(layer, x):
                    n += 1
                    try:
                        y = _paths.run_path(layer, x, path)
                        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
                        gg = torch.autograd.grad(y, [x, layer.weight, layer.bias], g)
                        for a, b in zip(gg, rg, strict=True):
                            sc = float(b.abs().max()) + 1
                            torch.testing.assert_close(
                                a.float(), b.float(), rtol=tol, atol=tol * sc
                            )
                    except AssertionError as e:
                        failures += 1
                        print("MISMATCH", cin, cout, k, s, B, dtype, fmt, path, str(e)[:200])
                print(cin, cout, k, B, dtype, fmt, "default:", _paths.default_path(layer, x))
    print(f"{n - failures}/{n} path checks passed on {torch.cuda.get_device_name()}")
    return 1 if failures else 0


def markdown(res: dict) -> str:
    fm = res["feature_map"]
    lines = [
        f"# Group conv vs tied conv timing ({res['device']}, torch {res['torch']})",
        "",
        f"3×3 conv, feature map N={fm['N']}, C={fm['C']}, {fm['H']}×{fm['W']}; {res['note']}.",
        "",
    ]
    for dtype in sorted({r["dtype"] for r in res["rows"]}):
        for layout in ("contiguous", "channels_last"):
            rows = [r for r in res["rows"] if r["dtype"] == dtype and r["layout"] == layout]
            if not rows:
                continue
            lines += [
                f"## {dtype}, {layout}",
                "",
                "| op | G or B | path | ms | speed-up vs dense | ideal |",
                "|---|---:|---|---:|---:|---:|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['op']} | {r['factor']} | {r['path']} | {r['ms']:.3f} | "
                    f"{r['speedup_vs_dense']:.2f} | {r['ideal_speedup']} |"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--dtypes", nargs="+")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--target-s", type=float, default=0.05)
    p.add_argument("--max-factor", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="fewer repeats, factors up to 8")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-paths", action="store_true", help="only check path equality")
    args = p.parse_args(argv)
    if args.check_paths:
        return check_paths()
    gpu = args.device.startswith("cuda")
    if not gpu:
        torch.set_num_threads(args.threads)
    args.channels = args.channels or (2048 if gpu else 256)
    args.size = args.size or (56 if gpu else 28)
    args.batch = args.batch or (8 if gpu else 1)
    args.dtypes = args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"])
    if args.quick:
        args.repeats, args.max_factor, args.target_s = 3, 8, 0.01
    res = run(args)
    tag = "gpu" if gpu else "cpu"
    write_results(args.out, f"gpu_timing_{tag}", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
