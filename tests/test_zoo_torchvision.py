"""tieify() over every torchvision classification model (weights=None, batch 1, small inputs).

Each model: the tied model's output shape equals the original's, backward reaches the tied
weights, every tied layer computes exactly its dense form (``to_dense()``; TiedBlock: its
``blockwise_forward``) on the activations it really sees, parameters strictly drop whenever
something was tied, ``tieify.save`` / ``tieify.load`` give back the same outputs, and ``B=1``
gives outputs equal to the original's. (The other public functions over the whole zoo:
``python benchmarks/zoo_coverage.py``.)

Input sizes: 64×64 by default; inception_v3 needs at least 75 (80 used); MaxViT has a fixed
224×224 input; a ViT's is fixed when it is built, here at the smallest multiple of its patch
of at least 112 (:func:`vit_size`: the same layers on a quarter of the tokens; vit_h_14's
test took 52 s at 224 on a 2-vCPU Zen 1 EPYC). No model is excluded; the largest ones (over
100 M parameters, or a 224 input with many layers) are marked ``slow``.

Zoo coverage (tied / left / failed per family): ``python tests/test_zoo_torchvision.py``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import tieify
from tieify.nn import TIED_TYPES, TiedBlock

MODELS = torchvision.models.list_models(module=torchvision.models)
SIZES = {"inception_v3": 80, "maxvit_t": 224}
SLOW = {
    "regnet_y_128gf",
    "regnet_y_32gf",
    "regnet_x_32gf",
    "regnet_y_16gf",
    "regnet_x_16gf",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "vit_b_16",
    "vit_b_32",
    "maxvit_t",
    "convnext_large",
    "convnext_base",
    "efficientnet_b7",
    "efficientnet_b6",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "resnext101_64x4d",
    "resnext101_32x8d",
    "wide_resnet101_2",
    "vgg19_bn",
    "vgg19",
    "vgg16_bn",
    "vgg16",
    "vgg13_bn",
    "vgg13",
    "swin_v2_b",
    "swin_b",
    "densenet161",
    "densenet201",
    "resnet152",
    "swin_s",
    "swin_v2_s",
    "efficientnet_b5",
}


def vit_size(name: str) -> int:
    """The image size the tests build a ViT for: the smallest multiple of its patch (the
    name's last number: vit_h_14 -> 14) of at least 112, so that the patches tile it."""
    patch = int(name.rsplit("_", 1)[1])
    return -(-112 // patch) * patch


def input_size(name: str) -> int:
    if name.startswith("vit_"):
        return vit_size(name)
    return SIZES.get(name, 64)


def build_kwargs(name: str) -> dict[str, Any]:
    """Factory arguments: init_weights=False skips scipy's slow truncated-normal init for
    googlenet and inception_v3 (their aux heads stay; eval mode does not call them, and they
    are left with a reason); a ViT is built for :func:`vit_size`."""
    if name in ("googlenet", "inception_v3"):
        return {"init_weights": False}
    if name.startswith("vit_"):
        return {"image_size": vit_size(name)}
    return {}


def family(name: str) -> str:
    """``resnet50`` -> ``resnet``, ``efficientnet_v2_s`` -> ``efficientnet``."""
    return re.split(r"[_\d]", name.replace("timm:", ""), maxsplit=1)[0] or name


def n_params(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    return _first_tensor(out[0])


def check_model(model: nn.Module, x: torch.Tensor, B: int = 4, **kw: Any) -> tieify.Plan:
    """The zoo contract; returns the plan. ``model`` must be in eval mode."""
    # (storage, version counter) of every tensor: any in-place change bumps the counter
    state = {k: (v.data_ptr(), v._version) for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(x)
    tied = tieify.tieify(model, B=B, **kw)
    plan = tied.tieify_plan
    originals = {id(m) for m in model.modules()}
    assert not any(id(m) in originals for m in tied.modules())

    # forward, capturing every tied layer's real input
    seen: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    hooks = []
    for name, m in tied.named_modules():
        if isinstance(m, TIED_TYPES):

            def hook(mod: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
                seen.setdefault(name, (mod, args[0].detach()))

            hooks.append(m.register_forward_hook(hook))
    y = tied(x)
    for h in hooks:
        h.remove()
    out0, out = _first_tensor(y0), _first_tensor(y)
    assert out.shape == out0.shape

    # backward reaches the tied weights
    out.float().square().mean().backward()
    tied_params = [m.weight for m in tied.modules() if isinstance(m, TIED_TYPES)]
    assert all(w.grad is not None for w in tied_params)

    # every tied layer is its dense form on the activations it sees
    with torch.no_grad():
        for name, (m, inp) in seen.items():
            if isinstance(m, TiedBlock):
                ref = m.blockwise_forward(inp)
            else:
                ref = m.to_dense()(inp)
            torch.testing.assert_close(m(inp), ref, rtol=1e-4, atol=1e-4, msg=name)

    # parameters drop strictly whenever something was tied
    if plan.tied():
        assert tied_params, "plan ties layers but the model has no tied module"
        assert n_params(tied) < n_params(model)
    else:
        assert n_params(tied) == n_params(model)

    # save / load: the plan replayed on the architecture, with the saved weights, computes
    # the same outputs (each module's state-dict version travels too: MNASNet needs it)
    with tempfile.TemporaryDirectory() as work:
        again = tieify.load(model, tieify.save(tied, Path(work) / "tied.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(_first_tensor(again(x)), _first_tensor(tied(x)), rtol=0, atol=0)

    # B=1 keeps the outputs; the original is untouched
    same = tieify.tieify(model, B=1)
    with torch.no_grad():
        torch.testing.assert_close(_first_tensor(same(x)), out0)
    assert {k: (v.data_ptr(), v._version) for k, v in model.state_dict().items()} == state
    return plan


def _params(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("name", _params(MODELS))
def test_torchvision_model(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **build_kwargs(name)).eval()
    s = input_size(name)
    plan = check_model(model, torch.randn(1, 3, s, s))
    assert plan.traced, plan.notes
    assert plan.tied(), f"{name}: nothing tied"
    for lp in plan.left():
        assert lp.reason, f"{name}: {lp.name} left without a reason"


def coverage(names: list[str], build: Any, size: Any) -> dict[str, dict[str, int]]:
    """Tied / left layers and failed models per family (used by ``__main__``)."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name in names:
        fam = family(name)
        row = table[fam]
        row["models"] += 1
        try:
            model = build(name).eval()
            p = tieify.plan(model, B=4)
            row["tied"] += len(p.tied())
            row["left"] += len(p.left())
            row["untraced"] += int(not p.traced)
            s = size(name)
            with torch.no_grad():
                p.apply(model)(torch.randn(1, 3, s, s))
        except Exception as err:  # report, keep going
            row["failed"] += 1
            print(f"FAILED {name}: {type(err).__name__}: {err}", file=sys.stderr)
    return {k: dict(v) for k, v in table.items()}


def print_coverage(table: dict[str, dict[str, int]]) -> None:
    print("| family | models | tied layers | left layers | untraced | failed |")
    print("|---|---|---|---|---|---|")
    for fam, r in sorted(table.items()):
        print(
            f"| {fam} | {r.get('models', 0)} | {r.get('tied', 0)} | {r.get('left', 0)} "
            f"| {r.get('untraced', 0)} | {r.get('failed', 0)} |"
        )


if __name__ == "__main__":
    print_coverage(
        coverage(
            MODELS,
            lambda n: torchvision.models.get_model(n, weights=None, **build_kwargs(n)),
            input_size,
        )
    )
