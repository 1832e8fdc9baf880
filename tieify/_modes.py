"""Eval mode for a look-only pass, with every module's own training flag put back after."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run the block with ``models`` in eval mode, then restore each submodule's flag.

    ``model.train(was_training)`` would not do: it sets one flag on every submodule, so a
    model in training mode with some modules kept in eval (frozen batch norms, a frozen
    backbone) would come back with all of them training.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
