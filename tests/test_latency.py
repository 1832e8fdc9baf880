"""Latency model: lookup table, remainder, prediction arithmetic, on-disk cache."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import tieify
from tieify.latency import (
    LatencyTable,
    _predict,
    _table,
    _timing,
    latency_breakdown,
    measure_latency,
)
from tieify.nn import TiedConv2d, _kernel, _paths


@pytest.fixture
def fake_timing(tmp_path, monkeypatch):
    """Deterministic 'timings': a layer costs its multiply-adds in µs on its own; inside a
    model it costs that times ``measure_latency.in_model`` plus ``measure_latency.per_call``
    seconds (1 and 0 unless a test sets them), a layer stubbed out for the calibration costs
    nothing, and the rest of the model costs 100 µs."""
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

    def fake_time_modules(items, *, threads=None, repeats=7):
        calls["layers"] += len(items)
        return {key: layer_cost(module, x) for key, (module, x) in items.items()}

    def model_time(model: nn.Module, x: torch.Tensor) -> float:
        total = [100e-6]

        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if "forward" not in m.__dict__:  # a stub costs nothing
                total.append(layer_cost(m, args[0], out) * fake_measure.in_model)
                total.append(fake_measure.per_call)

        layers = [m for m in model.modules() if _table.is_layer(m) and m is not model]
        hs = [m.register_forward_hook(hook) for m in layers]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hs:
                h.remove()
        return sum(total)

    def fake_measure(model, example_inputs, **kwargs):
        calls["models"] += 1
        return model_time(model, example_inputs)

    def fake_side_by_side(models, example_inputs, **kwargs):
        calls["models"] += len(models)
        return {name: [model_time(m, example_inputs)] for name, m in models.items()}

    fake_measure.in_model = 1.0
    fake_measure.per_call = 0.0

    monkeypatch.setattr(_table, "time_modules", fake_time_modules)
    monkeypatch.setattr(_predict, "measure_latency", fake_measure)
    monkeypatch.setattr(_predict, "measure_side_by_side", fake_side_by_side)
    return calls, layer_cost


def net(B: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    convs = [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1)]
    if B:
        convs = [TiedConv2d.from_dense(c, B) for c in convs]
    return nn.Sequential(convs[0], nn.BatchNorm2d(16), nn.ReLU(), convs[1], nn.ReLU()).eval()


def test_prediction_is_table_plus_remainder(fake_timing):
    calls, layer_cost = fake_timing
    x = torch.randn(2, 8, 6, 6)
    dense, tied = net(), net(B=2)
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


def test_inputs_made_channels_last_at_the_entry_calibrate_their_own_remainder(
    fake_timing, monkeypatch
):
    """``tieify.optimize`` may make a model's inputs channels-last as it is called
    (``add_entry``): its modules between the layers then run in another layout, at another
    speed (NCHW pooling 13x slower on the Zen 5 EPYC), so that model's remainder is its own,
    not the one calibrated on the model as given."""
    from tieify.latency._optimize import add_entry, has_entry

    calls, layer_cost = fake_timing
    timed = _predict.measure_side_by_side

    def slower_nchw(models, example_inputs, **kwargs):  # 50 µs more without the entry
        samples = timed(models, example_inputs, **kwargs)
        return {n: [t + 50e-6 * (not has_entry(models[n])) for t in s] for n, s in samples.items()}

    monkeypatch.setattr(_predict, "measure_side_by_side", slower_nchw)
    x = torch.randn(2, 8, 6, 6)
    plain, entered = net(), net()
    add_entry(entered)
    mac0, mac1 = 2 * 16 * 36 * 8 * 9, 2 * 16 * 36 * 16
    table = LatencyTable()
    assert tieify.predict_latency(plain, x, table=table) == pytest.approx(
        (mac0 + mac1) * 1e-6 + 150e-6
    )
    assert tieify.predict_latency(entered, x, table=table) == pytest.approx(
        (mac0 + mac1) * 1e-6 + 100e-6
    )
    assert calls["models"] == 4  # two calibrations, each a model and its tied variant


def test_a_model_that_cannot_be_stubbed_keeps_an_additive_remainder(fake_timing, monkeypatch):
    calls, layer_cost = fake_timing
    fake = _predict.measure_latency
    fake.in_model = 1.5
    side_by_side = _predict.measure_side_by_side

    def no_stubs(models, *args, **kwargs):
        if any("forward" in m.__dict__ for model in models.values() for m in model.modules()):
            raise RuntimeError("this model reads its layers' outputs")
        return side_by_side(models, *args, **kwargs)

    monkeypatch.setattr(_predict, "measure_side_by_side", no_stubs)
    x = torch.randn(2, 8, 6, 6)
    dense = net()
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
    tieify.predict_latency(dense, x, table=LatencyTable())
    data = json.loads((tmp_path / "latency.json").read_text())
    keys = [json.loads(k) for k in data["entries"]]
    layer_keys = [k for k in keys if "op" in k]
    assert len(layer_keys) == 2 and len(keys) == 3  # 2 layers + 1 remainder
    k = layer_keys[0]
    assert set(k) == {"op", "input", "threads", "torch", "tieify", "allocator", "machine"}
    assert k["tieify"] == tieify.__version__
    assert k["machine"] == tieify.latency._machine.machine_key("cpu")
    assert k["input"]["layout"] == "contiguous" and k["input"]["dtype"] == "float32"
    assert k["input"]["shape"][0] == 1  # the batch is part of the key
    # A new table object (a new process) reads the entries back: no timing.
    before = dict(calls)
    tieify.predict_latency(dense, x, table=LatencyTable())
    assert calls == before
    # Another batch size is another key.
    x2 = torch.randn(3, 8, 6, 6)
    tieify.predict_latency(dense, x2, table=LatencyTable())
    assert calls["layers"] == before["layers"] + 2


def test_corrupted_latency_cache_is_rebuilt(fake_timing, tmp_path):
    calls, layer_cost = fake_timing
    (tmp_path / "latency.json").write_text("\x00garbage")
    x = torch.randn(1, 8, 6, 6)
    dense = net()
    with pytest.warns(RuntimeWarning, match="corrupted"):
        tieify.predict_latency(dense, x, table=LatencyTable())
    assert json.loads((tmp_path / "latency.json").read_text())["version"] == 1


def test_model_is_left_as_it_was(fake_timing):
    _, layer_cost = fake_timing
    x = torch.randn(1, 8, 6, 6)
    model = net(B=2).train()
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
            return tied

    base = net()
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

    assert path(layer, torch.randn(2, 16, 8, 8)) == "native"  # a small NCHW input
    expected = "kernel" if _kernel.kernel_available() else "native"
    assert path(layer, x) == expected  # at a batch of one, tieify's kernel where it is built
    assert path(layer, torch.randn(8, 16, 8, 8)) == "fold"  # a large one
    # Channels-last: widen, but at a batch of one tieify's kernel where it is built. The key
    # names the path of an inference forward even where the layer is in training mode (where
    # the rule for training would leave the kernel).
    assert layer.training and torch.is_grad_enabled()
    with torch.no_grad():
        one = _paths.select_path(layer, xc)
    assert one in ("kernel", "widen") and path(layer, xc) == one
    assert path(layer, xc[0]) == one  # an unbatched input is looked at as batched
    two = torch.cat([xc, xc]).contiguous(memory_format=torch.channels_last)
    assert path(layer, two) == "widen"
    # The kernel's build is part of the key of an entry that runs it, of no other.
    built = json.loads(_table.layer_key(layer, xc)).get("kernel")
    assert built == (_kernel.kernel_build() if one == "kernel" else None)
    assert "kernel" not in json.loads(_table.layer_key(layer, two))
    layer.path = "grouped"
    assert path(layer, xc) == "grouped"
    assert path(TiedConv2d(16, 32, 3, padding=1, B=1), xc) == "dense"


def test_rounds_extend_to_min_seconds_and_stop_at_the_cap():
    """Rounds span ``min_seconds``, never more than 10× ``repeats`` unless ``max_rounds`` says
    otherwise."""
    from tieify.latency._timing import interleaved_samples

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    assert [len(v) for v in interleaved_samples(fns, repeats=3).values()] == [3, 3]
    # Instant calls never span 100 s: the rounds stop at the cap, interleaved a, b, a, b, ...
    calls.clear()
    samples = interleaved_samples(fns, repeats=3, warmup=0, target_s=0.0, min_seconds=100.0)
    assert [len(v) for v in samples.values()] == [30, 30]
    assert calls[-60:] == ["a", "b"] * 30
    samples = interleaved_samples(
        fns, repeats=3, warmup=0, target_s=0.0, min_seconds=100.0, max_rounds=50
    )
    assert [len(v) for v in samples.values()] == [50, 50]

    def slow() -> None:
        time.sleep(0.01)

    samples = interleaved_samples({"s": slow}, repeats=2, warmup=0, target_s=0.0, min_seconds=0.1)
    # Each round sleeps 10 ms, so 0.1 s needs more than the 2 requested rounds.
    assert 2 < len(samples["s"]) <= 20
    assert sum(samples["s"]) >= 0.1 - 0.01 * 2


def test_interleaved_medians_or_each_candidates_fastest_round(monkeypatch):
    """The median of each candidate's rounds, or with ``best`` its fastest round: a loaded
    stretch that slows both alike moves their medians together, not their minimums."""
    rounds = {"fused": [3.4, 16.9, 17.2, 17.1, 3.5], "separate": [5.2, 16.5, 16.7, 16.6, 5.0]}
    monkeypatch.setattr(_timing, "interleaved_samples", lambda *args: rounds)
    fns = dict.fromkeys(rounds, lambda: None)
    assert _timing.interleaved_medians(fns) == {"fused": 16.9, "separate": 16.5}
    assert _timing.interleaved_medians(fns, best=True) == {"fused": 3.4, "separate": 5.0}


def test_another_machine_measures_its_own_table_and_remainder(fake_timing, monkeypatch):
    """A cache directory shared with another machine serves it none of this one's entries:
    the machine (CPU model, instruction set, CPU count) is part of every key."""
    from tieify.latency import _machine, is_warm

    calls, layer_cost = fake_timing
    x = torch.randn(2, 8, 6, 6)
    dense = net()
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
    tieify.predict_latency(model, x)
    assert [m.training for m in model.modules()] == flags
    tieify.optimize(model, x)
    assert [m.training for m in model.modules()] == flags
    measure_latency(model, x, repeats=1, warmup=0)
    assert [m.training for m in model.modules()] == flags
    assert tieify.count(model, x).macs > 0
    assert [m.training for m in model.modules()] == flags


def deep_net() -> nn.Module:
    """A stem, three middle convs tieify ties at B = 4 by default, and a last conv it leaves."""
    torch.manual_seed(0)
    chans = [(3, 8), (8, 32), (32, 32), (32, 32), (32, 8)]
    layers: list[nn.Module] = []
    for cin, cout in chans:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


# Hand-computed MACs of deep_net at 1×3×6×6 (36 positions, 3×3 kernels), per conv.
DEEP_MACS = [36 * 8 * 3 * 9, 36 * 32 * 8 * 9, 36 * 32 * 32 * 9, 36 * 32 * 32 * 9, 36 * 8 * 32 * 9]


def test_two_point_calibration_recovers_a_per_call_cost(fake_timing):
    """Inside the model each layer call costs 50 ms more than alone whatever its work, and
    its work 1.2×: the line through the model and its variant tied at B = 4 recovers both, so
    a plan's prediction is exact, where the stubbed one-point line (through the model with
    its layers stubbed out) spreads the per-call cost over the work and under-predicts."""
    calls, _ = fake_timing
    fake = _predict.measure_latency
    fake.in_model, fake.per_call = 1.2, 0.05
    x = torch.randn(1, 3, 6, 6)
    dense = deep_net()
    table = LatencyTable()
    parts = latency_breakdown(dense, x, table=table)
    # The dense model's four layer configurations (its two 32→32 convs share one entry), then
    # the variant's two new ones (8→32 and 32→32 at B = 4); model and variant timed side by
    # side, and no stubbed run.
    assert calls == {"layers": 6, "models": 2}
    assert parts["<remainder>"] == pytest.approx(100e-6 + 5 * 0.05)
    assert [parts[str(2 * i)] for i in range(5)] == pytest.approx(
        [1.2 * m * 1e-6 for m in DEEP_MACS]
    )
    plan = tieify.tieify(dense, B=2)
    predicted = tieify.predict_latency(plan, x, table=table)
    plan_macs = [DEEP_MACS[0], *(m // 2 for m in DEEP_MACS[1:4]), DEEP_MACS[4]]
    assert predicted == pytest.approx(100e-6 + 5 * 0.05 + 1.2 * sum(plan_macs) * 1e-6)
    assert predicted == pytest.approx(fake(plan, x))
    # The stubbed one-point line on the same dense time: 14% under.
    dense_time = fake(dense, x)
    stubbed_scale = (dense_time - 100e-6) / (sum(DEEP_MACS) * 1e-6)
    stubbed = 100e-6 + stubbed_scale * sum(plan_macs) * 1e-6
    assert stubbed < 0.9 * predicted


def test_an_implausible_line_falls_back_to_the_stubbed_calibration(fake_timing):
    """A line whose intercept would be negative (layer calls cheaper in the model than alone
    by a fixed amount) is rejected; the stubbed run calibrates instead."""
    calls, _ = fake_timing
    fake = _predict.measure_latency
    fake.in_model, fake.per_call = 1.5, -0.001
    x = torch.randn(1, 3, 6, 6)
    parts = latency_breakdown(deep_net(), x, table=LatencyTable())
    assert calls == {"layers": 6, "models": 3}  # model and variant, then the stubbed model
    assert parts["<remainder>"] == pytest.approx(100e-6)
    assert sum(parts.values()) == pytest.approx(fake(deep_net(), x))


def test_a_variant_that_does_not_run_falls_back_to_the_stubbed_calibration(
    fake_timing, monkeypatch
):
    calls, _ = fake_timing
    real = _predict._traced_layers

    def variant_fails(model, example_inputs):
        if any(isinstance(m, TiedConv2d) for m in model.modules()):
            raise RuntimeError("the variant's forward failed")
        return real(model, example_inputs)

    monkeypatch.setattr(_predict, "_traced_layers", variant_fails)
    x = torch.randn(1, 3, 6, 6)
    parts = latency_breakdown(deep_net(), x, table=LatencyTable())
    assert calls == {"layers": 4, "models": 2}  # the model alone, then the stubbed model
    assert parts["<remainder>"] == pytest.approx(100e-6)


class Logged(nn.Module):
    """The identity, noting its name in ``order`` at every call."""

    def __init__(self, name: str, order: list[str]) -> None:
        super().__init__()
        self.name, self.order = name, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.order.append(self.name)
        return x


def test_entries_are_timed_together_in_interleaved_rounds_spread_over_time(monkeypatch):
    """Layers timed together share every round (A B A B ...), and the rounds are spread over
    ``min_seconds`` by waits between them, so that all entries see the same phases of a
    shared machine; each entry is its fastest round."""
    order: list[str] = []
    waits: list[float] = []
    monkeypatch.setattr(_timing, "calibrate_iters", lambda *args: 1)
    monkeypatch.setattr(_timing.time, "sleep", waits.append)
    x = torch.randn(1, 4, 3, 3)
    items = {"k1": (Logged("a", order), x), "k2": (Logged("b", order), x)}
    seconds = _table.time_modules(items, repeats=5, min_seconds=1.0)
    assert set(seconds) == {"k1", "k2"} and all(0 < s < 1 for s in seconds.values())
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 5  # warm-up, then 5 rounds
    # Round r waits until r / 5 of the second (the sleeps here return at once).
    assert waits[0] == 0.002
    assert waits[1:] == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=0.05)


def test_calibration_runs_back_to_back_rounds_until_its_span_has_passed(monkeypatch):
    """The remainder's end-to-end times are each model's fastest of interleaved rounds run
    back to back (no waits: a model is timed warm, as plans are measured) for at least
    ``CALIBRATION_SECONDS`` and at least ``CALIBRATION_ROUNDS`` rounds, however many rounds
    that takes (on a fake clock: each call takes 1/16 s)."""
    monkeypatch.setattr(_predict, "CALIBRATION_SECONDS", 40.0)  # longer than 10 × 24 rounds
    clock = [0.0]
    order: list[str] = []

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return clock[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            raise AssertionError(f"the calibration waited {seconds} s between rounds")

    class Ticking(Logged):
        def __init__(self, name: str, seconds: float = 0.0625) -> None:
            super().__init__(name, order)
            self.seconds = seconds

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            clock[0] += self.seconds
            return super().forward(x)

    monkeypatch.setattr(_timing, "time", FakeTime)
    monkeypatch.setattr(_timing, "calibrate_iters", lambda *args: 1)
    models = {"model": Ticking("m"), "variant": Ticking("v")}
    totals = _predict._calibration_totals(models, torch.randn(1, 4, 3, 3), repeats=7)
    assert totals == {"model": 0.0625, "variant": 0.0625}
    # Warm-up (two calls each), then rounds of 1/8 s until 40 s have passed: 320 rounds,
    # more than the ten times the requested rounds that bound other timings.
    span = _predict.CALIBRATION_SECONDS
    rounds = round(span / 0.125)
    assert rounds > 10 * _predict.CALIBRATION_ROUNDS
    assert order == ["m", "m", "v", "v"] + ["m", "v"] * rounds
    # A model slower than the span still gets CALIBRATION_ROUNDS rounds, no more.
    order.clear()
    _predict._calibration_totals({"model": Ticking("s", 2.0)}, torch.randn(1, 4, 3, 3), 7)
    assert len(order) == 2 + _predict.CALIBRATION_ROUNDS

    # The fastest round, not the median: a model slowed to 1/4 s in every round but its
    # sixth (its eighth call, after the two warm-up calls).
    class Slowed(Ticking):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seconds = 0.03125 if len(order) == 7 else 0.25
            return super().forward(x)

    order.clear()
    assert _predict._calibration_totals({"model": Slowed("f")}, torch.randn(1, 4, 3, 3), 7) == {
        "model": 0.03125
    }


def test_entries_timed_together_share_inputs_within_a_memory_bound(monkeypatch):
    """Layers on equal input shapes share one random input; inputs beyond
    ``MAX_INPUT_BYTES`` are timed in another group (and one input larger than the bound
    still gets its own)."""
    a, c = torch.randn(1, 8, 6, 6), torch.randn(1, 8, 36, 1)  # equal bytes, other shapes
    d, big = torch.randn(1, 8, 1, 36), torch.randn(1, 8, 12, 12)
    monkeypatch.setattr(_table, "MAX_INPUT_BYTES", 2 * a.numel() * a.element_size())
    conv = nn.Identity()
    items = {
        "k1": (conv, a),
        "k2": (conv, torch.randn(1, 8, 6, 6)),
        "k3": (conv, c),
        "k4": (conv, d),
        "k5": (conv, a),
        "k6": (conv, big),
    }
    assert [list(g) for g in _table._groups(items)] == [["k1", "k2", "k3"], ["k4", "k5"], ["k6"]]
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(_timing, "calibrate_iters", lambda *args: 1)
    monkeypatch.setattr(_timing.time, "sleep", lambda s: None)

    class Record(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x

    rec = Record()
    _table.time_modules({k: (rec, x) for k, (_, x) in items.items()}, repeats=1)
    inputs = {id(t) for t in seen}
    assert len(inputs) == 5  # k1 and k2 share one; k5 (again a's shape) is in another group
    assert all(t is not a for t in seen)  # random inputs, not the caller's tensors


def test_a_prediction_times_its_missing_entries_in_one_batch(fake_timing, monkeypatch):
    """All layer configurations a model is missing are timed in one call (each distinct
    configuration once); a warm table times none."""
    calls, layer_cost = fake_timing
    batches: list[list[str]] = []
    fake = _table.time_modules

    def recording(items, **kwargs):
        batches.append(list(items))
        return fake(items, **kwargs)

    monkeypatch.setattr(_table, "time_modules", recording)
    torch.manual_seed(0)
    twin = [nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]  # three equal configurations
    model = nn.Sequential(*twin, nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 8, 6, 6)
    table = LatencyTable()
    values = table.lookup_many([(m, x) for m in twin], measure=False)
    assert values == [None, None, None] and batches == []
    latency_breakdown(model, x, table=table)
    # One batch: the model's two distinct configurations and the one its calibration variant
    # adds (the middle convs tied at B = 4; tieify keeps the first and the last layer dense).
    assert [len(b) for b in batches] == [3]
    assert {json.loads(k)["op"].get("B", 1) for k in batches[0]} == {1, 4}
    entries = table.lookup_many([(m, x) for m in twin])
    assert entries[0] == entries[1] == entries[2] == pytest.approx(layer_cost(twin[0], x))
    before = len(batches)
    latency_breakdown(model, x, table=table)
    assert len(batches) == before  # warm: nothing timed


def test_measured_latency_is_the_fastest_round_or_the_median(monkeypatch):
    """``measure_latency`` reads the fastest of its rounds (what ``predict_latency``
    predicts), the median round on request, and names the choices for anything else."""
    rounds = {"model": [0.031, 0.012, 0.030, 0.011, 0.029]}
    seen = []

    def fake(models, x, **kwargs):
        seen.append(kwargs)
        return rounds

    monkeypatch.setattr(_predict, "measure_side_by_side", fake)
    x = torch.randn(1, 4)
    assert measure_latency(nn.Linear(4, 4), x, repeats=5) == 0.011
    assert measure_latency(nn.Linear(4, 4), x, repeats=5, statistic="median") == 0.029
    assert seen[0]["repeats"] == 5
    with pytest.raises(ValueError, match=r"statistic must be one of 'best', 'median'.*'mean'"):
        measure_latency(nn.Linear(4, 4), x, statistic="mean")
    assert len(seen) == 2  # a bad statistic is refused before anything is timed
