"""Latency model: lookup table, remainder, prediction arithmetic, on-disk cache."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import tieify
from tieify.latency import LatencyTable, _predict, _table, latency_breakdown, measure_latency
from tieify.nn import TiedConv2d


@pytest.fixture
def fake_timing(tmp_path, monkeypatch):
    """Deterministic 'timings': a layer costs its multiply-adds in µs; a model's end-to-end
    time is its layers' cost (times ``measure_latency.in_model``, 1 unless a test sets it)
    plus 100 µs; a layer stubbed out for the non-layer calibration costs nothing."""
    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path))
    calls = {"layers": 0, "models": 0}

    def layer_cost(module: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> float:
        if out is None:
            with torch.no_grad():
                out = module(x)
        k = 1
        for s in getattr(module, "kernel_size", (1,)):
            k *= s
        B = getattr(module, "B", 1)
        cin = getattr(module, "in_channels", getattr(module, "in_features", 1))
        groups = getattr(module, "groups", 1)
        return out.numel() * cin // (groups * B) * k * 1e-6

    def fake_time_module(module, x, *, threads=None, repeats=7):
        calls["layers"] += 1
        return layer_cost(module, x)

    def fake_measure(model, example_inputs, *, repeats=7, threads=None, min_seconds=0.0):
        calls["models"] += 1
        total = 0.0
        for m in model.modules():
            if _table.is_layer(m) and m is not model and "forward" not in m.__dict__:
                total += m._fake_cost * fake_measure.in_model  # _fake_cost: set by the test
        return total + 100e-6

    fake_measure.in_model = 1.0

    monkeypatch.setattr(_table, "time_module", fake_time_module)
    monkeypatch.setattr(_predict, "measure_latency", fake_measure)
    return calls, layer_cost


def net(B: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    convs = [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1)]
    if B:
        convs = [TiedConv2d.from_dense(c, B) for c in convs]
    return nn.Sequential(convs[0], nn.BatchNorm2d(16), nn.ReLU(), convs[1], nn.ReLU()).eval()


def attach_costs(model: nn.Module, x: torch.Tensor, layer_cost) -> None:
    def hook(m, args, out):
        m._fake_cost = layer_cost(m, args[0], out)

    hs = [m.register_forward_hook(hook) for m in model.modules() if _table.is_layer(m)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()


def test_prediction_is_table_plus_remainder(fake_timing):
    calls, layer_cost = fake_timing
    x = torch.randn(2, 8, 6, 6)
    dense, tied = net(), net(B=2)
    attach_costs(dense, x, layer_cost)
    table = LatencyTable()
    parts = latency_breakdown(dense, x, table=table)
    # Hand-computed MACs: conv 3×3 8→16 on 2×6×6: 2·16·36·8·9; conv 1×1 16→16: 2·16·36·16.
    mac0, mac1 = 2 * 16 * 36 * 8 * 9, 2 * 16 * 36 * 16
    assert parts["0"] == pytest.approx(mac0 * 1e-6)
    assert parts["3"] == pytest.approx(mac1 * 1e-6)
    assert parts["<remainder>"] == pytest.approx(100e-6)
    assert calls == {"layers": 2, "models": 2}  # the whole model and its layers stubbed
    # A plan of the same model: only the new (tied) layers are timed, the remainder is reused.
    predicted = tieify.predict_latency(tied, x, table=table)
    assert predicted == pytest.approx((mac0 + mac1) / 2 * 1e-6 + 100e-6)
    assert calls == {"layers": 4, "models": 2}
    # Warm table: nothing is measured again.
    assert tieify.predict_latency(tied, x, table=table) == pytest.approx(predicted)
    assert calls == {"layers": 4, "models": 2}


def test_layers_are_scaled_to_their_in_model_speed(fake_timing):
    """Layers that run 1.5× slower inside the model than alone: the calibration finds the
    scale from the stubbed run, and a plan's prediction sheds the overhead of the work it
    removes (an additive remainder would keep the dense model's whole overhead)."""
    calls, layer_cost = fake_timing
    _predict.measure_latency.in_model = 1.5
    x = torch.randn(2, 8, 6, 6)
    dense, tied = net(), net(B=2)
    attach_costs(dense, x, layer_cost)
    attach_costs(tied, x, layer_cost)
    mac0, mac1 = 2 * 16 * 36 * 8 * 9, 2 * 16 * 36 * 16
    table = LatencyTable()
    parts = latency_breakdown(dense, x, table=table)
    assert parts["0"] == pytest.approx(1.5 * mac0 * 1e-6)
    assert parts["3"] == pytest.approx(1.5 * mac1 * 1e-6)
    assert parts["<remainder>"] == pytest.approx(100e-6)
    predicted = tieify.predict_latency(tied, x, table=table)
    measured = _predict.measure_latency(tied, x)
    assert predicted == pytest.approx(1.5 * (mac0 + mac1) / 2 * 1e-6 + 100e-6)
    assert predicted == pytest.approx(measured)
    additive = (mac0 + mac1) / 2 * 1e-6 + 100e-6 + 0.5 * (mac0 + mac1) * 1e-6
    assert additive > 1.3 * measured


def test_a_model_that_cannot_be_stubbed_keeps_an_additive_remainder(fake_timing, monkeypatch):
    calls, layer_cost = fake_timing
    fake = _predict.measure_latency
    fake.in_model = 1.5

    def no_stubs(model, *args, **kwargs):
        if any("forward" in m.__dict__ for m in model.modules()):
            raise RuntimeError("this model reads its layers' outputs")
        return fake(model, *args, **kwargs)

    monkeypatch.setattr(_predict, "measure_latency", no_stubs)
    x = torch.randn(2, 8, 6, 6)
    dense = net()
    attach_costs(dense, x, layer_cost)
    parts = latency_breakdown(dense, x, table=LatencyTable())
    mac0, mac1 = 2 * 16 * 36 * 8 * 9, 2 * 16 * 36 * 16
    assert parts["0"] == pytest.approx(mac0 * 1e-6)  # scale 1
    assert parts["<remainder>"] == pytest.approx(0.5 * (mac0 + mac1) * 1e-6 + 100e-6)
    assert sum(parts.values()) == pytest.approx(fake(dense, x))
    assert all("forward" not in m.__dict__ for m in dense.modules())  # the stubs are gone


def test_table_persists_on_disk_and_keys_are_specific(fake_timing, tmp_path):
    calls, layer_cost = fake_timing
    x = torch.randn(1, 8, 6, 6)
    dense = net()
    attach_costs(dense, x, layer_cost)
    tieify.predict_latency(dense, x, table=LatencyTable())
    data = json.loads((tmp_path / "latency.json").read_text())
    keys = [json.loads(k) for k in data["entries"]]
    layer_keys = [k for k in keys if "op" in k]
    assert len(layer_keys) == 2 and len(keys) == 3  # 2 layers + 1 remainder
    k = layer_keys[0]
    assert set(k) == {"op", "input", "threads", "torch", "allocator", "machine"}
    assert k["machine"] == tieify.latency._machine.machine_key("cpu")
    assert k["input"]["layout"] == "contiguous" and k["input"]["dtype"] == "float32"
    assert k["input"]["shape"][0] == 1  # the batch is part of the key
    # A new table object (a new process) reads the entries back: no timing.
    before = dict(calls)
    tieify.predict_latency(dense, x, table=LatencyTable())
    assert calls == before
    # Another batch size is another key.
    x2 = torch.randn(3, 8, 6, 6)
    attach_costs(dense, x2, layer_cost)
    tieify.predict_latency(dense, x2, table=LatencyTable())
    assert calls["layers"] == before["layers"] + 2


def test_corrupted_latency_cache_is_rebuilt(fake_timing, tmp_path):
    calls, layer_cost = fake_timing
    (tmp_path / "latency.json").write_text("\x00garbage")
    x = torch.randn(1, 8, 6, 6)
    dense = net()
    attach_costs(dense, x, layer_cost)
    with pytest.warns(RuntimeWarning, match="corrupted"):
        tieify.predict_latency(dense, x, table=LatencyTable())
    assert json.loads((tmp_path / "latency.json").read_text())["version"] == 1


def test_model_is_left_as_it_was(fake_timing):
    _, layer_cost = fake_timing
    x = torch.randn(1, 8, 6, 6)
    model = net(B=2).train()
    attach_costs(model, x, layer_cost)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tieify.predict_latency(model, x, table=LatencyTable(persist=False))
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_plan_without_base_model_is_rejected():
    with pytest.raises(TypeError, match="no base model"):
        tieify.predict_latency({"layers": {}}, torch.randn(1, 3, 8, 8))


def test_plan_with_apply_is_applied(fake_timing):
    _, layer_cost = fake_timing
    x = torch.randn(1, 8, 6, 6)

    class FakePlan:
        def apply(self, model):
            tied = net(B=2)
            attach_costs(tied, x, layer_cost)
            return tied

    base = net()
    attach_costs(base, x, layer_cost)
    table = LatencyTable(persist=False)
    direct = tieify.predict_latency(net_with_costs := FakePlan().apply(base), x, table=table)
    assert net_with_costs is not base
    assert tieify.predict_latency(FakePlan(), x, model=base, table=table) == pytest.approx(direct)


def test_real_measurement_smoke(tmp_path, monkeypatch):
    """Real timers on a tiny model: positive numbers, no assertion on their size."""
    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path))
    x = torch.randn(1, 8, 6, 6)
    model = net(B=2)
    assert measure_latency(model, x, repeats=2) > 0
    parts = latency_breakdown(model, x, table=LatencyTable(), repeats=2)
    assert set(parts) == {"0", "3", "<remainder>"}
    assert all(v >= 0 for v in parts.values())


def test_stale_table_entries_are_timed_again(fake_timing):
    """Entries timed under a heavier load (layers alone slower than the whole model) are
    re-timed when a model structure is calibrated, instead of zeroing the remainder."""
    calls, layer_cost = fake_timing
    x = torch.randn(2, 8, 6, 6)
    dense = net()
    attach_costs(dense, x, layer_cost)
    table = LatencyTable()
    for name, layer in (("0", dense[0]), ("3", dense[3])):
        inp = x if name == "0" else torch.randn(2, 16, 6, 6)
        table.store.set(_table.layer_key(layer, inp), 50 * layer_cost(layer, inp))
    parts = latency_breakdown(dense, x, table=table)
    mac0, mac1 = 2 * 16 * 36 * 8 * 9, 2 * 16 * 36 * 16
    assert parts["0"] == pytest.approx(mac0 * 1e-6)
    assert parts["3"] == pytest.approx(mac1 * 1e-6)
    assert parts["<remainder>"] == pytest.approx(100e-6)
    assert calls == {"layers": 2, "models": 3}  # whole model twice (before/after), stubbed once


def test_table_key_names_the_path_that_runs():
    """A tied layer's entry is keyed by the forward it actually runs on that input, so a
    path rule that changes (or a pinned path) never reuses another path's time."""
    layer = TiedConv2d(16, 32, 3, padding=1, B=4)
    x = torch.randn(1, 16, 8, 8)
    xc = x.contiguous(memory_format=torch.channels_last)

    def path(layer, x):
        return json.loads(_table.layer_key(layer, x))["op"]["path"]

    assert path(layer, x) == "native"  # a small NCHW input
    assert path(layer, torch.randn(8, 16, 8, 8)) == "fold"  # a large one
    assert path(layer, xc) == "widen"
    assert path(layer, xc[0]) == "widen"  # an unbatched input is looked at as batched
    layer.path = "grouped"
    assert path(layer, xc) == "grouped"
    assert path(TiedConv2d(16, 32, 3, padding=1, B=1), xc) == "dense"


def test_rounds_extend_to_min_seconds_and_stop_at_the_cap():
    """A calibration median spans ``min_seconds`` of rounds, never more than 10× ``repeats``."""
    from tieify.latency._timing import interleaved_samples

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    assert [len(v) for v in interleaved_samples(fns, repeats=3).values()] == [3, 3]
    # Instant calls never span 100 s: the rounds stop at the cap, interleaved a, b, a, b, ...
    calls.clear()
    samples = interleaved_samples(fns, repeats=3, warmup=0, target_s=0.0, min_seconds=100.0)
    assert [len(v) for v in samples.values()] == [30, 30]
    assert calls[-60:] == ["a", "b"] * 30

    def slow() -> None:
        time.sleep(0.01)

    samples = interleaved_samples({"s": slow}, repeats=2, warmup=0, target_s=0.0, min_seconds=0.1)
    # Each round sleeps 10 ms, so 0.1 s needs more than the 2 requested rounds.
    assert 2 < len(samples["s"]) <= 20
    assert sum(samples["s"]) >= 0.1 - 0.01 * 2


def test_another_machine_measures_its_own_table_and_remainder(fake_timing, monkeypatch):
    """A cache directory shared with another machine serves it none of this one's entries:
    the machine (CPU model, instruction set, CPU count) is part of every key."""
    from tieify.latency import _machine, is_warm

    calls, layer_cost = fake_timing
    x = torch.randn(2, 8, 6, 6)
    dense = net()
    attach_costs(dense, x, layer_cost)
    latency_breakdown(dense, x, table=LatencyTable())
    assert calls == {"layers": 2, "models": 2}
    assert is_warm(dense, x, table=LatencyTable())  # this machine, read back from disk
    here = _machine.machine_key()
    monkeypatch.setattr(_machine, "_cpu_key", lambda: "Other CPU | x86_64 | AVX2 | 2 CPUs")
    table = LatencyTable()
    assert not is_warm(dense, x, table=table)
    assert table.lookup(dense[0], x, measure=False) is None
    latency_breakdown(dense, x, table=table)
    assert calls == {"layers": 4, "models": 4}  # both layers and the remainder again
    stored = json.loads((tieify.latency.cache_dir() / "latency.json").read_text())["entries"]
    machines = {json.loads(k)["machine"] for k in stored}
    assert machines == {here, "Other CPU | x86_64 | AVX2 | 2 CPUs"}


def test_is_warm_only_after_the_model_was_predicted(fake_timing):
    from tieify.latency import is_warm

    calls, layer_cost = fake_timing
    x = torch.randn(2, 8, 6, 6)
    dense, tied = net(), net(B=2)
    attach_costs(dense, x, layer_cost)
    table = LatencyTable()
    assert not is_warm(dense, x, table=table)
    assert calls == {"layers": 0, "models": 0}  # asking times nothing
    latency_breakdown(dense, x, table=table)
    assert is_warm(dense, x, table=table)
    assert not is_warm(dense, x, table=table, threads=torch.get_num_threads() + 1)
    assert not is_warm(dense, torch.randn(3, 8, 6, 6), table=table)  # another batch size
    assert not is_warm(tied, x, table=table)  # its tied layers have no entries yet
    assert is_warm(dense, x, table=LatencyTable()) is True  # read back from disk


def test_every_module_keeps_its_own_training_flag(fake_timing):
    """A training model with a frozen norm inside comes back exactly so from every timing
    entry point (``model.train(flag)`` would set one flag on all of them)."""
    calls, layer_cost = fake_timing
    model = net(B=2)
    model.train()
    model[1].eval()
    flags = [m.training for m in model.modules()]
    x = torch.randn(1, 8, 6, 6)
    attach_costs(model, x, layer_cost)
    tieify.predict_latency(model, x)
    assert [m.training for m in model.modules()] == flags
    tieify.optimize(model, x)
    assert [m.training for m in model.modules()] == flags
    measure_latency(model, x, repeats=1, warmup=0)
    assert [m.training for m in model.modules()] == flags
    assert tieify.count(model, x).macs > 0
    assert [m.training for m in model.modules()] == flags
