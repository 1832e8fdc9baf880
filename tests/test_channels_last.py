"""Tied convolutions that run in channels-last whatever their input's layout, and
``tieify.optimize``'s choice of that layout for models run on NCHW inputs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import tieify
from tieify.latency import _optimize, _table
from tieify.latency._cache import JsonCache
from tieify.nn import TiedConv1d, TiedConv2d, TiedConv3d, _kernel, _paths

CL = torch.channels_last


class LayoutTimer:
    """Deterministic timings by candidate name (1.0 s unless given); records each call's
    candidates."""

    def __init__(self, times: dict[str, float]) -> None:
        self.times = times
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, fns, **kwargs):
        self.calls.append(tuple(fns))
        for fn in fns.values():  # the candidates must run
            fn()
        return {name: self.times.get(name, 1.0) for name in fns}

    def layout_calls(self) -> int:
        return sum(names[:2] == ("input", "channels_last") for names in self.calls)


@pytest.fixture
def cache_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("paths.json"))
    return tmp_path


def classifier() -> nn.Module:
    """Tied convs on an NCHW image, pooled to a 2-D output (its layout is not a question)."""
    torch.manual_seed(0)
    return nn.Sequential(
        TiedConv2d(8, 16, 1, B=4),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        TiedConv2d(16, 16, 3, padding=1, B=2),
        TiedConv2d(16, 32, 3, stride=2, padding=1, B=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


class ViewNet(nn.Module):
    """A hand-written net that flattens a feature map with ``view``: NCHW memory only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = TiedConv2d(8, 16, 3, padding=1, B=2)
        self.fc = nn.Linear(16 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.shape[0], -1))


def tied_convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (TiedConv2d, TiedConv3d))]


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: TiedConv2d(16, 32, 1, B=4), (2, 16, 7, 9)),
        (lambda: TiedConv2d(16, 32, 1, stride=2, B=8), (2, 16, 9, 9)),
        (lambda: TiedConv2d(16, 16, 3, padding=1, B=2), (3, 16, 8, 6)),
        (lambda: TiedConv2d(16, 32, 3, stride=2, padding=1, groups=2, B=2), (1, 16, 9, 9)),
        (lambda: TiedConv3d(8, 16, 3, padding=1, B=2), (2, 8, 4, 5, 3)),
    ],
)
def test_a_layer_in_channels_last_returns_channels_last_with_the_same_values(make, shape):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    ref = layer(x)
    grads = torch.autograd.grad(ref.square().sum(), (x, layer.weight))
    layer.channels_last = True
    y = layer(x)
    memory_format = _paths.CHANNELS_LAST[len(shape)]
    assert y.is_contiguous(memory_format=memory_format) and not y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y.square().sum(), (x, layer.weight))
    for g, r in zip(got, grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # the eager inference calls (the kernel's, where built)
        for _ in range(2):
            out = layer(x.detach())
            assert out.is_contiguous(memory_format=memory_format)
            torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    # Unbatched inputs, as torch's convolutions take them.
    torch.testing.assert_close(layer(x[0].detach()), ref[0].detach(), rtol=1e-5, atol=1e-5)


def test_a_bfloat16_layer_in_channels_last():
    torch.manual_seed(0)
    layer = TiedConv2d(16, 32, 3, padding=1, B=4).to(torch.bfloat16)
    x = torch.randn(2, 16, 9, 9, dtype=torch.bfloat16, requires_grad=True)
    ref = layer(x)
    (grad_ref,) = torch.autograd.grad(ref.float().square().sum(), x)
    layer.channels_last = True
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(y.float().square().sum(), x)
    torch.testing.assert_close(grad, grad_ref, rtol=5e-2, atol=5e-2)


def test_setting_the_layout_drops_the_calls_kept_for_the_old_one():
    layer = TiedConv2d(64, 64, 3, padding=1, B=2)  # NCHW: the kernel on copies, where built
    x = torch.randn(2, 64, 12, 12)
    with torch.no_grad():
        ref = layer(x)
        layer(x)
        assert ref.is_contiguous()
        if _kernel.kernel_available():  # the call kept for NCHW inputs returns NCHW
            assert _paths._CALLS[layer]
        layer.channels_last = True
        y = layer(x)
        assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        layer.channels_last = False
        assert layer(x).is_contiguous()


def test_the_layout_flag_names_its_rule():
    with pytest.raises(ValueError, match="1-D layer"):
        TiedConv1d(8, 8, 3, B=2).channels_last = True
    TiedConv1d(8, 8, 3, B=2).channels_last = False  # the default, allowed
    with pytest.raises(TypeError, match="True or False"):
        TiedConv2d(8, 8, 3, B=2).channels_last = 1  # type: ignore[assignment]
    layer = TiedConv2d(8, 8, 3, B=2)
    del layer.__dict__["_channels_last"]  # a layer pickled before the flag existed
    assert layer.channels_last is False


def test_a_pickled_layer_keeps_its_layout():
    import copy
    import io

    layer = TiedConv2d(8, 8, 3, padding=1, B=2)
    layer.channels_last = True
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.channels_last and copy.deepcopy(layer).channels_last
    assert loaded(torch.randn(1, 8, 5, 5)).is_contiguous(memory_format=CL)


def test_optimize_moves_an_nchw_model_to_channels_last_where_faster(cache_tmp, monkeypatch):
    timer = LayoutTimer({"channels_last": 0.5})
    monkeypatch.setattr(_optimize, "_timer", timer)
    net = classifier()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        ref = net(x)
    assert tieify.optimize(net, x) is net
    assert all(layer.channels_last for layer in tied_convs(net))
    assert timer.layout_calls() == 1
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4)
        inner = net[:4](x)  # the activations after the first tied layer: channels-last
        assert inner.is_contiguous(memory_format=CL) and not inner.is_contiguous()
    # The layout's choice is cached like the paths': not timed again, here or after a
    # restart (the on-disk cache).
    net2 = classifier()
    tieify.optimize(net2, x)
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("paths.json"))
    net3 = classifier()
    tieify.optimize(net3, x)
    assert timer.layout_calls() == 1
    assert all(layer.channels_last for layer in tied_convs(net2) + tied_convs(net3))
    entries = json.loads((cache_tmp / "paths.json").read_text())["entries"]
    assert [v["layout"] for v in entries.values() if "layout" in v] == ["channels_last"]


def dense_stem() -> list[nn.Module]:
    """A dense stem: conv, batch norm, ReLU, max pooling (3 channels to 8)."""
    return [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]


def stem_classifier() -> nn.Module:
    """A dense stem before the tied convs."""
    torch.manual_seed(0)
    return nn.Sequential(*dense_stem(), *classifier()).eval()


def test_optimize_makes_the_inputs_channels_last_at_the_entry_where_faster(cache_tmp, monkeypatch):
    """'auto' times a third way, the model's inputs made channels-last as it is called (a
    pre-hook): kept where faster than both others, with the outputs unchanged; cached like
    the rest; kept by deepcopy and torch.save; removed by a later layout='input'."""
    import copy
    import io

    timer = LayoutTimer({"channels_last": 0.5, "entry": 0.3})
    monkeypatch.setattr(_optimize, "_timer", timer)
    seen = []
    net = stem_classifier()

    def spy(module, args):
        seen.append(_paths.layout_of(args[0]))

    handle = net[0].register_forward_pre_hook(spy)
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        ref = net(x)
    tieify.optimize(net, x)
    assert timer.calls[-1] == ("input", "channels_last", "entry")
    assert _optimize.has_entry(net) and all(layer.channels_last for layer in tied_convs(net))
    seen.clear()
    with torch.no_grad():
        for _ in range(2):  # the hook converts on every call
            torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4)
    assert seen == ["channels_last", "channels_last"]  # the dense stem computes on it too
    assert x.is_contiguous()  # the caller's input is not changed
    tieify.optimize(net, x)  # again: one hook, and the choice from the cache
    assert sum(h is _optimize._to_channels_last for h in net._forward_pre_hooks.values()) == 1
    assert timer.layout_calls() == 1
    handle.remove()  # a local function: not picklable
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert _optimize.has_entry(loaded) and _optimize.has_entry(copy.deepcopy(net))
    entries = json.loads((cache_tmp / "paths.json").read_text())["entries"]
    assert [v["layout"] for v in entries.values() if "layout" in v] == ["entry"]
    tieify.optimize(net, x, layout="input")
    assert not _optimize.has_entry(net)
    net[0].register_forward_pre_hook(spy)
    seen.clear()
    with torch.no_grad():
        net(x)
    assert seen == ["contiguous"]


@pytest.mark.parametrize(
    "times, kept",
    [({"channels_last": 0.3, "entry": 0.5}, "channels_last"), ({"entry": 1.0}, "input")],
)
def test_optimize_keeps_the_entry_only_where_it_beats_both_others(
    cache_tmp, monkeypatch, times, kept
):
    monkeypatch.setattr(_optimize, "_timer", LayoutTimer(times))
    net = stem_classifier()
    tieify.optimize(net, torch.randn(2, 3, 20, 20))
    assert not _optimize.has_entry(net)
    assert all(layer.channels_last == (kept == "channels_last") for layer in tied_convs(net))


def dense_stem_net() -> nn.Module:
    """A dense model: the dense stem, a conv, pooled to logits."""
    torch.manual_seed(0)
    return nn.Sequential(
        *dense_stem(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.mark.parametrize("entry_time, entered", [(0.3, True), (1.0, False), (2.0, False)])
def test_optimize_gives_a_dense_model_the_entry_only_where_faster(
    cache_tmp, monkeypatch, entry_time, entered
):
    """A model without tied convs (the baseline a search times its candidates against) is
    timed as given and through the entry hook, and keeps the hook only where faster (a tie
    keeps the inputs as given); its outputs stay the same and its weights are untouched."""
    timer = LayoutTimer({"entry": entry_time})
    monkeypatch.setattr(_optimize, "_timer", timer)
    net = dense_stem_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        ref = net(x)
    assert tieify.optimize(net, x) is net
    assert timer.calls == [("input", "entry")]
    assert _optimize.has_entry(net) == entered
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    tieify.optimize(net, x)  # again: the choice from the cache, one hook at most
    assert len(timer.calls) == 1
    assert sum(h is _optimize._to_channels_last for h in net._forward_pre_hooks.values()) == int(
        entered
    )


def test_optimize_leaves_a_dense_model_alone_where_the_entry_cannot_apply(cache_tmp, monkeypatch):
    """No entry for a dense model fed channels-last (nothing to change), asked for a fused
    or a fixed layout, or whose code needs NCHW memory (``view`` of a feature map: it
    raises on channels-last, so the hook is never a candidate, and no warning is given)."""

    class DenseView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 5 * 5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x))
            return self.fc(y.view(y.shape[0], -1))

    timer = LayoutTimer({"entry": 0.1})
    monkeypatch.setattr(_optimize, "_timer", timer)
    x = torch.randn(2, 3, 20, 20)
    net = dense_stem_net()
    tieify.optimize(net, x.contiguous(memory_format=torch.channels_last))
    tieify.optimize(net, x, fused=True)
    tieify.optimize(net, x, layout="channels_last")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tieify.optimize(DenseView().eval(), torch.randn(2, 3, 5, 5))
    assert timer.calls == [] and not _optimize.has_entry(net)


def test_optimize_skips_the_entry_where_the_model_returns_what_it_changes(cache_tmp, monkeypatch):
    """A model that returns its NCHW input beside the logits: made channels-last at the
    entry, that output would be laid out otherwise, so the entry is not a candidate; nor
    is it under fused=True (tieify.fuse's traced copy has no hook) or for a channels-last
    input (nothing to change)."""

    class Echo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = stem_classifier()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net(x), x * 1

    timer = LayoutTimer({"channels_last": 0.5, "entry": 0.1})
    monkeypatch.setattr(_optimize, "_timer", timer)
    x = torch.randn(2, 3, 20, 20)
    echo = Echo().eval()
    tieify.optimize(echo, x)
    assert timer.calls[-1] == ("input", "channels_last") and not _optimize.has_entry(echo)
    fused = stem_classifier()
    tieify.optimize(fused, x, fused=True)
    assert timer.calls[-1] == ("input", "channels_last") and not _optimize.has_entry(fused)


def test_optimize_for_a_fused_model_times_the_layouts_fused(cache_tmp, monkeypatch):
    """fused=True: each layout configuration is fused on a copy (tieify.fuse, with the
    example input) and the copies are timed; the choice is cached apart from the unfused
    one, and the model itself is not fused."""
    from tieify import _fuse

    fused_as = []
    real_fuse = _fuse.fuse

    def spy(model, example_inputs=None, **kw):
        fused_as.append([layer.channels_last for layer in tied_convs(model)])
        out = real_fuse(model, example_inputs, **kw)
        assert out is not model and example_inputs is x and not kw  # a copy, on the input
        return out

    monkeypatch.setattr(_fuse, "fuse", spy)
    x = torch.randn(2, 8, 10, 10)
    net = classifier()
    monkeypatch.setattr(_optimize, "_timer", LayoutTimer({}))
    tieify.optimize(net, x)  # unfused: a tie keeps the inputs' layout (cached)
    timer = LayoutTimer({"channels_last": 0.5})
    monkeypatch.setattr(_optimize, "_timer", timer)
    assert fused_as == []
    assert not any(layer.channels_last for layer in tied_convs(net))
    fresh = classifier()
    with torch.inference_mode():  # as a user may call it: the copies are made outside it
        tieify.optimize(fresh, x, fused=True)
    assert timer.layout_calls() == 1  # not the unfused choice from the cache
    assert fused_as == [[False] * 3, [True] * 3]  # the inputs' layout, then channels-last
    assert all(layer.channels_last for layer in tied_convs(fresh))
    assert type(fresh) is nn.Sequential  # the model is configured, not fused
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), classifier()(x), rtol=1e-4, atol=1e-4)
    again = classifier()
    tieify.optimize(again, x, fused=True)  # cached: neither fused nor timed again
    assert timer.layout_calls() == 1 and len(fused_as) == 2
    assert all(layer.channels_last for layer in tied_convs(again))


def test_optimize_keeps_the_inputs_layout_where_it_is_not_slower(cache_tmp, monkeypatch):
    timer = LayoutTimer({})  # a tie: the inputs' layout is kept
    monkeypatch.setattr(_optimize, "_timer", timer)
    net = classifier()
    tieify.optimize(net, torch.randn(2, 8, 10, 10))
    assert timer.layout_calls() == 1
    assert not any(layer.channels_last for layer in tied_convs(net))
    # Each layer is pinned to the path timed on the input it receives that way.
    assert all(layer.path in _paths.PATHS for layer in tied_convs(net))


def test_optimize_leaves_a_channels_last_model_alone(cache_tmp, monkeypatch):
    timer = LayoutTimer({"channels_last": 0.5})
    monkeypatch.setattr(_optimize, "_timer", timer)
    net = classifier().to(memory_format=CL)
    tieify.optimize(net, torch.randn(2, 8, 10, 10).contiguous(memory_format=CL))
    assert timer.layout_calls() == 0  # nothing to move
    assert not any(layer.channels_last for layer in tied_convs(net))


def test_optimize_keeps_nchw_with_a_warning_where_the_model_needs_it(cache_tmp, monkeypatch):
    monkeypatch.setattr(_optimize, "_timer", LayoutTimer({"channels_last": 0.5}))
    net = ViewNet().eval()
    x = torch.randn(2, 8, 5, 5)
    for layout in ("auto", "channels_last"):
        with pytest.warns(RuntimeWarning, match=r"raised RuntimeError: view size .*reshape"):
            tieify.optimize(net, x, layout=layout)
        assert not net.conv.channels_last
        net(x)  # still runs as before


def test_optimize_keeps_a_returned_feature_maps_layout_unless_asked(cache_tmp, monkeypatch):
    timer = LayoutTimer({"channels_last": 0.5})
    monkeypatch.setattr(_optimize, "_timer", timer)
    backbone = classifier()[:5]  # returns the (N, 32, 5, 5) feature map
    x = torch.randn(2, 8, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a choice, not a failure: no warning
        tieify.optimize(backbone, x)
    assert not any(layer.channels_last for layer in tied_convs(backbone))
    assert backbone(x).is_contiguous()
    tieify.optimize(backbone, x, layout="channels_last")  # asked: no timing
    assert all(layer.channels_last for layer in tied_convs(backbone))
    assert backbone(x).is_contiguous(memory_format=CL)
    assert timer.layout_calls() == 0
    tieify.optimize(backbone, x, layout="input")  # back to the inputs' layout
    assert not any(layer.channels_last for layer in tied_convs(backbone))


def test_optimize_names_the_layouts_it_takes():
    with pytest.raises(ValueError, match="'auto', 'channels_last', 'input'"):
        tieify.optimize(classifier(), torch.randn(1, 8, 4, 4), layout="nhwc")


def test_optimize_warns_where_channels_last_changes_the_values(cache_tmp, monkeypatch):
    """Code that reads memory as if it were NCHW (here: through ``as_strided``) computes
    other values on channels-last activations; the check against the NCHW run catches it."""

    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = TiedConv2d(4, 4, 1, B=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y.as_strided((y.shape[0], y[0].numel()), (y[0].numel(), 1))

    monkeypatch.setattr(_optimize, "_timer", LayoutTimer({"channels_last": 0.5}))
    net = Strided()
    with pytest.warns(RuntimeWarning, match="differs from the NCHW run"):
        tieify.optimize(net, torch.randn(2, 4, 3, 3), layout="channels_last")
    assert not net.conv.channels_last


@pytest.fixture
def tf32_flags():
    """Restores PyTorch's two TF32 flags (properties monkeypatch cannot delete and set)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_layout_check_allows_its_dtypes_rounding(tf32_flags):
    """The check compares relative norms against the dtype's rounding: eight epsilons
    (bfloat16 2**-8 → 0.0625, float16 2**-10 → 0.0078125, float32 TF32's 2**-10 on CUDA
    while TF32 is allowed), at least 1e-3."""
    tol = _optimize.rounding_tolerance
    assert tol(torch.bfloat16) == 0.0625
    assert tol(torch.float16) == 0.0078125
    assert tol(torch.float32) == tol(torch.float64) == 1e-3
    torch.backends.cudnn.allow_tf32 = True
    assert tol(torch.float32, "cuda") == 0.0078125
    assert tol(torch.float32) == 1e-3  # CPU: no TF32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    assert tol(torch.float32, "cuda") == 1e-3

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 1000, generator=g)
    noise = torch.randn(64, 1000, generator=g)
    # 2% relative noise: bfloat16 rounding, beyond float32's.
    rounded = (ref * (1 + 0.02 * noise)).bfloat16()
    assert _optimize._output_difference(rounded, ref.bfloat16()) is None
    problem = _optimize._output_difference(ref * (1 + 0.02 * noise), ref)
    assert problem is not None and "beyond float32 rounding's 0.001" in problem
    assert _optimize._output_difference(ref * (1 + 1e-5 * noise), ref) is None
    # A permutation (NCHW memory read as channels-last) is a difference of order 1.
    scrambled = ref.bfloat16().flatten()[torch.randperm(ref.numel(), generator=g)]
    problem = _optimize._output_difference(scrambled.view(64, 1000), ref.bfloat16())
    assert problem is not None and "beyond bfloat16 rounding's 0.0625" in problem
    relative = float(problem.split("relative difference ")[1].split(",")[0])
    assert 1.2 < relative < 1.6  # ‖a − b‖ of two independent draws: √2 ‖a‖

    # Non-finite values: the same ones in both runs agree, others differ.
    special = ref.clone()
    special[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    assert _optimize._output_difference(special.clone(), special) is None
    moved = special.clone()
    moved[0, 0] = 1.0
    assert _optimize._output_difference(moved, special) is not None
    # Integer outputs compare exactly.
    labels = torch.arange(10)
    assert _optimize._output_difference(labels.clone(), labels) is None
    assert _optimize._output_difference(labels.flip(0), labels) is not None


def test_fused_model_in_channels_last_on_nchw_inputs(cache_tmp, monkeypatch):
    monkeypatch.setattr(_optimize, "_timer", LayoutTimer({"channels_last": 0.5}))
    net = classifier()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        ref = net(x)
    tieify.optimize(net, x)
    fused = tieify.fuse(net, x)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4)


def test_latency_table_keys_a_layer_in_channels_last_by_the_path_it_runs():
    layer = TiedConv2d(16, 32, 3, padding=1, B=4)
    x = torch.randn(2, 16, 8, 8)
    nchw = json.loads(_table.layer_key(layer, x))
    layer.channels_last = True
    moved = json.loads(_table.layer_key(layer, x))
    assert "copies_to" not in nchw["op"] and moved["op"]["copies_to"] == "channels_last"
    assert moved["op"]["path"] == _paths.select_path(layer, x.contiguous(memory_format=CL))
    assert moved["input"] == nchw["input"]  # the input the model gives it
    cl = json.loads(_table.layer_key(layer, x.contiguous(memory_format=CL)))
    assert "copies_to" not in cl["op"]  # nothing to copy


def test_latency_keys_tell_a_weight_laid_out_otherwise_than_its_input(cache_tmp, monkeypatch):
    """A conv whose weight is NCHW on a channels-last input (a dense model fed channels-last
    at its entry), which PyTorch reorders on every call, gets table and path keys of its
    own; a weight laid out as its input, or a 1×1 bank (both layouts at once), adds nothing
    to the keys; and optimize's whole-model timing is kept apart for channels-last weights."""
    x = torch.randn(2, 16, 8, 8)
    xc = x.contiguous(memory_format=CL)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    conv_cl = copy.deepcopy(conv).to(memory_format=CL)
    tied = TiedConv2d(16, 32, 3, padding=1, B=2)
    tied_cl = copy.deepcopy(tied).to(memory_format=CL)

    def op(layer: nn.Module, inp: torch.Tensor) -> dict:
        return json.loads(_table.layer_key(layer, inp))["op"]

    def layer(key: str) -> dict:
        return json.loads(key)["layer"]

    assert op(conv, xc)["weight_layout"] == "contiguous"
    assert op(conv_cl, x)["weight_layout"] == "channels_last"
    assert op(conv, xc) != op(conv_cl, xc)
    assert "weight_layout" not in op(conv, x) and "weight_layout" not in op(conv_cl, xc)
    assert op(conv, x) == op(conv_cl, xc)  # keys as before the rule for matching layouts
    one = nn.Conv2d(16, 32, 1)
    assert "weight_layout" not in op(one, xc) and "weight_layout" not in op(one, x)
    assert layer(_optimize.path_key(tied_cl, x))["weight_layout"] == "channels_last"
    assert "weight_layout" not in layer(_optimize.path_key(tied, x))
    assert layer(_optimize.path_key(tied, x)) == layer(_optimize.path_key(tied_cl, xc))
    timer = LayoutTimer({})
    monkeypatch.setattr(_optimize, "_timer", timer)
    image = torch.randn(2, 8, 10, 10)
    tieify.optimize(classifier(), image)
    tieify.optimize(classifier(), image)  # the choice from the cache
    assert timer.layout_calls() == 1
    tieify.optimize(classifier().to(memory_format=CL), image)  # channels-last weights: timed
    assert timer.layout_calls() == 2


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_the_first_layer_copies_its_input_by_the_kernels_transposing_copy(monkeypatch):
    copies = []
    relayout = _kernel.relayout

    def counting(x, channels_last):
        copies.append(channels_last)
        return relayout(x, channels_last=channels_last)

    monkeypatch.setattr(_kernel, "relayout", counting)
    net = classifier()
    for layer in tied_convs(net):
        layer.channels_last = True
    with torch.inference_mode():
        net(torch.randn(2, 8, 10, 10))
    assert copies == [True]  # one copy in, none back: the rest is channels-last


@pytest.mark.parametrize(
    "name",
    [
        "alexnet",  # flatten after an adaptive pool
        "densenet121",  # concatenations
        "googlenet",
        "inception_v3",
        "shufflenet_v2_x0_5",  # channel shuffle: view, transpose, contiguous, view
        "squeezenet1_0",
        "efficientnet_b0",  # squeeze-excitation
        "regnet_y_400mf",
    ],
)
def test_torchvision_models_run_with_their_tied_layers_in_channels_last(
    name, cache_tmp, monkeypatch
):
    import torchvision

    monkeypatch.setattr(_optimize, "_timer", LayoutTimer({}))
    torch.manual_seed(0)
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = 80 if name == "inception_v3" else 64
    x = torch.randn(2, 3, size, size)
    tied = tieify.tieify(model, B=4)
    with torch.no_grad():
        ref = tied(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it runs so: no warning
        tieify.optimize(tied, x, layout="channels_last", cache=False)
    # Every tied conv computes in channels-last: it runs so, or its input already is (a
    # squeeze-excitation's 1×1 map is both layouts at once).
    seen = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a: seen.append(m.channels_last or _paths.is_channels_last(a[0]))
        )
        for layer in tied_convs(tied)
    ]
    with torch.no_grad():
        torch.testing.assert_close(tied(x), ref, rtol=1e-4, atol=1e-4)
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    assert any(layer.channels_last for layer in tied_convs(tied))


@pytest.mark.parametrize("optimize", [True, False])
def test_search_latency_times_candidates_after_optimize_where_the_recipe_says(
    optimize, cache_tmp, monkeypatch
):
    import tieify.latency
    from tieify.search._objective import Evaluator
    from tieify.search._recipe import recipe_from_dict

    calls = []
    real = tieify.latency.optimize
    monkeypatch.setattr(
        tieify.latency, "optimize", lambda m, x, **kw: calls.append(kw) or real(m, x, **kw)
    )
    monkeypatch.setattr(_optimize, "_timer", LayoutTimer({"channels_last": 0.5}))
    ev = Evaluator.__new__(Evaluator)  # only what _latency reads: no data, no training
    ev.recipe = recipe_from_dict(
        {"latency": {"optimize": optimize, "repeats": 2, "allocator": "system", "threads": 1}}
    )
    ev.latency_input = torch.randn(1, 8, 10, 10)
    ev.latency_mode = "measured"
    ev.dense = classifier()  # a stand-in for the dense model, timed beside each candidate
    net = classifier()
    ms, ratio = ev._latency(net)
    assert ms > 0 and ratio > 0
    # Optimized: the candidate, and the dense model once (its layout then kept for the rest).
    assert calls == ([{"threads": 1}] * 2 if optimize else [])
    assert all(layer.channels_last == optimize for layer in tied_convs(net))
    ev._latency(classifier())
    assert len(calls) == (3 if optimize else 0)


def test_recipe_optimize_key_takes_booleans_only():
    from tieify.search._recipe import RecipeError, recipe_from_dict

    assert recipe_from_dict({}).latency.optimize is False
    with pytest.raises(RecipeError, match="latency.optimize"):
        recipe_from_dict({"latency": {"optimize": "yes"}})
