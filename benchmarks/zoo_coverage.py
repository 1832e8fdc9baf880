"""Zoo coverage of tieify's public functions: every model family, every function.

Every torchvision classification model and the timm architectures of the test zoo
(``tests/test_zoo_timm.py``), built without weights, tied at B=4 with an example input (batch
2), then put through each public function, each checked against the tied model's own output:

- ``report``: ``tieify.report(model, tied, x)`` renders, and the tied model has fewer
  parameters wherever something was tied;
- ``save_load``: ``tieify.save`` then ``tieify.load`` on a fresh instance gives the same
  outputs, bit for bit;
- ``optimize``: ``tieify.optimize`` (one repeat per candidate) on a copy keeps the outputs
  (``assert_close``, 1e-3);
- ``fuse``: ``tieify.optimize(..., fused=True)`` then ``tieify.fuse`` on a copy keeps them;
- ``export``: ``torch.export`` with a dynamic batch, run at batch 2 and 3;
- ``onnx``: ``torch.onnx.export`` (TorchScript exporter) run by onnxruntime;
- ``predict`` (``--predict``, about a minute a model: it measures the layer table):
  ``tieify.predict_latency`` returns a positive time.

Where ``export`` or ``onnx`` fails on the tied model, the dense model is tried the same way:
if it fails too, the row says ``dense fails too`` (a limit of the exporter on that
architecture, not of tieify). Also times ``tieify.tieify`` on ResNet-152 (median of 5).

Usage::

    python benchmarks/zoo_coverage.py            # writes results/zoo_coverage.{json,md}
    python benchmarks/zoo_coverage.py --models resnet18 mnasnet0_5 --functions save_load
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

import tieify

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from _results import run_facts, table, write_results  # noqa: E402
from test_zoo_torchvision import _first_tensor as _first  # noqa: E402
from test_zoo_torchvision import n_params  # noqa: E402

SIZES = {"inception_v3": 299, "googlenet": 64}
FIXED_224 = ("vit_", "swin", "maxvit")
FUNCTIONS = ("report", "save_load", "optimize", "fuse", "export", "onnx")
TOL = {"rtol": 1e-3, "atol": 1e-3}
NOT_APPLICABLE = ("dense fails", "skipped")  # how check() begins a result it could not judge


def _family(name: str) -> str:
    for prefix in (
        "efficientnet",
        "mobilenet",
        "regnet",
        "resnext",
        "wide_resnet",
        "resnet",
        "convnext",
        "densenet",
        "shufflenet",
        "squeezenet",
        "mnasnet",
        "vgg",
        "vit",
        "swin",
        "maxvit",
    ):
        if name.startswith(prefix):
            return prefix
    return name


def _torchvision_models() -> list[tuple[str, str, dict, int]]:
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        size = SIZES.get(name, 224 if name.startswith(FIXED_224) else 64)
        kwargs = {"init_weights": False} if name in ("inception_v3", "googlenet") else {}
        out.append((f"torchvision/{_family(name)}", name, kwargs, size))
    return out


def _timm_models() -> list[tuple[str, str, dict, int]]:
    try:
        from test_zoo_timm import ZOO
    except ImportError:  # timm missing
        return []
    return [(f"timm/{fam}", name, kwargs, size) for fam, name, kwargs, size, _ in ZOO]


def _build(source: str, name: str, kwargs: dict) -> torch.nn.Module:
    if source.startswith("timm/"):
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _export(net: torch.nn.Module, x: torch.Tensor) -> Callable[..., Any]:
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(net, (x,), dynamic_shapes=({0: batch},)).module()


def _onnx(net: torch.nn.Module, x: torch.Tensor, work: Path) -> Callable[..., Any]:
    import onnxruntime as ort

    path = work / "net.onnx"
    with warnings.catch_warnings():  # the tracer's notes on Python-level shape checks
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(net, (x,), str(path), dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda t: torch.from_numpy(session.run(None, {name: t.numpy()})[0])


def check(
    function: str,
    model: torch.nn.Module,
    tied: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    work: Path,
) -> str:
    """Run ``function`` on ``tied``; ``"ok"`` (with what it found), or raise."""
    with torch.no_grad():
        if function == "report":
            text = str(tieify.report(model, tied, x))
            assert text, "empty report"
            if tied.tieify_plan.tied():
                assert n_params(tied) < n_params(model), "no parameters saved"
            return "ok"
        if function == "save_load":
            path = tieify.save(tied, work / "tied.safetensors")
            again = tieify.load(model, path).eval()  # load leaves `model` as it is
            torch.testing.assert_close(_first(again(x)), y, rtol=0, atol=0)
            return "ok"
        if function == "optimize":
            fast = tieify.optimize(copy.deepcopy(tied), x, repeats=1)
            torch.testing.assert_close(_first(fast(x)), y, **TOL)
            return "ok"
        if function == "fuse":
            fast = tieify.optimize(copy.deepcopy(tied), x, repeats=1, fused=True)
            fused = tieify.fuse(fast, x)
            torch.testing.assert_close(_first(fused(x)), y, **TOL)
            return f"ok ({len(getattr(fused, 'fused', None) or [])} chains)"
        if function == "predict":
            seconds = tieify.predict_latency(tied, x, repeats=1)
            assert seconds > 0, seconds
            return f"ok ({seconds * 1e3:.1f} ms)"
    if function in ("export", "onnx"):
        if function == "onnx":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                return "skipped (onnxruntime not installed)"
        try:
            run = _export(tied, x) if function == "export" else _onnx(tied, x, work)
        except Exception:
            try:  # the same exporter on the dense model
                _export(model, x) if function == "export" else _onnx(model, x, work)
            except Exception as err:
                return f"dense fails too ({type(err).__name__})"
            raise
        with torch.no_grad():
            torch.testing.assert_close(_first(run(x)), y, **TOL)
            if function == "export":  # another batch size through the same program
                x3 = torch.cat([x, x[:1]])
                torch.testing.assert_close(_first(run(x3)), _first(tied(x3)), **TOL)
        return "ok"
    raise ValueError(f"unknown function {function!r}; choose from {FUNCTIONS + ('predict',)}")


def run_model(
    source: str, name: str, kwargs: dict, size: int, B: int, functions: list[str]
) -> dict:
    row: dict[str, Any] = {"family": source, "model": name, "input": size}
    try:
        torch.manual_seed(0)
        model = _build(source, name, kwargs).eval()
        x = torch.randn(2, 3, size, size)
        tied = tieify.tieify(model, B=B, example_inputs=x).eval()
        plan = tied.tieify_plan
        actions = Counter(lp.action for lp in plan.layers)
        row.update(
            tied=sum(v for k, v in actions.items() if k != "leave"),
            left=actions.get("leave", 0),
            traced=plan.traced,
            reasons=Counter(lp.reason.split(":")[0] for lp in plan.left()).most_common(3),
        )
        with torch.no_grad():
            y = _first(tied(x))
    except Exception as err:  # noqa: BLE001 - the point is to record every failure
        row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
        return row
    row["status"] = "ok"
    row["functions"] = {}
    for function in functions:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            try:
                result = check(function, model, tied, x, y, Path(work))
            except Exception as err:  # noqa: BLE001
                last = traceback.extract_tb(err.__traceback__)[-1]
                result = (
                    f"failed: {type(err).__name__}: {str(err).splitlines()[0][:240]} "
                    f"({Path(last.filename).name}:{last.lineno})"
                )
        row["functions"][function] = {
            "result": result,
            "seconds": round(time.perf_counter() - start, 2),
        }
    return row


def _results(rows: list[dict], starts: str | tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(model, function, result) of every check whose result begins with ``starts``."""
    return [
        (r["model"], f, v["result"])
        for r in rows
        for f, v in r.get("functions", {}).items()
        if v["result"].startswith(starts)
    ]


def markdown(res: dict) -> str:
    rows, functions = res["models"], res["functions"]
    failed = [r for r in rows if r["status"] == "failed"]
    broken = _results(rows, "failed")
    lines = [
        f"# Zoo coverage of tieify(model, B={res['B']}) and the public functions",
        "",
        f"{len(rows)} models ({len(failed)} failed to tie); functions checked on each: "
        f"{', '.join(functions)}; {len(broken)} function failure(s). tieify() on resnet152: "
        f"median of 5 = {res['resnet152_tieify_seconds_median_of_5']:.3f} s. torch "
        f"{res['torch']}, torchvision {res['torchvision']}, timm {res['timm']}. "
        f"{run_facts(res)}",
        "",
        "Each function cell: models where it worked / models checked; `n/a` counts the models "
        "where the dense model fails the same exporter too (a limit of the exporter on that "
        "architecture).",
        "",
    ]
    families: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        c = families[r["family"]]
        c["models"] += 1
        c["failed"] += r["status"] == "failed"
        c["tied"] += r.get("tied", 0)
        c["left"] += r.get("left", 0)
        c["untraced"] += r.get("traced") is False
        for f, v in r.get("functions", {}).items():
            c[f"{f} checked"] += 1
            c[f"{f} ok"] += v["result"].startswith("ok")
            c[f"{f} n/a"] += v["result"].startswith(NOT_APPLICABLE)

    def cell(c: Counter, f: str) -> str:
        text = f"{c[f + ' ok']}/{c[f + ' checked']}"
        return text + (f" ({c[f + ' n/a']} n/a)" if c[f + " n/a"] else "")

    header = ["family", "models", "layers tied", "layers left", "failed models", "untraced"]
    lines += table(
        header + list(functions),
        "lrrrrr" + "r" * len(functions),
        [
            [fam, c["models"], c["tied"], c["left"], c["failed"], c["untraced"]]
            + [cell(c, f) for f in functions]
            for fam, c in sorted(families.items())
        ],
    )
    if failed or broken:
        lines += ["", "Failures:", ""]
        lines += [f"- {r['model']}: tieify: {r['error']}" for r in failed]
        lines += [f"- {m}: {f}: {result}" for m, f, result in broken]
    na = _results(rows, NOT_APPLICABLE)
    if na:
        lines += ["", "Not applicable:", ""]
        lines += [f"- {m}: {f}: {result}" for m, f, result in na]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--B", type=int, default=4)
    p.add_argument(
        "--functions", nargs="+", default=list(FUNCTIONS), choices=FUNCTIONS + ("predict",)
    )
    p.add_argument("--predict", action="store_true", help="also check predict_latency")
    p.add_argument("--models", nargs="+", help="only these models (default: the whole zoo)")
    args = p.parse_args()
    functions = list(args.functions) + (["predict"] if args.predict else [])
    # optimize's choices and the latency table, timed here with one repeat, go to a cache of
    # this run's own, not the user's (where later runs would take them as measured)
    with tempfile.TemporaryDirectory(prefix="tieify-zoo-cache-") as cache:
        os.environ["TIEIFY_CACHE_DIR"] = cache
        res = run(args, functions)
    write_results(args.out, "zoo_coverage", res, markdown(res))


def run(args: argparse.Namespace, functions: list[str]) -> dict:
    """Every zoo model through ``functions``, then tieify()'s time on ResNet-152."""
    load_start = os.getloadavg()
    rows = []
    for source, name, kwargs, size in _torchvision_models() + _timm_models():
        if args.models and name not in args.models:
            continue
        row = run_model(source, name, kwargs, size, args.B, functions)
        rows.append(row)
        summary = {f: v["result"] for f, v in row.get("functions", {}).items()}
        print(name, row["status"], summary, flush=True)

    model = torchvision.models.resnet152()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        tieify.tieify(model, B=args.B)
        times.append(time.perf_counter() - start)
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    return {
        "B": args.B,
        "functions": functions,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm_version,
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "resnet152_tieify_seconds_median_of_5": statistics.median(times),
        "resnet152_tieify_seconds": times,
        "models": rows,
    }


if __name__ == "__main__":
    main()
