"""Tied layers: TBC (:class:`TiedConv1d`/``2d``/``3d``, with ``groups`` TGC), TFC
(:class:`TiedLinear`) and :class:`TiedBlock` for modules whose own forward must be kept."""

from ._block import TiedBlock
from ._conv import TiedConv1d, TiedConv2d, TiedConv3d
from ._linear import TiedLinear

TIED_TYPES = (TiedConv1d, TiedConv2d, TiedConv3d, TiedLinear, TiedBlock)

__all__ = ["TiedConv1d", "TiedConv2d", "TiedConv3d", "TiedLinear", "TiedBlock", "TIED_TYPES"]
