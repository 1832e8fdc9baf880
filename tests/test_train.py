"""The compact training loop: determinism, learning, divergence, pruning, distillation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tieify.search._recipe import TrainConfig
from tieify.search._train import Diverged, Pruned, accuracy, fit


def _data(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_learns_a_separable_problem() -> None:
    ds = _data()
    net = _net()
    before = accuracy(net, ds)
    r = fit(net, ds, ds, TrainConfig(epochs=8, lr=0.1), batch_size=16)
    assert r.accuracy >= 0.9 > before
    assert r.steps == 8 * 8
    assert len(r.history) == 1 and r.history[-1] == r.accuracy


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_deterministic_given_seed(opt: str) -> None:
    ds = _data()
    cfg = TrainConfig(epochs=2, optimizer=opt, lr=0.01, label_smoothing=0.1, seed=3)
    a, b = _net(), _net()
    fit(a, ds, ds, cfg, batch_size=16)
    fit(b, ds, ds, cfg, batch_size=16)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_max_steps_per_epoch() -> None:
    r = fit(_net(), _data(), _data(), TrainConfig(epochs=3, max_steps_per_epoch=2), batch_size=16)
    assert r.steps == 6


def test_nan_loss_is_reported_as_divergence() -> None:
    with pytest.raises(Diverged, match="diverged: training loss became (nan|inf).*epoch 1"):
        fit(_net(), _data(), _data(), TrainConfig(epochs=3, lr=1e12, momentum=0.0), batch_size=16)


def test_report_can_prune() -> None:
    seen = []

    def report(step: int, acc: float) -> bool:
        seen.append((step, acc))
        return step == 2

    with pytest.raises(Pruned) as info:
        fit(_net(), _data(), _data(), TrainConfig(epochs=4), batch_size=16, report=report)
    assert [s for s, _ in seen] == [1, 2]
    assert info.value.step == 2 and info.value.accuracy == seen[-1][1]


def test_distillation_pulls_towards_teacher() -> None:
    ds = _data()
    teacher = _net()
    fit(teacher, ds, ds, TrainConfig(epochs=8, lr=0.1), batch_size=16)
    x = ds.tensors[0]
    plain, distilled = _net(), _net()
    fit(plain, ds, ds, TrainConfig(epochs=1, lr=0.05), batch_size=16)
    kd = TrainConfig(epochs=1, lr=0.05, kd_alpha=1.0, kd_temperature=2.0)
    fit(distilled, ds, ds, kd, batch_size=16, teacher=teacher)
    with torch.no_grad():
        t = teacher(x).softmax(1)
        gap_plain = (plain(x).softmax(1) - t).abs().mean()
        gap_kd = (distilled(x).softmax(1) - t).abs().mean()
    assert gap_kd < gap_plain
