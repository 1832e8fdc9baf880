"""A compact, deterministic training loop for the short fine-tunes of a search.

One function, :func:`fit`: SGD (Nesterov momentum) or AdamW, a per-step cosine schedule down
to zero, cross-entropy with optional label smoothing and optional knowledge distillation from
a teacher (the dense model): ``loss = (1-α)·CE + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``.
Seeds fix initialization-independent randomness (shuffling, dropout) so that the same
(model, data, config) gives the same weights on the same machine. A NaN or infinite loss
stops training with :class:`Diverged`, whose message says where.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from tieify.search._recipe import TrainConfig
    >>> ds = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    >>> net = torch.nn.Linear(4, 2)
    >>> r = fit(net, ds, ds, TrainConfig(epochs=1), batch_size=16)
    >>> 0.0 <= r.accuracy <= 1.0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._modes import eval_mode
from ._recipe import TrainConfig

__all__ = ["fit", "accuracy", "Diverged", "Pruned", "FitResult"]


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Pruned(RuntimeError):
    """The caller's ``report`` asked to stop (an Optuna pruner); carries the last accuracy."""

    def __init__(self, step: int, accuracy: float) -> None:
        super().__init__(f"pruned after epoch {step} at accuracy {accuracy:.4f}")
        self.step = step
        self.accuracy = accuracy


@dataclass
class FitResult:
    """Final validation top-1 accuracy (fraction), per-epoch history and step count."""

    accuracy: float
    history: list[float] = field(default_factory=list)
    steps: int = 0
    final_loss: float = float("nan")


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset[Any], batch_size: int = 256) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on ``data`` in eval mode.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> net = torch.nn.Linear(2, 2)
        >>> ds = TensorDataset(torch.eye(2), torch.tensor([0, 1]))
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
        >>> accuracy(net, ds)
        1.0
    """
    device = _device(model)
    correct = total = 0
    with eval_mode(model):
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            pred = model(x.to(device)).argmax(1)
            correct += int((pred == y.to(device)).sum())
            total += int(y.numel())
    return correct / max(total, 1)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.momentum > 0,
    )


def _loss(
    logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None, cfg: TrainConfig
) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None or cfg.kd_alpha == 0:
        return ce
    t = cfg.kd_temperature
    kd = F.kl_div(
        F.log_softmax(logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * t * t * kd


def fit(
    model: nn.Module,
    train: Dataset[Any],
    val: Dataset[Any],
    cfg: TrainConfig,
    *,
    batch_size: int = 64,
    epochs: int | None = None,
    teacher: nn.Module | None = None,
    report: Callable[[int, float], bool] | None = None,
) -> FitResult:
    """Train ``model`` in place, then return its validation accuracy.

    Args:
        model: The model to train (trained in place, left in eval mode).
        train: Training split yielding ``(image, label)``.
        val: Validation split.
        cfg: Optimizer, learning rate, schedule, smoothing, distillation, seed, threads.
        batch_size: Mini-batch size.
        epochs: Overrides ``cfg.epochs`` (e.g. for baseline pretraining).
        teacher: Dense model distilled from when ``cfg.kd_alpha > 0`` (kept frozen).
        report: Called after each epoch as ``report(epoch, accuracy)``; returning True stops
            training with :class:`Pruned`. When given, accuracy is evaluated every epoch.

    Returns:
        :class:`FitResult` with the final top-1 accuracy (fraction) on ``val``.

    Raises:
        Diverged: the loss became NaN or infinite (message names epoch and step).
        Pruned: ``report`` returned True.

    Example:
        See the module docstring.
    """
    n_epochs = cfg.epochs if epochs is None else epochs
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _fit(model, train, val, cfg, batch_size, n_epochs, teacher, report)
    finally:
        torch.set_num_threads(threads_before)


def _fit(
    model: nn.Module,
    train: Dataset[Any],
    val: Dataset[Any],
    cfg: TrainConfig,
    batch_size: int,
    n_epochs: int,
    teacher: nn.Module | None,
    report: Callable[[int, float], bool] | None,
) -> FitResult:
    torch.manual_seed(cfg.seed)
    device = _device(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
    per_epoch = len(loader)
    if cfg.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
    total = max(1, per_epoch * n_epochs)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    if teacher is not None:
        teacher.eval()
    use_teacher = teacher is not None and cfg.kd_alpha > 0
    result = FitResult(accuracy=float("nan"))
    step = 0
    for epoch in range(1, n_epochs + 1):
        model.train()
        for i, (x, y) in enumerate(loader):
            if i >= per_epoch:
                break
            x, y = x.to(device), y.to(device)
            t_logits = None
            if use_teacher:
                with torch.no_grad():
                    t_logits = teacher(x)  # type: ignore[misc]
            loss = _loss(model(x), y, t_logits, cfg)
            if not torch.isfinite(loss):
                raise Diverged(
                    f"diverged: training loss became {float(loss.detach())} at epoch {epoch}, step "
                    f"{i + 1} (lr={cfg.lr}); lower train.lr or check the data"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            result.final_loss = float(loss.detach())
        if report is not None or epoch == n_epochs:
            acc = accuracy(model, val)
            result.history.append(acc)
            if report is not None and report(epoch, acc) and epoch < n_epochs:
                raise Pruned(epoch, acc)
    model.eval()
    result.steps = step
    result.accuracy = accuracy(model, val) if n_epochs == 0 else result.history[-1]
    return result
