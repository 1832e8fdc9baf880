"""Named schedules for the seeds' architectures, usable with one flag.

:func:`get_preset` turns a preset name and a model into keyword arguments for
:func:`tieify.tieify` / :func:`tieify.plan` (exact per-layer mappings, so the result is
explicit and shows in the plan). Presets:

- ``tiedresnet-b2`` / ``-b4`` / ``-b8``: every 3×3 conv of the residual blocks tied with one B
  (1×1 convs, the stem and the head stay dense); ``tiedresnet`` uses B per stage 2/4/8/8.
- ``tiedse-b2`` / ``-b4`` / ``-b8`` (``tiedse`` = B 8, the paper's ~64× fewer SE weights):
  only squeeze-and-excitation (and CBAM channel-MLP) branches tied; ``tiedgc-b*`` /
  ``tiedgc``: only Global Context transforms.
- ``root-2`` … ``root-64`` (Deep Roots, DESIGN §2): the 3×3 convs of stages 1–4 grouped with
  G = N, N/2, N/4, N/8 (at least 1).
- ``{groups,B}-{root,column,tree}``: G (or B) as a function of depth over the spatial convs
  (groups) or all tieable layers (B): ``root`` goes from 8 down to 4, ``column`` stays 4,
  ``tree`` goes from 4 up to 8 (DESIGN §2: 1-8-4, 1-4-4, 1-4-8; the stem stays dense). A
  suffix ``-LO-HI`` changes the range (``B-tree-2-16``). Each value is the nearest valid one
  for the layer's channels.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn

__all__ = ["get_preset", "list_presets", "describe_preset"]

_ROOT_N = (2, 4, 8, 16, 32, 64)
_TOPO = re.compile(r"^(groups|B)-(root|column|tree)(?:-(\d+)-(\d+))?$")


def _descriptions() -> dict[str, str]:
    d: dict[str, str] = {}
    for b in (2, 4, 8):
        d[f"tiedresnet-b{b}"] = f"every residual-block 3x3 conv tied with B={b}"
        d[f"tiedse-b{b}"] = f"only SE / CBAM channel-attention layers tied with B={b}"
        d[f"tiedgc-b{b}"] = f"only Global Context transform convs tied with B={b}"
    d["tiedresnet"] = "residual-block 3x3 convs tied with B per stage 2/4/8/8"
    d["tiedse"] = "only SE / CBAM channel-attention layers tied with B=8 (~64x fewer weights)"
    d["tiedgc"] = "only Global Context transform convs tied with B=8"
    for n in _ROOT_N:
        gs = "/".join(str(max(1, n >> i)) for i in range(4))
        d[f"root-{n}"] = f"Deep Roots: stage 3x3 convs grouped {gs} (res2/res3/res4/res5)"
    for what in ("groups", "B"):
        d[f"{what}-root"] = f"{what} decreasing with depth, 8 -> 4 (suffix -LO-HI to change)"
        d[f"{what}-column"] = f"{what} constant 4 over depth"
        d[f"{what}-tree"] = f"{what} increasing with depth, 4 -> 8"
    return d


def list_presets() -> list[str]:
    """The preset names :func:`get_preset` accepts (parametric ``-LO-HI`` forms aside).

    Example:
        >>> "root-8" in list_presets() and "tiedse" in list_presets()
        True
    """
    return sorted(_descriptions())


def describe_preset(name: str) -> str:
    """One line describing a preset; raises KeyError for unknown names."""
    d = _descriptions()
    if name in d:
        return d[name]
    m = _TOPO.match(name)
    if m:
        return f"{m[1]} {m[2]} topology over depth from {m[3]} to {m[4]}"
    raise KeyError(_unknown(name))


def _unknown(name: str) -> str:
    return (
        f"unknown preset {name!r}; known presets: {', '.join(list_presets())} (and "
        "'{groups,B}-{root,column,tree}-LO-HI')"
    )


def _base_plan(model: nn.Module) -> Any:
    from ._api import plan

    return plan(model, B=None)


def _spatial(lp: Any) -> bool:
    return any(k > 1 for k in lp.kernel_size) and lp.kind in ("conv", "grouped_conv")


def _block_convs(model: nn.Module) -> list[Any]:
    """The 3×3 (spatial) convs inside stages: residual blocks' spatial convs."""
    return [
        lp
        for lp in _base_plan(model).layers
        if lp.tieable and _spatial(lp) and lp.stage is not None and lp.role is None
    ]


def _stage_index(layers: list[Any]) -> dict[str, int]:
    order: list[str] = []
    for lp in layers:
        if lp.stage not in order:
            order.append(lp.stage)
    return {s: i for i, s in enumerate(order)}


def _nearest(target: float, valid: list[int]) -> int | None:
    valid = [v for v in valid if v > 1] or valid
    if not valid:
        return None
    return min(valid, key=lambda v: (abs(math.log2(v) - math.log2(max(target, 1))), v))


def _topology(model: nn.Module, what: str, shape: str, lo: int, hi: int) -> dict[str, Any]:
    layers = [lp for lp in _base_plan(model).layers if lp.tieable and lp.role is None]
    if what == "groups":
        layers = [lp for lp in layers if _spatial(lp) and lp.orig_groups == 1]
    n = len(layers)
    mapping: dict[str, int | None] = {}
    for i, lp in enumerate(layers):
        t = i / (n - 1) if n > 1 else 0.0
        if shape == "column":
            target = float(lo)
        elif shape == "root":
            target = hi * (lo / hi) ** t
        else:
            target = lo * (hi / lo) ** t
        valid = lp.valid_groups() if what == "groups" else lp.valid_B()
        mapping[lp.name] = _nearest(target, valid)
    if not mapping:
        return {"B": None, "groups": None}
    return {"B": None, what: mapping} if what == "groups" else {"B": mapping}


def get_preset(name: str, model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for :func:`tieify.tieify` implementing the preset ``name``.

    Args:
        name: a name from :func:`list_presets` (or ``{groups,B}-{root,column,tree}-LO-HI``).
        model: the model the preset is for (traced to find its stages and branches).

    Returns:
        A dict with ``B`` (and ``groups``) as exact per-layer mappings.

    Raises:
        KeyError: unknown preset name (the message lists the known ones).

    Example:
        >>> import torchvision, tieify
        >>> model = torchvision.models.resnet50()
        >>> kw = get_preset("root-8", model)
        >>> kw["groups"]["layer1.0.conv2"], kw["groups"]["layer4.0.conv2"]
        (8, 1)
        >>> tied = tieify.tieify(model, **kw)
    """
    if not isinstance(name, str):
        raise KeyError(_unknown(repr(name)))
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_preset(): `model` must be an nn.Module, but got {type(model)}.")
    key = name.strip()
    m = re.match(r"^tiedresnet(?:-b(\d+))?$", key)
    if m:
        layers = _block_convs(model)
        stages = _stage_index(layers)
        sched = (2, 4, 8, 8)
        out: dict[str, int | None] = {}
        for lp in layers:
            b = int(m[1]) if m[1] else sched[min(stages[lp.stage], len(sched) - 1)]
            out[lp.name] = b if b in lp.valid_B() else _nearest(b, lp.valid_B())
        return {"B": out or None}
    m = re.match(r"^tied(se|gc)(?:-b(\d+))?$", key)
    if m:
        kinds = ("SE", "CBAM") if m[1] == "se" else ("GC",)
        b = int(m[2]) if m[2] else 8
        out = {
            lp.name: b for lp in _base_plan(model).layers if lp.attention in kinds and lp.tieable
        }
        return {"B": out or None}
    m = re.match(r"^root-(\d+)$", key)
    if m and int(m[1]) in _ROOT_N:
        n = int(m[1])
        layers = [lp for lp in _block_convs(model) if lp.orig_groups == 1]
        stages = _stage_index(layers)
        groups: dict[str, int | None] = {}
        for lp in layers:
            g = max(1, n >> min(stages[lp.stage], 3))
            groups[lp.name] = g if g in lp.valid_groups() else _nearest(g, lp.valid_groups())
        return {"B": None, "groups": groups or None}
    m = _TOPO.match(key)
    if m:
        lo = int(m[3]) if m[3] else 4
        hi = int(m[4]) if m[4] else 8
        if lo < 1 or hi < 1:
            raise KeyError(f"preset {name!r}: LO and HI must be >= 1.")
        return _topology(model, m[1], m[2], lo, hi)
    raise KeyError(_unknown(name))
