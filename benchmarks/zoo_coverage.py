"""Zoo coverage of ``tieify.tieify(model, B=4)``: tied / left / failed layers per model family.

Every torchvision classification model and the timm architectures of the test zoo
(``tests/test_zoo_timm.py``), built without weights, tied at B=4 with an example input, then
run forward once. Also times ``tieify.tieify`` on ResNet-152 (median of 5).

Usage::

    python benchmarks/zoo_coverage.py            # writes results/zoo_coverage.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torchvision

import tieify

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

SIZES = {"inception_v3": 299, "googlenet": 64}
FIXED_224 = ("vit_", "swin", "maxvit")


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


def _torchvision_models() -> list[tuple[str, str, torch.nn.Module, int]]:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--B", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for source, name, kwargs, size in _torchvision_models() + _timm_models():
        row = {"family": source, "model": name, "input": size}
        try:
            model = _build(source, name, kwargs).eval()
            x = torch.randn(1, 3, size, size)
            tied = tieify.tieify(model, B=args.B, example_inputs=x)
            plan = tied.tieify_plan
            actions = Counter(lp.action for lp in plan.layers)
            row.update(
                tied=sum(v for k, v in actions.items() if k != "leave"),
                left=actions.get("leave", 0),
                traced=plan.traced,
                reasons=Counter(lp.reason.split(":")[0] for lp in plan.left()).most_common(3),
            )
            with torch.no_grad():
                tied(x)
            row["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - the point is to record every failure
            row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
        rows.append(row)
        print(json.dumps(row), flush=True)

    model = torchvision.models.resnet152()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        tieify.tieify(model, B=args.B)
        times.append(time.perf_counter() - start)
    families: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        c = families[r["family"]]
        c["models"] += 1
        c["failed"] += r["status"] == "failed"
        c["tied"] += r.get("tied", 0)
        c["left"] += r.get("left", 0)
        c["untraced"] += r.get("traced") is False
    summary = {
        "B": args.B,
        "load_average_at_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "resnet152_tieify_seconds_median_of_5": statistics.median(times),
        "resnet152_tieify_seconds": times,
        "families": {k: dict(v) for k, v in sorted(families.items())},
        "models": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_coverage.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# Zoo coverage of tieify(model, B={args.B})",
        "",
        f"{len(rows)} models ({sum(r['status'] == 'failed' for r in rows)} failed); "
        f"tieify() on resnet152: median of 5 = {statistics.median(times):.3f} s "
        f"(load average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores).",
        "",
        "| family | models | layers tied | layers left | failed models | untraced |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for fam, c in sorted(families.items()):
        lines.append(
            f"| {fam} | {c['models']} | {c['tied']} | {c['left']} | {c['failed']} | "
            f"{c['untraced']} |"
        )
    (args.out / "zoo_coverage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
