"""Validation shared by the tied layers: B, channel divisibility, input shapes."""

from __future__ import annotations

from .._errors import TieError


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_B(B: object, in_channels: int, out_channels: int, groups: int, layer: str) -> int:
    """Validate ``B`` for a layer and return it as an ``int``.

    The rule: ``B`` is a positive int and divides both ``in_channels / groups`` and
    ``out_channels / groups`` (every group is split into B tied blocks).

    Raises:
        TypeError: ``B`` is not an int.
        TieError: ``B`` < 1 or does not divide the channels of a group.
    """
    if isinstance(B, bool) or not isinstance(B, int):
        raise TypeError(
            f"{layer}: `B` must be a positive int, but got B={B!r} ({type(B).__name__}); "
            "pass an int such as B=4."
        )
    if B < 1:
        raise TieError(f"{layer}: `B` must be >= 1, but got B={B}; B=1 keeps the layer dense.")
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise TieError(
            f"{layer}: `groups` must divide in_channels and out_channels, but got "
            f"in_channels={in_channels}, out_channels={out_channels}, groups={groups}."
        )
    cin, cout = in_channels // groups, out_channels // groups
    if cin % B or cout % B:
        valid = sorted(set(divisors(cin)) & set(divisors(cout)))
        per_group = " per group" if groups > 1 else ""
        raise TieError(
            f"{layer}: `B` must divide the input and output channels{per_group}, but got B={B} "
            f"with in_channels={in_channels}, out_channels={out_channels}, groups={groups} "
            f"({cin} -> {cout} channels{per_group}); pick B in {valid}."
        )
    return B


def check_transfer(transfer: object) -> str | None:
    if transfer not in ("mean", None):
        raise ValueError(
            f"`transfer` must be 'mean' or None, but got transfer={transfer!r}; 'mean' keeps the "
            "least-squares projection of the dense weight, None initializes afresh."
        )
    return transfer  # type: ignore[return-value]
