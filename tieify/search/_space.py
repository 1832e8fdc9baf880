"""Search spaces: functions from a model to decision variables, and back to a plan.

A :class:`Space` holds :class:`Decision` variables; each decision is one categorical choice
(a value of B, or of G for grouping) applied to a set of layers. Built-in spaces (``search_spaces/``
in the repository, package ``tieify.search_spaces``):

- ``uniform``: one B for every tieable layer;
- ``per_stage``: one B per stage; stages come from the model's structure (torchvision's
  ``layer1``..``layer4``, timm's ``stages.N``/``blocks.N``, ``features.N``); a model without
  any gets four stages by depth (quarters of its tieable layers, in order);
- ``per_layer``: one B per tieable layer;
- ``roots``: Deep Roots topologies over depth (``root`` decreasing from HI to LO, ``column``
  constant LO, ``tree`` increasing from LO to HI; ``tieify._presets``' schedules) with a
  ``LO-HI`` range, for B (every tieable layer but stem and head) or for G (the spatial
  convolutions, the "root modules").

Choices default to {1, 2, 4, 8} and are restricted per layer to values that divide its channels
per group (a per-stage or uniform decision keeps the values valid for *all* its layers; ``roots``
takes each layer's nearest valid value). A user space is a YAML file (``type: custom``
with explicit ``decisions``) or a Python callable ``module:function`` taking
``(layers, choices)`` and returning decisions; user decisions are taken as written, so a value
that does not fit a layer fails that trial with the reason.

Example:
    >>> import torch
    >>> from tieify.search._cifar_resnet import cifar_resnet
    >>> space = build_space("per_stage", cifar_resnet(), torch.randn(1, 3, 16, 16))
    >>> [d.name for d in space.decisions]
    ['B_layer1', 'B_layer2', 'B_layer3']
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._errors import RecipeError
from . import _packaged

__all__ = [
    "Layer",
    "Decision",
    "Space",
    "build_space",
    "discover_layers",
    "apply_assignment",
    "builtin_spaces",
    "TOPOLOGIES",
]

TOPOLOGIES = ("root", "column", "tree")
_STAGE_RE = re.compile(r"^((?:layer\d+|stages?\.\d+|blocks?\.\d+|features\.\d+|res\d+))(?:\.|$)")
_SPACE_KEYS = {"type", "name", "kind", "choices", "decisions", "topologies", "ranges", "kinds"}


@dataclass(frozen=True)
class Layer:
    """A layer a space can decide on (a convolution or linear layer that is not depthwise)."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    stage: str | None
    valid: tuple[int, ...]

    def fits(self, value: int) -> bool:
        """Whether ``value`` divides the channels per group on both sides."""
        return (self.in_channels // self.groups) % value == 0 and (
            self.out_channels // self.groups
        ) % value == 0


@dataclass(frozen=True)
class Decision:
    """One categorical variable: ``kind`` (``"B"`` or ``"groups"``) for ``layers``."""

    name: str
    choices: tuple[Any, ...]
    layers: tuple[str, ...] = ()
    kind: str = "B"


@dataclass(frozen=True)
class Space:
    """Decision variables over a model's layers; see the module docstring."""

    name: str
    layers: tuple[Layer, ...]
    decisions: tuple[Decision, ...]
    topology: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for every decision; returns ``{decision name: value}``."""
        return {d.name: trial.suggest_categorical(d.name, list(d.choices)) for d in self.decisions}

    def assignment(self, params: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
        """Per-layer ``(B, groups)`` factors (only values > 1) for a parameter dict."""
        if self.topology:
            return self._roots(params)
        bs: dict[str, int] = {}
        gs: dict[str, int] = {}
        for d in self.decisions:
            if d.name not in params:
                raise RecipeError(
                    f"parameters {dict(params)!r} lack the space's decision {d.name!r}; "
                    "they do not belong to this search space."
                )
            value = int(params[d.name])
            if value > 1:
                target = bs if d.kind == "B" else gs
                for layer in d.layers:
                    target[layer] = value
        return bs, gs

    def _roots(self, params: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
        topo, kind, rng = str(params["topology"]), str(params["kind"]), str(params["range"])
        cache = self.topology.setdefault("cache", {})
        key = (topo, kind, rng)
        if key not in cache:
            from .._presets import get_preset

            kwargs = get_preset(f"{kind}-{topo}-{rng}", self.topology["model"])
            mapping = kwargs.get(kind) or {}
            cache[key] = {k: int(v) for k, v in mapping.items() if v is not None and v > 1}
        out = dict(cache[key])
        return (out, {}) if kind == "B" else ({}, out)

    def describe(self, params: Mapping[str, Any]) -> str:
        """Short text for log lines: ``layer1=2 layer2=4 ...``."""
        return " ".join(f"{k.removeprefix('B_')}={v}" for k, v in params.items())


# --------------------------------------------------------------------------------------------
# Layers


def _stage_of(name: str) -> str | None:
    m = _STAGE_RE.match(name)
    return m.group(1) if m else None


def discover_layers(
    model: nn.Module, example_inputs: Any = None, choices: Iterable[int] = (1, 2, 4, 8)
) -> list[Layer]:
    """Convolutions and linear layers a space can tie, in module order, with valid choices.

    Depthwise convolutions (one channel per group) are skipped: there is nothing to tie.

    Example:
        >>> from torch import nn
        >>> [l.valid for l in discover_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 6)))]
        [(1,), (1, 2)]
    """
    del example_inputs  # module walk: shapes come from the layers themselves
    choices = sorted(set(int(c) for c in choices))
    layers: list[Layer] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            groups, cin, cout = m.groups, m.in_channels, m.out_channels
            if groups == cin and cin > 1:
                continue  # depthwise
            kind, k = "conv", tuple(m.kernel_size)
        elif isinstance(m, nn.Linear):
            groups, cin, cout, kind, k = 1, m.in_features, m.out_features, "linear", (1,)
        else:
            continue
        layer = Layer(name, kind, cin, cout, groups, k, _stage_of(name), ())
        valid = tuple(c for c in choices if layer.fits(c))
        layers.append(Layer(name, kind, cin, cout, groups, k, layer.stage, valid))
    if layers and not any(layer.stage for layer in layers):
        q = len(layers)
        layers = [
            dataclasses.replace(la, stage=f"depth{1 + (4 * i) // q}") for i, la in enumerate(layers)
        ]
    return layers


# --------------------------------------------------------------------------------------------
# Spaces


def _stage_decisions(layers: list[Layer], kind: str = "B") -> list[Decision]:
    stages: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.stage is not None:
            stages.setdefault(layer.stage, []).append(layer)
    out = []
    for stage, members in stages.items():
        common = set(members[0].valid).intersection(*(m.valid for m in members[1:]))
        if len(common) > 1:
            key = stage.replace(".", "_")
            out.append(Decision(f"B_{key}", tuple(sorted(common)), tuple(m.name for m in members)))
    return out


def _uniform(layers: list[Layer], choices: tuple[int, ...]) -> list[Decision]:
    tieable = [la for la in layers if len(la.valid) > 1 and la.stage is not None]
    if not tieable:
        return []
    common = set(tieable[0].valid).intersection(*(la.valid for la in tieable[1:]))
    if len(common) < 2:  # no single B fits all: tie each layer with the largest fitting value
        common = set(choices)
    return [Decision("B", tuple(sorted(common)), tuple(la.name for la in tieable))]


def _per_layer(layers: list[Layer]) -> list[Decision]:
    return [Decision(f"B_{la.name}", la.valid, (la.name,)) for la in layers if len(la.valid) > 1]


def _check_keys(raw: Mapping[str, Any], where: str) -> None:
    for key in raw:
        if key not in _SPACE_KEYS:
            raise RecipeError(
                f"unknown search-space key {key!r} in {where}; allowed keys: "
                f"{', '.join(sorted(_SPACE_KEYS))}."
            )


def _int_list(value: Any, key: str, where: str) -> tuple[int, ...]:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise RecipeError(
            f"search-space key {key!r} in {where} must be a non-empty list of integers >= 1, "
            f"but got {value!r}."
        )
    return tuple(sorted(set(value)))


def _custom(raw: Mapping[str, Any], layers: list[Layer], where: str) -> list[Decision]:
    decisions = raw.get("decisions")
    if not isinstance(decisions, list) or not decisions:
        raise RecipeError(
            f"search space {where} of type 'custom' needs 'decisions': a list of "
            "{name, layers: [glob, ...], choices: [...], kind: B|groups}."
        )
    default = _int_list(raw.get("choices", [1, 2, 4, 8]), "choices", where)
    return [_decision(item, layers, default, where) for item in decisions]


def _decision(item: Any, layers: list[Layer], default: tuple[int, ...], where: str) -> Decision:
    if isinstance(item, Decision):
        return item
    if not isinstance(item, Mapping) or "name" not in item:
        raise RecipeError(
            f"each decision in {where} must be a mapping with a 'name', got {item!r}."
        )
    extra = set(item) - {"name", "layers", "choices", "kind"}
    if extra:
        raise RecipeError(
            f"unknown decision key(s) {sorted(extra)} in {where}; allowed: name, layers, "
            "choices, kind."
        )
    kind = item.get("kind", "B")
    if kind not in ("B", "groups"):
        raise RecipeError(f"decision 'kind' in {where} must be B or groups, but got {kind!r}.")
    patterns = item.get("layers", ["*"])
    if isinstance(patterns, str):
        patterns = [patterns]
    names = tuple(
        la.name for la in layers if any(fnmatch.fnmatchcase(la.name, p) for p in patterns)
    )
    if not names:
        raise RecipeError(
            f"decision {item['name']!r} in {where}: layers {patterns!r} match no layer of the "
            f"model; layers: {', '.join(la.name for la in layers[:12])}"
            f"{' ...' if len(layers) > 12 else ''}."
        )
    choices = _int_list(item.get("choices", list(default)), "choices", where)
    return Decision(str(item["name"]), choices, names, kind)


def builtin_spaces() -> list[str]:
    """Names of the spaces shipped in ``tieify.search_spaces``."""
    return _packaged.names("tieify.search_spaces")


def _load_yaml(spec: str) -> tuple[dict[str, Any], str]:
    import yaml

    text = None
    if spec.endswith((".yaml", ".yml")) or os.path.sep in spec:
        path = Path(os.path.expanduser(spec))
        if not path.is_file():
            raise RecipeError(f"search space file {spec!r} does not exist.")
        text = path.read_text()
    else:
        text = _packaged.read("tieify.search_spaces", spec)
        if text is None:
            raise RecipeError(
                f"unknown search space {spec!r}; built-in spaces: {', '.join(builtin_spaces())}; "
                "or pass a YAML file or a Python callable 'module:function'."
            )
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"search space {spec!r} must be a YAML mapping, got {type(raw).__name__}."
        )
    return raw, repr(spec)


def _callable(spec: str) -> Callable[..., Any]:
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            mspec = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if mspec is None or mspec.loader is None:
                raise ImportError(f"cannot load {mod_name}")
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except (ImportError, OSError) as exc:
        raise RecipeError(
            f"search space {spec!r}: cannot import {mod_name!r} ({exc}); a callable space is "
            "'package.module:function' or 'file.py:function'."
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RecipeError(f"search space {spec!r}: {mod_name!r} has no callable {attr!r}.")
    return fn  # type: ignore[no-any-return]


def build_space(
    spec: str, model: nn.Module, example_inputs: Any = None, choices: Iterable[int] = (1, 2, 4, 8)
) -> Space:
    """Build a search space for ``model``.

    Args:
        spec: ``uniform``, ``per_stage``, ``per_layer``, ``roots``, another YAML name in
            ``tieify.search_spaces``, a YAML path, or ``module:function`` / ``file.py:function``
            (called as ``function(layers, choices)``, returning decisions as :class:`Decision`
            or mappings ``{name, layers, choices, kind}``, or a :class:`Space`).
        model: The dense model (not modified).
        example_inputs: An input batch (kept for spaces that need shapes).
        choices: Default values of B (the YAML's ``choices`` wins when it sets one).

    Raises:
        RecipeError: unknown space, malformed YAML, or a space with no decision.

    Example:
        >>> from tieify.search._cifar_resnet import cifar_resnet
        >>> build_space("uniform", cifar_resnet()).decisions[0].choices
        (1, 2, 4, 8)
    """
    choices = tuple(sorted(set(int(c) for c in choices)))
    if ":" in spec and not spec.endswith((".yaml", ".yml")) and not os.path.exists(spec):
        layers = discover_layers(model, example_inputs, choices)
        made = _callable(spec)(layers, choices)
        if isinstance(made, Space):
            return made
        decisions = [_decision(d, layers, choices, repr(spec)) for d in made]
        return _finish(Space(spec, tuple(layers), tuple(decisions)), spec)
    raw, where = _load_yaml(spec)
    _check_keys(raw, where)
    kind = raw.get("type", "custom")
    if "choices" in raw:
        choices = _int_list(raw["choices"], "choices", where)
    layers = discover_layers(model, example_inputs, choices)
    name = str(raw.get("name", spec))
    if kind == "uniform":
        decisions = _uniform(layers, choices)
    elif kind == "per_stage":
        decisions = _stage_decisions(layers)
    elif kind == "per_layer":
        decisions = _per_layer(layers)
    elif kind == "roots":
        return _roots_space(raw, name, layers, where, model)
    elif kind == "custom":
        decisions = _custom(raw, layers, where)
    else:
        raise RecipeError(
            f"search-space key 'type' in {where} must be one of uniform, per_stage, per_layer, "
            f"roots, custom, but got {kind!r}."
        )
    return _finish(Space(name, tuple(layers), tuple(decisions)), spec)


def _roots_space(
    raw: Mapping[str, Any], name: str, layers: list[Layer], where: str, model: nn.Module
) -> Space:
    topologies = tuple(raw.get("topologies", TOPOLOGIES))
    bad = [t for t in topologies if t not in TOPOLOGIES]
    if bad or not topologies:
        raise RecipeError(
            f"search-space key 'topologies' in {where} must list values of "
            f"{', '.join(TOPOLOGIES)}, but got {list(topologies)!r}."
        )
    ranges = tuple(str(r) for r in raw.get("ranges", ["2-8", "4-8", "2-4"]))
    for r in ranges:
        m = re.fullmatch(r"(\d+)-(\d+)", r)
        if m is None or not 1 <= int(m[1]) <= int(m[2]):
            raise RecipeError(
                f"search-space key 'ranges' in {where} must list 'LO-HI' strings with "
                f"1 <= LO <= HI (e.g. '2-8'), but got {r!r}."
            )
    kinds = tuple(raw.get("kinds", ["B", "groups"]))
    if not kinds or any(k not in ("B", "groups") for k in kinds):
        raise RecipeError(
            f"search-space key 'kinds' in {where} must list B and/or groups, got {list(kinds)!r}."
        )
    decisions = (
        Decision("topology", topologies),
        Decision("kind", kinds),
        Decision("range", ranges),
    )
    space = Space(name, tuple(layers), decisions, topology={"model": model})
    return _finish(space, name)


def _finish(space: Space, spec: str) -> Space:
    if not space.decisions:
        shown = ", ".join(f"{la.name}{list(la.valid)}" for la in space.layers[:8])
        raise RecipeError(
            f"search space {spec!r} has no decision for this model: no layer accepts a value "
            f"other than 1 (layers: {shown}{' ...' if len(space.layers) > 8 else ''}); pick "
            "another space or choices."
        )
    return space


# --------------------------------------------------------------------------------------------
# From an assignment to a model, through tieify's planner


def apply_assignment(
    model: nn.Module,
    bs: Mapping[str, int],
    gs: Mapping[str, int] | None = None,
    example_inputs: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rewrite a copy of ``model`` with per-layer B (and G) factors; returns (model, plan dict).

    The factors become exact-name patterns for :func:`tieify.plan` (``strict=True``, so a
    factor that does not fit its layer raises instead of leaving the layer); the plan dict is
    ``Plan.to_json()`` and replays with ``Plan.from_json(...).apply(model)`` (:func:`replay`).

    Raises:
        TieError / PlanError: a factor does not fit a layer.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))
        >>> tied, plan = apply_assignment(net, {"1": 2})
        >>> type(tied[1]).__name__, tied[1].B
        ('TiedConv2d', 2)
    """
    from .._api import plan as make_plan

    kwargs: dict[str, Any] = {"example_inputs": example_inputs, "strict": True}
    kwargs["B"] = {**{_escape(k): int(v) for k, v in bs.items()}, "*": None}
    if gs:
        kwargs["groups"] = {**{_escape(k): int(v) for k, v in gs.items()}, "*": None}
    plan = make_plan(model, **kwargs)
    return plan.apply(model), json.loads(plan.to_json())


def _escape(name: str) -> str:
    """A glob pattern matching exactly ``name`` (``[``, ``]``, ``*``, ``?`` escaped)."""
    return re.sub(r"([\[\]\*\?])", r"[\1]", name)


def replay(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """Apply a stored plan dict (``best_plan.json``) to a copy of ``model``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))
        >>> _, plan = apply_assignment(net, {"1": 4})
        >>> replay(net, plan)[1].B
        4
    """
    from .._plan import Plan

    return Plan.from_dict(dict(plan)).apply(model)
