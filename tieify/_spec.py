"""Resolution of ``B`` / ``groups`` specifications and ``include`` / ``exclude`` patterns.

A specification is one of:

- an ``int``: the value for every layer it applies to;
- a mapping from glob patterns over qualified module names (``fnmatch`` syntax, where ``*``
  also matches dots) to an ``int`` or ``None`` (``None`` = leave the layer);
- a callable ``(name, module) -> int | None``;
- ``None``: leave every layer (the default for ``groups``).

**Most specific wins.** When several patterns of a mapping match a name, the winner is, in
order: an exact name (no wildcard) over any glob; then the pattern with more literal
(non-wildcard) characters; then the one with fewer wildcards; then the one written first.
So ``{"layer4.*": 8, "layer4.0.conv2": 2, "*": 4}`` gives ``layer4.0.conv2`` B=2, every
other ``layer4`` layer B=8 and the rest B=4.

A layer is *named explicitly* when a callable returned a value for it, or when the winning
pattern holds at least one literal character (``"fc"``, ``"classifier.*"``; not ``"*"``).
Only explicitly named stems, classifier heads and 1×1 convs (for ``groups``) are changed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import SpecError

__all__ = ["Spec", "Match", "Patterns", "nearest"]

_WILDCARDS = "*?["


@dataclass(frozen=True)
class Match:
    """The outcome of looking a layer up in a :class:`Spec`.

    Attributes:
        matched: whether the spec says anything about the layer.
        value: the int it gives, or None (leave).
        explicit: whether the layer was named explicitly (see module docstring).
        source: what decided: ``"int"``, ``"pattern 'layer4.*'"``, ``"callable"``, ``"None"``.
    """

    matched: bool
    value: int | None
    explicit: bool
    source: str


def _literal_chars(pattern: str) -> int:
    n, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            j = pattern.find("]", i + 1)
            i = len(pattern) if j < 0 else j + 1
            continue
        if c not in "*?":
            n += 1
        i += 1
    return n


def _specificity(pattern: str, index: int) -> tuple[int, int, int, int]:
    exact = not any(c in pattern for c in _WILDCARDS)
    wild = sum(pattern.count(c) for c in _WILDCARDS)
    return (int(exact), _literal_chars(pattern), -wild, -index)


def _check_value(value: object, what: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(
            f"`{what}` values must be positive ints or None, but {where} is {value!r} "
            f"({type(value).__name__}); e.g. {what}={{'layer4.*': 8, '*': 4}}."
        )
    if value < 1:
        raise SpecError(
            f"`{what}` values must be >= 1, but {where} is {value}; use 1 (or None) to leave a "
            "layer unchanged."
        )
    return value


class Spec:
    """A validated ``B`` / ``groups`` specification.

    Args:
        spec: an int, a pattern mapping, a callable or None (see module docstring).
        what: the argument name, for error messages (``"B"``, ``"groups"``).

    Example:
        >>> s = Spec({"layer4.*": 8, "layer4.0.conv2": 2, "*": 4}, "B")
        >>> [s.lookup(n, None).value for n in ("layer4.0.conv2", "layer4.1.conv1", "fc")]
        [2, 8, 4]
    """

    def __init__(self, spec: Any, what: str = "B") -> None:
        self.what = what
        self.raw = spec
        self._int: int | None = None
        self._patterns: list[tuple[str, int | None, tuple[int, int, int, int]]] = []
        self._fn: Callable[[str, Any], Any] | None = None
        if spec is None:
            self.kind = "none"
        elif isinstance(spec, bool):
            raise SpecError(
                f"`{what}` must be an int, a mapping of patterns, a callable or None, but got "
                f"{spec!r}; e.g. {what}=4."
            )
        elif isinstance(spec, int):
            self.kind = "int"
            self._int = _check_value(spec, what, f"{what}={spec!r}")
        elif isinstance(spec, Mapping):
            self.kind = "mapping"
            if not spec:
                raise SpecError(
                    f"`{what}` mapping is empty; give at least one pattern, e.g. {{'*': 4}}."
                )
            for i, (pattern, value) in enumerate(spec.items()):
                if not isinstance(pattern, str) or not pattern:
                    raise SpecError(
                        f"`{what}` mapping keys must be non-empty glob patterns (str), but got "
                        f"{pattern!r}; e.g. {{'layer4.*': 8}}."
                    )
                v = _check_value(value, what, f"the value of {pattern!r}")
                self._patterns.append((pattern, v, _specificity(pattern, i)))
        elif callable(spec):
            self.kind = "callable"
            self._fn = spec
        else:
            raise SpecError(
                f"`{what}` must be an int, a mapping of glob patterns to ints, a callable "
                f"(name, module) -> int | None, or None, but got {type(spec).__name__} "
                f"{spec!r}; e.g. {what}={{'layer4.*': 8, '*': 4}}."
            )

    def lookup(self, name: str, module: Any) -> Match:
        """What the spec gives the layer ``name`` (``module`` is passed to callables)."""
        if self.kind == "none":
            return Match(False, None, False, "None")
        if self.kind == "int":
            return Match(True, self._int, False, "int")
        if self.kind == "callable":
            assert self._fn is not None  # set with kind (internal invariant)
            try:
                value = self._fn(name, module)
            except Exception as err:
                raise SpecError(
                    f"the `{self.what}` callable raised {type(err).__name__}: {err} for layer "
                    f"{name!r}; it must return an int or None for every layer name."
                ) from err
            v = _check_value(value, self.what, f"the callable's result for {name!r}")
            return Match(True, v, v is not None, "callable")
        best: tuple[str, int | None, tuple[int, int, int, int]] | None = None
        for pattern, value, key in self._patterns:
            if fnmatch.fnmatchcase(name, pattern) and (best is None or key > best[2]):
                best = (pattern, value, key)
        if best is None:
            return Match(False, None, False, "no pattern")
        pattern, value, key = best
        return Match(True, value, key[1] > 0, f"pattern {pattern!r}")

    def patterns(self) -> list[str]:
        """The mapping's patterns (empty for other kinds)."""
        return [p for p, _, _ in self._patterns]


class Patterns:
    """``include`` / ``exclude``: a glob pattern or an iterable of them (None = no filter).

    Example:
        >>> Patterns(["layer*", "fc"], "include").first_match("layer1.0.conv1")
        'layer*'
    """

    def __init__(self, patterns: str | Iterable[str] | None, what: str) -> None:
        self.what = what
        if patterns is None:
            self.items: tuple[str, ...] | None = None
            return
        items = (patterns,) if isinstance(patterns, str) else patterns
        try:
            items = tuple(items)
        except TypeError:
            raise SpecError(
                f"`{what}` must be a glob pattern or a list of them, but got "
                f"{type(patterns).__name__} {patterns!r}; e.g. {what}=['layer4.*']."
            ) from None
        for p in items:
            if not isinstance(p, str) or not p:
                raise SpecError(
                    f"`{what}` patterns must be non-empty strings, but got {p!r}; "
                    f"e.g. {what}=['layer4.*']."
                )
        self.items = items

    def first_match(self, name: str) -> str | None:
        if self.items is None:
            return None
        for p in self.items:
            if fnmatch.fnmatchcase(name, p):
                return p
        return None


def nearest(value: int, valid: list[int]) -> int:
    """The element of ``valid`` closest to ``value`` (the smaller one on a tie).

    Example:
        >>> nearest(4, [1, 2, 3, 6])
        3
    """
    if not valid:
        raise ValueError("nearest(): no valid values")
    return min(valid, key=lambda v: (abs(v - value), v))
