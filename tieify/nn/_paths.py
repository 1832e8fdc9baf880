"""Forward paths of the tied convolutions.

Every path computes exactly the reference forward (the authors'): fold the B channel blocks
into the batch, ``(N, C, *S) -> (N·B, C/B, *S)``, run the thin convolution, unfold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._conv import _TiedConvNd

PATHS = ("fold",)


def fold_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """Reference path: channels folded into the batch around the thin convolution."""
    n = x.shape[0]
    B = layer.B
    y = layer.thin_conv(x.reshape(n * B, layer.in_channels // B, *x.shape[2:]))
    return y.reshape(n, layer.out_channels, *y.shape[2:])


def tied_conv_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` on ``x`` (already validated, batched) with the path it selects."""
    return fold_forward(layer, x)
