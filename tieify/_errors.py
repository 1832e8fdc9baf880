"""tieify's exception hierarchy.

Every error names the rule that was broken, the values received and the fix, in the style
"`B` must divide in_channels / groups, but got B=3, in_channels=64, groups=1; pick B in
{1, 2, 4, 8, 16, 32, 64}.".
"""

from __future__ import annotations

__all__ = [
    "TieifyError",
    "TieError",
    "PlanError",
    "SpecError",
    "ModelResolveError",
    "RecipeError",
    "SearchError",
]


class TieifyError(Exception):
    """Base class of every error tieify raises on purpose."""


class TieError(TieifyError, ValueError):
    """A layer cannot be tied with the requested B (channel counts, layer kind)."""


class SpecError(TieifyError, ValueError):
    """A B / groups specification (int, pattern mapping, callable, CLI string) is malformed."""


class PlanError(TieifyError, ValueError):
    """A plan does not fit the model it is applied to, or its JSON is malformed."""


class ModelResolveError(TieifyError, ValueError):
    """A MODEL string (torchvision name, timm:NAME, module:factory, file.py:factory) is unknown."""


class RecipeError(TieifyError, ValueError):
    """A search recipe has an unknown key, a wrong type, an impossible budget or a missing path."""


class SearchError(TieifyError, RuntimeError):
    """A search could not run (no candidates, broken storage, missing optional backend)."""
