"""The paper's timing experiment: group conv time against G, tied conv time against B.

A 3×3 convolution on a C×H×W feature map (the paper: 2048×56×56) with G groups (dense when
G = 1) and the tied convolution with B blocks (tieify's layer, every applicable forward path,
the path tieify's cheap rule picks, ``auto``, and the one ``tieify.optimize`` picks by timing,
``optimized``), timed side by side in interleaved rounds (medians). Runs on a CUDA GPU when
there is one; on CPU it uses a smaller map (``--channels 256 --size 28`` by default) so that it
finishes in a minute or two. With ``--models`` it also times dense against tied torchvision
models on the device (the cases of ``models.py``, eager after ``tieify.optimize``, NCHW and
channels-last inputs) against their multiply-add ratio. Writes JSON + Markdown.

Usage::

    python benchmarks/gpu_timing.py                      # GPU if present, else small CPU map
    python benchmarks/gpu_timing.py --device cpu --quick
    python benchmarks/gpu_timing.py --check-paths        # every path == reference, on the GPU
    python benchmarks/gpu_timing.py --models             # also dense vs tied models (GPU)
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

import tieify  # noqa: E402
from tieify.latency._optimize import choose_path  # noqa: E402
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
            chosen: dict[tuple[str, int], str] = {}
            for G in factors:
                conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=G, bias=False)
                conv = conv.to(device=device, dtype=dtype, memory_format=fmt)
                fns[("group", G, "-")] = lambda m=conv, x=x: m(x)
            for B in factors[1:]:
                tied = TiedConv2d(C, C, 3, padding=1, bias=False, B=B).to(device, dtype)
                for path in _paths.applicable_paths(tied, x):
                    fns[("tied", B, path)] = lambda m=tied, p=path, x=x: _paths.run_path(m, x, p)
                fns[("tied", B, "auto")] = lambda m=tied, x=x: m(x)
                with torch.inference_mode():  # the rule for inference, as "auto" runs
                    chosen["auto", B] = _paths.select_path(tied, x)
                    best = choose_path(tied, x, cache=False)
                chosen["optimized", B] = best
                fns[("tied", B, "optimized")] = lambda m=tied, p=best, x=x: _paths.run_path(m, x, p)
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
                        "runs": chosen.get((path, f), path),
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
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "rows": rows,
        "summary": summarize(rows),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per dtype, layout and B: the fastest single path, and how close the cheap rule
    (``auto``) and the timed choice (``optimized``) come to it (their time over its time)."""
    out = []
    keys = sorted({(r["dtype"], r["layout"], r["factor"]) for r in rows if r["op"] == "tied"})
    for dtype, layout, B in keys:
        mine = {
            r["path"]: r
            for r in rows
            if (r["dtype"], r["layout"], r["factor"], r["op"]) == (dtype, layout, B, "tied")
        }
        single = {p: r for p, r in mine.items() if p not in ("auto", "optimized")}
        best = min(single.values(), key=lambda r: r["ms"])
        dense = next(
            r["ms"]
            for r in rows
            if (r["dtype"], r["layout"], r["op"], r["factor"]) == (dtype, layout, "group", 1)
        )
        out.append(
            {
                "dtype": dtype,
                "layout": layout,
                "B": B,
                "fastest": best["path"],
                "fastest_ms": best["ms"],
                "fastest_speedup": dense / best["ms"],
                "auto": mine["auto"]["runs"],
                "auto_over_fastest": mine["auto"]["ms"] / best["ms"],
                "optimized": mine["optimized"]["runs"],
                "optimized_over_fastest": mine["optimized"]["ms"] / best["ms"],
            }
        )
    return out


MODEL_CASES = ("resnet50_3x3_B2", "resnet50_all_B4", "resnext50_B2", "mobilenet_v3_large_B2")


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph (after warm-up on a side stream), as a replay:
    the GPU's time without the host's per-kernel launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _model_row(case, dtype_name, layout, batch, mode, med, mac_ratio) -> dict:
    ratio = med["tied"] / med["dense"]
    row = {
        "case": case,
        "dtype": dtype_name,
        "layout": layout,
        "batch": batch,
        "mode": mode,
        "dense_ms": med["dense"] * 1e3,
        "tied_ms": med["tied"] * 1e3,
        "latency_ratio": ratio,
        "mac_ratio": mac_ratio,
        "gap": ratio - mac_ratio,
    }
    print(
        f"{case} {dtype_name} {layout} b{batch} {mode}: dense {row['dense_ms']:.2f} ms, tied "
        f"{row['tied_ms']:.2f} ms, ratio {ratio:.3f} vs MAC {mac_ratio:.3f}",
        flush=True,
    )
    return row


def run_models(args: argparse.Namespace) -> list[dict]:
    """Dense vs tied models of ``models.py`` on the device, after ``tieify.optimize``, with
    NCHW and channels-last inputs, against their multiply-add ratio: ``eager`` calls and, on
    a GPU, ``cuda_graph`` replays of the same calls (the kernels' time alone, no launch
    cost); with ``--model-compile``, ``torch.compile`` of both channels-last models at the
    largest batch."""
    from models import build_case, macs

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    rows = []
    for case in args.model_cases:
        dense0, tied0 = build_case(case)
        for dtype_name in args.model_dtypes:
            dtype = getattr(torch, dtype_name)
            for layout in ("contiguous", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                dense = dense0.to(device=device, dtype=dtype, memory_format=fmt)
                tied = tied0.to(device=device, dtype=dtype, memory_format=fmt)
                for batch in args.model_batches:
                    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
                    x = x.contiguous(memory_format=fmt)
                    mac_ratio = macs(tied, x) / macs(dense, x)
                    timing = {
                        "repeats": args.repeats,
                        "warmup": 2,
                        "target_s": args.target_s,
                        "device": device if gpu else None,
                    }
                    with torch.inference_mode():
                        tieify.optimize(tied, x)
                        fns = {
                            "dense": lambda m=dense, x=x: m(x),
                            "tied": lambda m=tied, x=x: m(x),
                        }
                        med = interleaved_medians(fns, **timing)
                        rows.append(
                            _model_row(case, dtype_name, layout, batch, "eager", med, mac_ratio)
                        )
                        if gpu:
                            graphs = {k: cuda_graphed(f) for k, f in fns.items()}
                            med = interleaved_medians(graphs, **timing)
                            rows.append(
                                _model_row(
                                    case, dtype_name, layout, batch, "cuda_graph", med, mac_ratio
                                )
                            )
                        compile_now = (
                            args.model_compile
                            and layout == "channels_last"
                            and batch == max(args.model_batches)
                        )
                        if compile_now:
                            torch._dynamo.reset()
                            cd, ct = torch.compile(dense), torch.compile(tied)
                            compiled = {
                                "dense": lambda m=cd, x=x: m(x),
                                "tied": lambda m=ct, x=x: m(x),
                            }
                            med = interleaved_medians(compiled, **timing)
                            rows.append(
                                _model_row(
                                    case, dtype_name, layout, batch, "compile", med, mac_ratio
                                )
                            )
    return rows


def run_layers(args: argparse.Namespace) -> list[dict]:
    """Per convolution of one ``models.py`` case (``--layers CASE``), channels-last, the
    largest model batch, on its real input: the dense layer's time against the tied layer's
    (the path ``tieify.optimize`` pinned) and each applicable path's, interleaved medians:
    where the model's time goes."""
    from models import build_case

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.model_dtypes[0])
    dense, tied = build_case(args.layers)
    fmt = torch.channels_last
    dense = dense.to(device=device, dtype=dtype, memory_format=fmt)
    tied = tied.to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(max(args.model_batches), 3, 224, 224, device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
        for n, m in tied.named_modules()
        if isinstance(m, TiedConv2d)
    ]
    with torch.inference_mode():
        tieify.optimize(tied, x)
        inputs.clear()
        tied(x)
    for h in hooks:
        h.remove()
    dense_modules = dict(dense.named_modules())
    tied_modules = dict(tied.named_modules())
    rows = []
    for name, xi in inputs.items():
        t, d = tied_modules[name], dense_modules[name]
        xd = xi.contiguous(memory_format=fmt)
        fns = {"dense": lambda d=d, x=xd: d(x), "tied": lambda t=t, x=xi: t(x)}
        for path in _paths.applicable_paths(t, xi):
            fns[path] = lambda t=t, x=xi, p=path: _paths.run_path(t, x, p)
        with torch.inference_mode():
            med = interleaved_medians(
                fns,
                repeats=args.repeats,
                warmup=2,
                target_s=0.01,
                device=device if gpu else None,
            )
        rows.append(
            {
                "layer": name,
                "shape": f"{t.in_channels}->{t.out_channels} k{t.kernel_size[0]} "
                f"s{t.stride[0]} {xi.shape[-1]}x{xi.shape[-1]}",
                "B": t.B,
                "path": _paths.select_path(t, xi),
                "dense_ms": med["dense"] * 1e3,
                "tied_ms": med["tied"] * 1e3,
                "ratio": med["tied"] / med["dense"],
                "paths_ms": {k: v * 1e3 for k, v in med.items() if k not in ("dense", "tied")},
            }
        )
    return rows


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


def _section(title: str, columns: str, rows: list[list[object]], note: str = "") -> list[str]:
    """A Markdown section: ``## title``, an optional note, and a table whose ``columns`` are
    ``|``-separated names, a trailing ``:`` right-aligning a column (numbers)."""
    names = [c.strip() for c in columns.split("|")]
    lines = [f"## {title}", ""] + ([note, ""] if note else [])
    lines.append("| " + " | ".join(n.rstrip(":") for n in names) + " |")
    lines.append("|" + "|".join("---:" if n.endswith(":") else "---" for n in names) + "|")
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return [*lines, ""]


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
            if rows:
                lines += _section(
                    f"{dtype}, {layout}",
                    "op | G or B: | path | ms: | speed-up vs dense: | ideal:",
                    [
                        [
                            r["op"],
                            r["factor"],
                            r["path"]
                            if r.get("runs", r["path"]) == r["path"]
                            else f"{r['path']} ({r['runs']})",
                            f"{r['ms']:.3f}",
                            f"{r['speedup_vs_dense']:.2f}",
                            r["ideal_speedup"],
                        ]
                        for r in rows
                    ],
                )
    if res.get("summary"):
        lines += _section(
            "Path choice: the fastest single path against the cheap rule and the timed choice",
            "dtype | layout | B: | fastest | ms: | speed-up vs dense: | auto | auto / fastest: "
            "| optimized | optimized / fastest:",
            [
                [
                    r["dtype"],
                    r["layout"],
                    r["B"],
                    r["fastest"],
                    f"{r['fastest_ms']:.3f}",
                    f"{r['fastest_speedup']:.2f}",
                    r["auto"],
                    f"{r['auto_over_fastest']:.2f}",
                    r["optimized"],
                    f"{r['optimized_over_fastest']:.2f}",
                ]
                for r in res["summary"]
            ],
            note="Time over the fastest path's time (1.00 = picked the fastest).",
        )
    if res.get("models"):
        lines += _section(
            "Models: dense vs tied (after `tieify.optimize`)",
            "case | dtype | layout | batch: | mode | dense ms: | tied ms: | tied / dense: "
            "| MAC ratio: | gap:",
            [
                [
                    r["case"],
                    r["dtype"],
                    r["layout"],
                    r["batch"],
                    r.get("mode", "eager"),
                    f"{r['dense_ms']:.2f}",
                    f"{r['tied_ms']:.2f}",
                    f"{r['latency_ratio']:.3f}",
                    f"{r['mac_ratio']:.3f}",
                    f"{r['gap']:+.3f}",
                ]
                for r in res["models"]
            ],
            note="`eager`: plain calls; `cuda_graph`: the same calls captured in a CUDA graph "
            "and replayed (the kernels' time, no launch cost); `compile`: `torch.compile`.",
        )
    if res.get("layers"):
        lines += _section(
            f"Layers of {res['layers']['case']}: dense vs tied, channels-last",
            "layer | shape | B: | path | dense ms: | tied ms: | tied / dense: | each path, ms",
            [
                [
                    r["layer"],
                    r["shape"],
                    r["B"],
                    r["path"],
                    f"{r['dense_ms']:.3f}",
                    f"{r['tied_ms']:.3f}",
                    f"{r['ratio']:.2f}",
                    ", ".join(f"{k} {v:.3f}" for k, v in r.get("paths_ms", {}).items()),
                ]
                for r in res["layers"]["rows"]
            ],
        )
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
    p.add_argument("--models", action="store_true", help="also time dense vs tied models")
    p.add_argument("--model-cases", nargs="+", default=list(MODEL_CASES))
    p.add_argument("--model-batches", type=int, nargs="+")
    p.add_argument("--model-dtypes", nargs="+")
    p.add_argument("--model-compile", action="store_true", help="also torch.compile the models")
    p.add_argument("--layers", metavar="CASE", help="per-layer dense vs tied times of CASE")
    p.add_argument("--tag", help="results file name suffix (default: gpu or cpu)")
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
    args.model_batches = args.model_batches or ([8, 64] if gpu else [1])
    args.model_dtypes = args.model_dtypes or (["bfloat16"] if gpu else ["float32"])
    if gpu:
        torch.backends.cudnn.benchmark = True  # dense and tied alike, as users run on GPU
    res = run(args)
    tag = args.tag or ("gpu" if gpu else "cpu")
    # Written after each part, so a run cut short (a lent GPU's time limit) keeps what it did.
    write_results(args.out, f"gpu_timing_{tag}", res, markdown(res))
    if args.models:
        res["models"] = run_models(args)
        write_results(args.out, f"gpu_timing_{tag}", res, markdown(res))
    if args.layers:
        res["layers"] = {"case": args.layers, "rows": run_layers(args)}
        write_results(args.out, f"gpu_timing_{tag}", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
