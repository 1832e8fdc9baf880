"""tieify.fuse and the kernel's epilogue: a pointwise tied conv with the batch norm, residual
add and ReLU after it, equal to the separate modules wherever it runs fused, and the
separate modules everywhere else."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from _path_helpers import spy_kernel, to_layout
from torch import nn
from torchvision.models.resnet import Bottleneck

import tieify
from tieify import _fuse, _trace
from tieify.nn import TiedConv2d, _fused, _kernel, _paths

needs_kernel = pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return to_layout(x, "channels_last")


def random_stats(model: nn.Module, seed: int = 1) -> nn.Module:
    """Batch norms with running statistics and affine parameters far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.3, 3.0, generator=gen)
                if m.weight is not None:
                    m.weight.uniform_(-1.5, 1.5, generator=gen)
                    m.bias.normal_(0, 0.5, generator=gen)
    return model


def epilogue_calls(monkeypatch) -> list[dict]:
    """Record the epilogue of each kernel call ({} for none) and ``conv`` for the
    convolution's."""

    def describe(conv: bool, args: tuple) -> dict:
        scale, residual, relu = args[-5], args[-2], args[-1]  # the entry points' last five
        seen = {"scale": True, "shift": True, "residual": residual is not None, "relu": bool(relu)}
        return {**(seen if scale is not None else {}), **({"conv": True} if conv else {})}

    return spy_kernel(monkeypatch, describe)


def separate(x, conv, bn, residual=None, relu=False):
    y = bn(_paths.fold_forward(conv, x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


# -- the kernel's epilogue ----------------------------------------------------------------


@needs_kernel
def test_the_epilogue_applies_scale_shift_residual_and_relu_per_block():
    gen = torch.Generator().manual_seed(0)
    # N <= 8 runs pair tiles (odd K: a last single step), with AVX-512 quad tiles (K % 4: last
    # single steps), as does N = 16; 6-row tiles cross blocks of 5, 12-row ones of 7, and
    # without AVX-512 the 3-row tiles of N % 32 = 0 blocks of 2 and 5
    cases = ((60, 7, 27, 4), (36, 16, 32, 3), (13, 5, 8, 1), (30, 9, 3, 5), (42, 32, 8, 7))
    cases += ((50, 11, 16, 5), (35, 24, 16, 7), (28, 6, 5, 7), (40, 12, 64, 5), (34, 8, 32, 2))
    for rows, k, n, blocks in cases:
        a, bt = torch.randn(rows, k, generator=gen), torch.randn(k, n, generator=gen)
        bias = torch.randn(n, generator=gen)
        scale, shift = torch.randn(blocks, n, generator=gen), torch.randn(blocks, n, generator=gen)
        residual = torch.randn(rows, n, generator=gen)
        residual[0, 0] = float("nan")  # a NaN goes through the ReLU, as torch.relu keeps it
        block = torch.arange(rows) % blocks
        y = a @ bt + bias
        for kw, expected in (
            ({"scale": scale, "shift": shift}, y * scale[block] + shift[block]),
            ({"residual": residual}, y + residual),
            ({"relu": True}, torch.relu(y)),
            (
                {"scale": scale, "shift": shift, "residual": residual, "relu": True},
                torch.relu(y * scale[block] + shift[block] + residual),
            ),
        ):
            out = _kernel.pointwise(a, bt, bias, torch.empty(rows, n), **kw)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, equal_nan=True)


@needs_kernel
def test_the_epilogue_refuses_arguments_it_would_misread():
    a, bt, out = torch.randn(12, 4), torch.randn(4, 8), torch.empty(12, 8)
    scale = torch.ones(3, 8)
    for kw in (
        {"scale": scale},  # a scale without a shift
        {"scale": torch.ones(5, 8), "shift": torch.ones(5, 8)},  # 12 rows, 5 blocks
        {"scale": torch.ones(3, 7), "shift": torch.ones(3, 7)},
        {"residual": torch.randn(12, 9)},
        {"residual": out},  # written while read
        {"residual": torch.randn(8, 12).t()},  # not row-major
    ):
        with pytest.raises(ValueError, match="dense float32 CPU tensors"):
            _kernel.pointwise(a, bt, None, out, **kw)


# -- conv_bn_act ----------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize(
    "cin, cout, B, stride, bias, size",
    [
        (64, 256, 4, 1, False, 12),  # 16-column tiles
        (256, 64, 8, 1, True, 9),  # 8-column tiles; rows not a multiple of 6
        (24, 36, 4, 2, True, 11),  # strided (a downsample), a column tail
        (64, 128, 2, 1, False, 32),  # a 2 MiB output: streaming stores
    ],
)
@pytest.mark.parametrize("residual, relu", [(False, False), (False, True), (True, True)])
def test_conv_bn_act_runs_fused_and_equals_the_separate_modules(
    monkeypatch, cin, cout, B, stride, bias, size, residual, relu
):
    torch.manual_seed(0)
    conv = TiedConv2d(cin, cout, 1, stride=stride, B=B, bias=bias)
    bn = random_stats(nn.BatchNorm2d(cout)).eval()
    conv.path = "kernel"
    x = channels_last(torch.randn(2, cin, size, size))
    out_size = (size - 1) // stride + 1
    res = channels_last(torch.randn(2, cout, out_size, out_size)) if residual else None
    calls = epilogue_calls(monkeypatch)
    with torch.no_grad():
        y = _fused.conv_bn_act(x, conv, bn, res, relu)
        expected = separate(x, conv, bn, res, relu)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert _paths.is_channels_last(y)
    assert calls == [{"scale": True, "shift": True, "residual": residual, "relu": relu}]


@needs_kernel
def test_conv_bn_act_keeps_the_affine_until_the_batch_norm_changes(monkeypatch):
    conv, bn = TiedConv2d(32, 32, 1, B=4), random_stats(nn.BatchNorm2d(32)).eval()
    conv.path = "kernel"
    x = channels_last(torch.randn(1, 32, 8, 8))
    with torch.no_grad():
        _fused.conv_bn_act(x, conv, bn)
        kept = _paths._FORMS[bn][("affine", id(conv), bn.eps)][1]
        _fused.conv_bn_act(x, conv, bn)
        assert _paths._FORMS[bn][("affine", id(conv), bn.eps)][1] is kept
        bn.running_var.mul_(4.0)  # an in-place update (as training makes): a new affine
        torch.testing.assert_close(
            _fused.conv_bn_act(x, conv, bn), separate(x, conv, bn), rtol=1e-4, atol=1e-4
        )
        assert _paths._FORMS[bn][("affine", id(conv), bn.eps)][1] is not kept


@needs_kernel
@pytest.mark.parametrize("k", [1, 3])
def test_conv_bn_act_keeps_its_call_until_the_modules_change(monkeypatch, k):
    """A fused eager call is prepared once per input and residual layout and kept: new data,
    a batch norm updated in place or put in training mode, a new residual layout and a
    ReLU asked or not all give the separate modules' result."""
    torch.manual_seed(0)
    conv = TiedConv2d(16, 32, k, padding=k // 2, B=4)
    bn = random_stats(nn.BatchNorm2d(32)).eval()
    conv.path = "kernel"
    x = channels_last(torch.randn(2, 16, 8, 8))
    res = channels_last(torch.randn(2, 32, 8, 8))
    calls = epilogue_calls(monkeypatch)

    def check(x, res, relu=True):
        with torch.no_grad():
            y = _fused.conv_bn_act(x, conv, bn, res, relu)
            torch.testing.assert_close(y, separate(x, conv, bn, res, relu), rtol=1e-4, atol=1e-4)

    check(x, res)
    (kept,) = _paths._CALLS[conv].values()
    check(channels_last(torch.randn(2, 16, 8, 8)), channels_last(torch.randn(2, 32, 8, 8)))
    assert list(_paths._CALLS[conv].values()) == [kept] and len(calls) == 2
    bn.running_mean.add_(1.0)  # in place: the kept call is made anew
    check(x, res)
    assert kept not in _paths._CALLS[conv].values()
    check(x, None, relu=False)  # another key: no residual, no ReLU
    fused = {"scale": True, "shift": True, "residual": True, "relu": True}
    fused |= {"conv": True} if k == 3 else {}
    check(x, res.contiguous())  # an NCHW residual: its channels-last copy, still fused
    assert calls[-1] == fused
    nchw = res.contiguous()
    with torch.no_grad():
        _fused.conv_bn_act(x, conv, bn, nchw, True)
    torch.testing.assert_close(nchw, res, rtol=0, atol=0)  # the residual itself is not changed
    assert nchw.is_contiguous()
    check(x, res.double())  # float64, laid out like the kept call's: the modules again
    assert calls[-1] == ({"conv": True} if k == 3 else {})
    bn.train()  # training mode: the modules, which update the running statistics
    before = bn.running_mean.clone()
    with torch.no_grad():
        _fused.conv_bn_act(x, conv, bn, res, True)
    assert not torch.equal(bn.running_mean, before)


@needs_kernel
def test_conv_bn_act_runs_the_modules_where_it_cannot_fuse(monkeypatch):
    torch.manual_seed(0)
    conv, bn = TiedConv2d(32, 64, 1, B=4), random_stats(nn.BatchNorm2d(64)).eval()
    conv.path = "kernel"
    x = channels_last(torch.randn(2, 32, 8, 8))
    res = channels_last(torch.randn(2, 64, 8, 8))
    calls = epilogue_calls(monkeypatch)
    cases = {
        "NCHW input": (x.contiguous(), res),
        "float64 residual": (x, res.double()),
        "broadcast residual": (x, torch.randn(64, 1, 1)),
    }
    for name, (xi, ri) in cases.items():
        with torch.no_grad():
            y = _fused.conv_bn_act(xi, conv, bn, ri, True)
            # float32 products (summed in another order than the fold's), float64 after the add
            expected = separate(xi, conv, bn, ri, True)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=name)
    assert not any(c.get("scale") for c in calls)
    # Autograd records: the modules run, and the gradients are the separate modules'.
    xg = x.clone().requires_grad_()
    y = _fused.conv_bn_act(xg, conv, bn, res, True)
    grads = torch.autograd.grad(y.sum(), [xg, conv.weight, bn.weight])
    ref = separate(xg, conv, bn, res, True)
    ref_grads = torch.autograd.grad(ref.sum(), [xg, conv.weight, bn.weight])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    # Training mode: batch statistics, and the running statistics are updated as unfused.
    bn_train, bn_ref = copy.deepcopy(bn).train(), copy.deepcopy(bn).train()
    with torch.no_grad():
        y = _fused.conv_bn_act(x, conv, bn_train, res, True)
        torch.testing.assert_close(y, separate(x, conv, bn_ref, res, True))
    torch.testing.assert_close(bn_train.running_mean, bn_ref.running_mean)
    assert not any(c.get("scale") for c in calls)


# -- tieify.fuse ----------------------------------------------------------------------------


def tied_resnet50() -> nn.Module:
    torch.manual_seed(0)
    dense = torchvision.models.resnet50(num_classes=10)
    tied = tieify.tieify(dense, B=4)
    for m in tied.modules():
        if isinstance(m, TiedConv2d) and _paths._is_pointwise(m):
            m.path = "kernel"  # at any size (the rule takes it from 1,024 pixels)
    return random_stats(tied).eval().to(memory_format=torch.channels_last)


@needs_kernel
def test_fuse_a_tied_resnet50_equals_it_and_keeps_its_state(monkeypatch):
    tied = tied_resnet50()
    # The rule takes the conv kernel for 3×3 outputs 28 wide or more; this small input's
    # are narrower, so pin it (the pointwise layers take it by the rule).
    for block in (m for m in tied.modules() if isinstance(m, Bottleneck)):
        block.conv2.path = "kernel"
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    fused = tieify.fuse(tied)
    # Every tied conv is fused: the bottlenecks' convs with their batch norms, ReLUs and (the
    # last) the residual add; the downsample convs with theirs; the dense stem's batch norm is
    # folded.
    assert len(fused.fused) == 16 + 16 + 16 + 4 + 1
    assert fused.fused["conv1"] == "bn1 + relu"
    assert fused.fused["layer1.0.conv1"] == "layer1.0.bn1 + relu"
    assert fused.fused["layer1.0.conv2"] == "layer1.0.bn2 + relu"
    assert fused.fused["layer2.0.conv2"] == "layer2.0.bn2 + relu"  # 3×3, stride 2
    assert fused.fused["layer1.0.conv3"] == "layer1.0.bn3 + add + relu"
    assert fused.fused["layer1.0.downsample.0"] == "layer1.0.downsample.1"
    assert fused.fused["layer2.1.conv3"] == "layer2.1.bn3 + add + relu"
    # The same parameters, buffers and keys; the original model is untouched.
    assert list(fused.state_dict()) == list(before)
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert type(tied) is torchvision.models.ResNet
    x = channels_last(torch.randn(2, 3, 64, 64))
    calls = epilogue_calls(monkeypatch)
    with torch.no_grad():
        y = fused(x)
        assert len(calls) == 52 and all(c["scale"] for c in calls)
        assert sum(c["residual"] for c in calls) == 16 and sum("conv" in c for c in calls) == 16
        torch.testing.assert_close(y, tied(x), rtol=1e-4, atol=1e-4)
    # As a fused model trains (the modules, one after the other), so does its copy.
    fused.train()
    tied_train = copy.deepcopy(tied).train()
    xg = x.clone().requires_grad_()
    out, ref = fused(xg), tied_train(xg)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(out.sum(), xg)[0]
    torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), xg)[0], rtol=1e-4, atol=1e-4)


def test_fuse_under_inference_mode_copies_real_parameters():
    """A copy made under inference_mode holds inference tensors (no version counter), whose
    fused calls would be prepared anew on every call: fuse copies outside it."""
    torch.manual_seed(0)
    tied = random_stats(tieify.tieify(torchvision.models.resnet18(num_classes=10), B=2))
    tied = tied.eval().to(memory_format=torch.channels_last)
    x = channels_last(torch.randn(1, 3, 32, 32))
    with torch.inference_mode():
        fused = tieify.fuse(tied, x)
        y = fused(x)
    assert fused.fused and not any(p.is_inference() for p in fused.parameters())
    assert not any(b.is_inference() for b in fused.buffers())
    with torch.no_grad():
        torch.testing.assert_close(y, tied(x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_fuse_inplace_shares_the_modules():
    tied = tied_resnet50()
    fused = tieify.fuse(tied, inplace=True)
    for name in ("layer1.0.conv1", "layer1.0.bn1", "fc"):
        assert fused.get_submodule(name) is tied.get_submodule(name)
    assert tieify.fuse(tied).get_submodule("fc") is not tied.fc  # a deep copy by default
    # The generated forward reaches submodules through the instance dicts of the graph
    # module and of its own containers; the model's modules get no such entries.
    assert fused.__dict__["layer1"] is fused._modules["layer1"]
    assert type(fused.layer1) is nn.Module and "0" in fused.layer1.__dict__
    assert "0" not in tied.layer1.__dict__ and "conv1" not in tied.layer1[0].__dict__
    fused.fc = nn.Identity()  # assigning a child replaces the entry too
    assert "fc" not in fused.__dict__ and type(fused.fc) is nn.Identity


class _Blocks(nn.Module):
    """Adds written both ways, an in-place add into the residual (which is used later), a
    functional ReLU, a conv output used twice, and a batch norm without statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = TiedConv2d(16, 16, 1, B=4), nn.BatchNorm2d(16)
        self.c2, self.b2 = TiedConv2d(16, 16, 1, B=4), nn.BatchNorm2d(16)
        self.c3, self.b3 = TiedConv2d(16, 16, 1, B=2), nn.BatchNorm2d(16)
        self.c4, self.b4 = TiedConv2d(16, 16, 1, B=2), nn.BatchNorm2d(16)
        self.c5, self.b5 = TiedConv2d(16, 16, 1, B=2), nn.BatchNorm2d(16, track_running_stats=False)
        self.c6, self.b6 = TiedConv2d(16, 16, 3, padding=1, B=2), nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.relu(x + self.b1(self.c1(x)))  # other + value, functional relu
        r = y * 2
        r.add_(self.b2(self.c2(y)))  # in place into r, which is used again below
        z = self.b3(self.c3(r)).relu_()  # method relu
        w = self.c4(z)
        w2 = self.b4(w) + w  # the conv's output has two users: not fused
        v = self.b5(self.c5(w2))  # batch statistics even in eval: not fused
        return self.b6(self.c6(v)) + r  # 3×3: fused by the conv kernel


@needs_kernel
def test_fuse_recognises_the_patterns_and_leaves_what_it_must(monkeypatch):
    torch.manual_seed(0)
    model = random_stats(_Blocks()).eval().to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, TiedConv2d):
            m.path = "kernel"
    fused = tieify.fuse(model)
    expected_chains = {"c1": "b1 + add + relu", "c2": "b2", "c3": "b3 + relu", "c6": "b6 + add"}
    assert fused.fused == expected_chains
    x = channels_last(torch.randn(2, 16, 6, 6))
    with torch.no_grad():
        expected = model(x)
        calls = epilogue_calls(monkeypatch)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == 4 + 2  # fused: c1, c2, c3, c6; c4 and c5 plain kernel calls
    assert [c.get("scale", False) for c in calls] == [True] * 3 + [False] * 2 + [True]
    assert calls[-1] == {
        "scale": True,
        "shift": True,
        "residual": True,
        "relu": False,
        "conv": True,
    }


def test_fuse_refuses_a_training_model_and_what_is_not_a_model():
    model = nn.Sequential(TiedConv2d(8, 8, 1, B=2), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        tieify.fuse(model)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        tieify.fuse("resnet50")  # type: ignore[arg-type]


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = TiedConv2d(8, 8, 1, B=2), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return x


def test_fuse_warns_and_returns_a_model_that_does_not_trace_unchanged():
    model = _Branchy().eval()
    with pytest.warns(RuntimeWarning, match="does not trace with torch.fx.*nothing was fused"):
        out = tieify.fuse(model)
    assert type(out) is _Branchy and out is not model and out.fused == {}
    x = torch.rand(1, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x))


@needs_kernel
def test_a_fused_model_counts_compiles_and_exports_as_the_unfused_one():
    torch.manual_seed(0)
    model = nn.Sequential(TiedConv2d(16, 32, 1, B=4), nn.BatchNorm2d(32), nn.ReLU())
    model = random_stats(model).eval().to(memory_format=torch.channels_last)
    model[0].path = "kernel"
    fused = tieify.fuse(model)
    assert fused.fused == {"0": "1 + relu"}
    x = channels_last(torch.randn(2, 16, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tieify.count(fused, x).macs == tieify.count(model, x).macs
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(fused, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
        exported = torch.export.export(fused, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_conv_bn_act_runs_the_modules_where_the_layer_runs_another_path(monkeypatch):
    """Fused only where the layer runs the kernel (by the rule or pinned): a layer pinned to
    gemm, or on an input too small for the rule's kernel, runs the separate modules."""
    torch.manual_seed(0)
    calls = epilogue_calls(monkeypatch)
    conv, bn = TiedConv2d(64, 96, 1, B=4), random_stats(nn.BatchNorm2d(96)).eval()
    small = channels_last(torch.randn(1, 64, 5, 5))  # 25 pixels: the rule takes gemm
    big = channels_last(torch.randn(2, 64, 32, 32))  # 2,048 pixels: the rule takes kernel
    for path, x, fused in (("gemm", big, False), ("auto", small, False), ("auto", big, True)):
        conv.path = path
        calls.clear()
        with torch.no_grad():
            y = _fused.conv_bn_act(x, conv, bn, None, True)
            torch.testing.assert_close(y, separate(x, conv, bn, None, True), rtol=1e-4, atol=1e-4)
        # The kernel runs only fused here (the other two run gemm and the modules).
        assert [c.get("scale", False) for c in calls] == [True] * fused, (path, x.shape)


def test_add_into_writes_into_its_first_operand_only_where_that_is_the_same_sum():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = a + b
    with torch.no_grad():
        out = _fused.add_into(a, b)
    assert out is a
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for x, y in (
        (torch.randn(3, 4), torch.randn(2, 3, 4)),  # the sum broadcasts beyond a
        (torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)),  # and changes its dtype
    ):
        before = x.clone()
        out = _fused.add_into(x, y)
        assert out is not x
        torch.testing.assert_close(out, before + y)
        torch.testing.assert_close(x, before, rtol=0, atol=0)
    leaf = torch.randn(3, requires_grad=True)
    a = leaf * 2  # autograd records: out of place
    assert _fused.add_into(a, torch.ones(3)) is not a


def test_fuse_restores_the_in_place_residual_adds_that_tracing_loses():
    """ResNet-50 with only its 3×3 convs tied: those are fused with their batch norms and
    ReLUs, and every `out += identity` (after a dense conv's batch norm) becomes an in-place
    add again, with the same output."""
    torch.manual_seed(0)
    tied = tieify.tieify(
        torchvision.models.resnet50(num_classes=10),
        B=lambda name, m: 2 if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) else None,
    )
    tied = random_stats(tied).eval().to(memory_format=torch.channels_last)
    fused = tieify.fuse(tied, dense=False)  # the dense convs' batch norms stay: their adds
    blocks = [name for name, m in tied.named_modules() if isinstance(m, Bottleneck)]
    assert fused.fused == {f"{b}.conv2": f"{b}.bn2 + relu" for b in blocks}
    adds = [n for n in fused.graph.nodes if n.target is _fused.add_into]
    assert len(adds) == 16 and all(n.args[0].target.endswith(("bn3", "bn2")) for n in adds)
    x = channels_last(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tied(x), rtol=1e-4, atol=1e-4)


class _Shortcut(nn.Module):
    """A basic block's end: a 1×1 shortcut conv → bn first in the graph, then conv → bn, the
    add of the two and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.down_bn = TiedConv2d(8, 16, 1, B=2), nn.BatchNorm2d(16)
        self.conv, self.bn = TiedConv2d(8, 16, 3, padding=1, B=2), nn.BatchNorm2d(16)

    def forward(self, x):
        s = self.down_bn(self.down(x))
        return torch.relu(self.bn(self.conv(x)) + s)


def test_an_add_goes_to_the_other_chain_where_its_first_claimant_does_not_fuse():
    """The shortcut's chain comes first in the graph and claims the add and the ReLU; where
    it is not fused (e.g. timed slower on the example input), the conv's chain takes them
    instead of leaving the add and the ReLU as separate passes."""
    model = _Shortcut()
    graph, why = _trace.trace(model)
    assert graph is not None, why
    gm = torch.fx.GraphModule(model, graph)
    chains = _fuse._chains(gm, dense=True)
    assert [(str(c.conv.target), c.add is not None, c.relu is not None) for c in chains] == [
        ("down", True, True),
        ("conv", False, False),
    ]
    kept = _fuse._chains(gm, True, keep=lambda c: str(c.conv.target) != "down")
    assert [(str(c.conv.target), c.add is not None, c.relu is not None) for c in kept] == [
        ("conv", True, True)
    ]


@needs_kernel
def test_fuse_with_example_inputs_gives_the_add_to_the_chain_that_fuses(monkeypatch):
    torch.manual_seed(0)
    model = random_stats(_Shortcut()).eval().to(memory_format=torch.channels_last)
    model.conv.path = "kernel"  # the shortcut: gemm, its chain not timed here
    monkeypatch.setattr(tieify._fuse, "FUSED_MAX_BANK", 0)
    x = channels_last(torch.randn(2, 8, 6, 6))
    fused = tieify.fuse(model, x)
    assert fused.fused == {"conv": "bn + add + relu"}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_fuse_with_example_inputs_keeps_only_the_chains_that_run_the_kernel(monkeypatch):
    torch.manual_seed(0)
    model = _Blocks().eval().to(memory_format=torch.channels_last)
    random_stats(model)
    model.c2.path = "kernel"  # the others: the rule, gemm and widen on this small input
    monkeypatch.setattr(tieify._fuse, "FUSED_MAX_BANK", 0)  # no chain is timed here
    x = channels_last(torch.randn(2, 16, 6, 6))
    fused = tieify.fuse(model, x)
    assert fused.fused == {"c2": "b2"}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    # At a batch of one the rule takes the kernel for the 3×3 conv too: its chain fuses.
    one = tieify.fuse(model, x[:1])
    assert one.fused == {"c2": "b2", "c6": "b6 + add"}
    with torch.no_grad():
        torch.testing.assert_close(one(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-4)
    # None runs the kernel: the model as it is (a copy), no graph module.
    model.c2.path = "auto"
    plain = tieify.fuse(model, x)
    assert type(plain) is _Blocks and plain is not model and plain.fused == {}
    assert not hasattr(model, "fused") or model.__dict__.get("fused") is None


@needs_kernel
def test_a_fused_model_saves_as_its_plan_and_weights(tmp_path):
    """tieify.save keeps the plan and the state (unchanged by fusing); tieify.load rebuilds
    the tied model, which equals the fused one (fuse it again for the epilogue)."""
    tied = tied_resnet50()
    fused = tieify.fuse(tied)
    tieify.save(fused, tmp_path / "fused.pt")
    loaded = tieify.load(torchvision.models.resnet50(num_classes=10), tmp_path / "fused.pt")
    loaded = loaded.eval().to(memory_format=torch.channels_last)
    x = channels_last(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_fused_model_deep_copies_and_pickles_fused(monkeypatch, tmp_path):
    tied = tied_resnet50()
    fused = tieify.fuse(tied)
    x = channels_last(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        expected = fused(x)
    copied = copy.deepcopy(fused)
    torch.save(fused, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    for other in (copied, loaded):
        assert other.fused == fused.fused and other.tieify_plan is not None
        assert list(other.state_dict()) == list(fused.state_dict())
        calls = epilogue_calls(monkeypatch)
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected, rtol=1e-4, atol=1e-4)
        # Still fused: the 1×1 chains with enough pixels and, at a batch of one, all 3×3 ones.
        assert len(calls) == 52 and all(c["scale"] for c in calls)
        monkeypatch.undo()


@needs_kernel
def test_fuse_with_example_inputs_times_chains_whose_conv_could_run_the_kernel(
    monkeypatch, tmp_path
):
    """A 3×3 conv pinned to widen (as tieify.optimize may pin it, faster alone): the chain is
    timed fused against as it runs, fused where that wins (the copy's conv then pinned to the
    kernel), and the choice is cached."""
    from tieify.latency import _optimize
    from tieify.latency._cache import JsonCache

    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("paths.json"))
    calls = []

    def timer(fns, **kwargs):
        calls.append(sorted(fns))
        # Each candidate's fastest round decides, over FUSE_REPEATS rounds.
        assert kwargs["best"] is True and kwargs["repeats"] == tieify._fuse.FUSE_REPEATS
        for fn in fns.values():  # both must run
            fn()
        return dict(faster)

    monkeypatch.setattr(_optimize, "_timer", timer)
    torch.manual_seed(0)
    model = nn.Sequential(TiedConv2d(16, 16, 3, padding=1, B=2), nn.BatchNorm2d(16), nn.ReLU())
    model = random_stats(model).eval().to(memory_format=torch.channels_last)
    model[0].path = "widen"
    x = channels_last(torch.randn(2, 16, 6, 6))
    faster = {"fused": 1.0, "separate": 2.0}
    fused = tieify.fuse(model, x)
    assert calls == [["fused", "separate"]]
    assert fused.fused == {"0": "1 + relu"} and fused.get_submodule("0").path == "kernel"
    assert model[0].path == "widen"  # the user's model is not changed
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    tieify.fuse(model, x)
    assert len(calls) == 1  # cached
    # Where the chain as it runs is faster, it is left alone (and so is the model).
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("other.json"))
    faster = {"fused": 2.0, "separate": 1.0}
    out = tieify.fuse(model, x)
    assert len(calls) == 2 and out.fused == {} and out[0].path == "widen"
    # A bank above FUSED_MAX_BANK entries (8·8·9 here) is not timed; None times any.
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("third.json"))
    faster = {"fused": 1.0, "separate": 2.0}
    monkeypatch.setattr(tieify._fuse, "FUSED_MAX_BANK", 8 * 8 * 9 - 1)
    assert tieify.fuse(model, x).fused == {} and len(calls) == 2
    monkeypatch.setattr(tieify._fuse, "FUSED_MAX_BANK", None)
    assert tieify.fuse(model, x).fused == {"0": "1 + relu"} and len(calls) == 3


@needs_kernel
def test_fuse_times_pointwise_chains_pinned_elsewhere_only_where_the_fused_rule_runs_the_kernel(
    monkeypatch, tmp_path
):
    """A 1×1 conv pinned to gemm (tieify.optimize's choice where oneDNN is faster alone, as
    with AVX-512): timed fused against as it runs where the fused rule would take the
    kernel (784 pixels and more), fused where that wins; below the rule's pixel count the
    chain is neither timed nor fused."""
    from tieify.latency import _optimize
    from tieify.latency._cache import JsonCache

    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("paths.json"))
    calls = []

    def timer(fns, **kwargs):
        calls.append(sorted(fns))
        for fn in fns.values():
            fn()
        return {"fused": 1.0, "separate": 2.0}

    monkeypatch.setattr(_optimize, "_timer", timer)
    torch.manual_seed(0)
    model = nn.Sequential(TiedConv2d(32, 64, 1, B=4), nn.BatchNorm2d(64), nn.ReLU())
    model = random_stats(model).eval().to(memory_format=torch.channels_last)
    model[0].path = "gemm"
    big = channels_last(torch.randn(4, 32, 14, 14))  # 784 pixels: the fused rule's kernel
    small = channels_last(torch.randn(3, 32, 14, 14))  # 588: the rule keeps gemm
    assert _paths.default_path(model[0], big, fused=True) == "kernel"
    assert _paths.default_path(model[0], small, fused=True) == "gemm"
    out = tieify.fuse(model, small)
    assert calls == [] and out.fused == {} and out[0].path == "gemm"
    fused = tieify.fuse(model, big)
    assert calls == [["fused", "separate"]]
    assert fused.fused == {"0": "1 + relu"} and fused.get_submodule("0").path == "kernel"
    assert model[0].path == "gemm"
    with torch.no_grad():
        torch.testing.assert_close(fused(big), model(big), rtol=1e-4, atol=1e-4)


# -- dense convs: the batch norm folded into a copy of their weights --------------------------


def _no_forward(module: nn.Module, monkeypatch) -> None:
    """Fail the test where ``module`` runs (a folded batch norm must not)."""

    def fail(*args, **kwargs):
        raise AssertionError(f"{type(module).__name__} ran; it should have been folded")

    monkeypatch.setattr(module, "forward", fail)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_dense_conv_runs_with_its_batch_norm_folded_and_equals_the_modules(dims, monkeypatch):
    torch.manual_seed(dims)
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn_type = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    folds = []
    real = _fused.fuse_conv_bn_weights
    monkeypatch.setattr(
        _fused, "fuse_conv_bn_weights", lambda *a, **k: folds.append(1) or real(*a, **k)
    )
    # (conv bias, batch norm affine, groups, residual, ReLU)
    cases = [
        (True, True, 1, True, True),
        (False, False, 4, False, True),
        (False, True, 2, True, False),
    ]
    for bias, affine, groups, with_residual, relu in cases:
        conv = conv_type(8, 12, 3, padding=1, bias=bias, groups=groups, padding_mode="reflect")
        bn = random_stats(bn_type(12, affine=affine)).eval()
        x = torch.randn(2, 8, *[5] * dims)
        r = torch.randn(2, 12, *[5] * dims) if with_residual else None
        state = {k: v.clone() for k, v in {**conv.state_dict(), **bn.state_dict()}.items()}
        with torch.no_grad():
            expected = bn(conv(x)) + (0 if r is None else r)
            expected = torch.relu(expected) if relu else expected
            with monkeypatch.context() as m:
                _no_forward(bn, m)
                folds.clear()
                for _ in range(2):  # the folded weights are made once and kept
                    y = _fused.conv_bn_act(x, conv, bn, None if r is None else r.clone(), relu)
                    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
                assert len(folds) == 1
        for k, v in {**conv.state_dict(), **bn.state_dict()}.items():  # parameters unchanged
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # New statistics (an in-place update, as training does) fold anew.
    with torch.no_grad():
        bn.running_var.mul_(4)
        expected = bn(conv(x))
        y = _fused.conv_bn_act(x, conv, bn)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert len(folds) == 2


def test_a_folded_chain_gathers_parameters_only_where_autograd_records(monkeypatch):
    """Under no_grad and inference_mode the call never walks the modules' parameters (6 µs a
    call, more than its other checks); with grad mode on it does, and folds only where
    nothing needs a gradient."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 1), random_stats(nn.BatchNorm2d(6)).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = bn(conv(x))
    walks = []
    for m in (conv, bn):
        real = m.parameters
        monkeypatch.setattr(
            m, "parameters", lambda *a, _r=real, **k: walks.append(1) or _r(*a, **k)
        )
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(_fused.conv_bn_act(x, conv, bn), expected)
    assert walks == []
    y = _fused.conv_bn_act(x, conv, bn)  # grad mode on, parameters that need gradients
    assert len(walks) == 2 and y.requires_grad  # looked, and ran the modules
    torch.testing.assert_close(y, expected)


def test_a_dense_conv_runs_the_modules_where_it_cannot_fold(monkeypatch):
    """In training, where autograd records, under tracing: the modules, one after the other
    (the batch norm updates its statistics in training, and gradients flow through it)."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3), random_stats(nn.BatchNorm2d(6))
    x = torch.randn(2, 4, 7, 7)
    before = bn.running_mean.clone()
    ref_bn = copy.deepcopy(bn)
    y = _fused.conv_bn_act(x, conv, bn, relu=True)  # training: batch statistics
    torch.testing.assert_close(y, torch.relu(ref_bn(conv(x))))
    assert not torch.equal(bn.running_mean, before)  # updated as the module does
    bn.eval()
    xg = x.clone().requires_grad_()
    y = _fused.conv_bn_act(xg, conv, bn)
    (g,) = torch.autograd.grad(y.sum(), xg)
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(g, torch.autograd.grad(bn(conv(xr)).sum(), xr)[0])
    with torch.no_grad():
        expected = bn(conv(x))
    exported = torch.export.export(_Folded(conv, bn).eval(), (x,))  # traced: the modules
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)
    assert any("batch_norm" in str(n.target) for n in exported.graph.nodes)


class _Folded(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused.conv_bn_act(x, self.conv, self.bn)


def test_fuse_folds_dense_chains_only_where_it_can_and_where_asked(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 3, padding=1),  # transposed: not folded
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 1, bias=False),
        nn.BatchNorm2d(8, track_running_stats=False),  # batch statistics: not folded
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
    )
    model = random_stats(model).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for example in (None, x):  # with an input: on any layout (no kernel involved)
        fused = tieify.fuse(model, example)
        assert fused.fused == {"0": "1 + relu", "7": "8"}
        _no_forward(fused.get_submodule("1"), monkeypatch)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        assert list(fused.state_dict()) == list(before)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    plain = tieify.fuse(model, dense=False)
    assert type(plain) is nn.Sequential and plain.fused == {}
