"""Weight maths between a dense (or grouped) layer and its tied form.

Channel layout (the reference fold's): a tied layer with B blocks and G groups is a dense
layer with ``G·B`` groups. Sub-block ``k = b·G + g`` (block ``b`` of the input/output channels,
group ``g`` inside that block) uses filter bank ``g`` of the shared weight. Every sub-block lies
inside one of the original ``G`` groups (sub-block ``k`` sits in original group ``k // B`` at
position ``k % B``), so B applies inside the groups.
"""

from __future__ import annotations

from typing import Any

import torch


def expand_weight(weight: torch.Tensor, B: int) -> torch.Tensor:
    """Dense weight of the equivalent ``G·B``-group conv: ``weight`` repeated B times on dim 0."""
    return weight.repeat(B, *([1] * (weight.dim() - 1)))


def expand_bias(bias: torch.Tensor | None, B: int) -> torch.Tensor | None:
    return None if bias is None else bias.repeat(B)


def expand_linear_weight(weight: torch.Tensor, B: int) -> torch.Tensor:
    """Block-diagonal ``(C_out, C_in)`` weight with ``weight`` on every diagonal block."""
    return torch.block_diag(*([weight] * B))


def scatter_blocks(grouped: torch.Tensor, B: int, groups: int) -> torch.Tensor:
    """Inverse of :func:`diagonal_blocks` for a ``G·B``-group weight ``(C_out, C_in/(G·B), *k)``:
    the ``G``-group weight ``(C_out, C_in/G, *k)`` with those blocks on the diagonal of each
    group and zeros elsewhere."""
    c_out, ci = grouped.shape[:2]
    k = tuple(grouped.shape[2:])
    gb = groups * B
    co = c_out // gb
    out = grouped.new_zeros(gb, co, B, ci, *k)
    idx = torch.arange(gb, device=grouped.device)
    out[idx, :, idx % B] = grouped.reshape(gb, co, ci, *k)
    return out.reshape(c_out, B * ci, *k)


def block_diagonal_weight(weight: torch.Tensor, B: int, groups: int) -> torch.Tensor:
    """The ``groups``-group weight of the convolution a tied bank ``weight`` was tied from:
    the bank on the B diagonal blocks of each group, zeros elsewhere."""
    return scatter_blocks(expand_weight(weight, B), B, groups)


def diagonal_blocks(weight: torch.Tensor, B: int, groups: int) -> torch.Tensor:
    """The ``G·B`` diagonal sub-blocks of a dense conv weight, shaped ``(B, G, co, ci, *k)``.

    Args:
        weight: dense weight ``(C_out, C_in / groups, *k)`` (a Linear weight is ``k = ()``).
        B: blocks per group.
        groups: the dense layer's groups ``G``.
    """
    c_out, c_in_g = weight.shape[:2]
    k = tuple(weight.shape[2:])
    gb = groups * B
    co, ci = c_out // gb, c_in_g // B
    w = weight.reshape(gb, co, B, ci, *k)
    idx = torch.arange(gb, device=weight.device)
    blocks = w[idx, :, idx % B]  # (gb, co, ci, *k): sub-block k sits at position k % B
    return blocks.reshape(B, groups, co, ci, *k)


def mean_transfer_weight(weight: torch.Tensor, B: int, groups: int = 1) -> torch.Tensor:
    """Least-squares tied weight ``(C_out/B, C_in/(B·G), *k)``: the mean of the tied blocks."""
    blocks = diagonal_blocks(weight, B, groups)  # (B, G, co, ci, *k)
    mean = blocks.mean(dim=0)
    return mean.reshape(mean.shape[0] * mean.shape[1], *mean.shape[2:])


def mean_transfer_bias(bias: torch.Tensor, B: int) -> torch.Tensor:
    """Least-squares tied bias ``(C_out/B,)``: the mean of the B output blocks."""
    return bias.reshape(B, -1).mean(dim=0)


def fold_channels(t: torch.Tensor, B: int) -> torch.Tensor:
    """Mean over B blocks of a per-output-channel tensor whose dim 0 is ``C_out``."""
    return t.reshape(B, t.shape[0] // B, *t.shape[1:]).mean(dim=0)


def load_like(layer: Any, weight: torch.Tensor | None, bias: torch.Tensor | None, like: Any) -> Any:
    """Copy ``weight``/``bias`` (when given) into ``layer`` and take ``like``'s flags.

    The flags are the weight's and bias's ``requires_grad`` and the train/eval mode, so a
    layer built from another (tied from dense, or dense from tied) behaves like it.
    """
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(weight)
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(like.weight.requires_grad)
    if layer.bias is not None and like.bias is not None:
        layer.bias.requires_grad_(like.bias.requires_grad)
    return layer.train(like.training)
