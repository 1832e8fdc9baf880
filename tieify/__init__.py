"""tieify: make PyTorch CNNs leaner by tying their filters.

Pipeline: trace -> plan -> apply -> count -> search (see tieify/README.md).

Example:
    >>> import torch, torchvision
    >>> from tieify import tieify, report
    >>> model = torchvision.models.resnet18()
    >>> tied = tieify(model, B=4)
    >>> print(report(model, tied, torch.randn(1, 3, 64, 64)))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import (
    ModelResolveError,
    PlanError,
    RecipeError,
    SearchError,
    SpecError,
    TieError,
    TieifyError,
)
from ._version import __version__
from .nn import TiedBlock, TiedConv1d, TiedConv2d, TiedConv3d, TiedLinear

# Public names that live in modules with heavier imports, loaded on first use.
_LAZY = {
    "tieify": "tieify._api",
    "plan": "tieify._api",
    "Plan": "tieify._plan",
    "LayerPlan": "tieify._plan",
    "report": "tieify._report",
    "Report": "tieify._report",
    "count": "tieify._count",
    "save": "tieify._io",
    "load": "tieify._io",
    "optimize": "tieify.latency",
    "fuse": "tieify._fuse",
    "predict_latency": "tieify.latency",
    "tune_allocator": "tieify.latency",
    "kernel_status": "tieify.nn._kernel",
    "search": "tieify.search",
}

__all__ = [
    "__version__",
    "TiedConv1d",
    "TiedConv2d",
    "TiedConv3d",
    "TiedLinear",
    "TiedBlock",
    "TieifyError",
    "TieError",
    "SpecError",
    "PlanError",
    "ModelResolveError",
    "RecipeError",
    "SearchError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tieify' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
