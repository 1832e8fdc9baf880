"""tieify's compiled kernel (pointwise products and k×k convolutions): equality with the
reference, the rule that takes it, its build cache, and what happens where it cannot be
built."""

from __future__ import annotations

import copy
import ctypes
import gc
import pickle
import warnings

import pytest
import torch
from _path_helpers import TIED, assert_matches_reference, check_all_paths, spy_kernel, to_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tieify
from tieify.latency import _optimize
from tieify.nn import TiedConv2d, _kernel, _paths


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return to_layout(x, "channels_last")


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize(
    "nd, cin, cout, B, stride, bias, batch, size",
    [
        (2, 64, 256, 8, 1, False, 2, 9),  # N = 32: a 32-column tile (AVX-512: a 2-panel one)
        (2, 128, 256, 4, 1, True, 1, 7),  # N = 64: two 32-column tiles, 196 rows (not % 3)
        (2, 96, 96, 2, 1, True, 2, 7),  # N = 48: AVX-512 tiles of 32 and 16 columns, 98 rows
        (2, 256, 64, 8, 1, True, 3, 7),  # N = 8: pair tiles (AVX-512: quad tiles); rows not a
        # multiple of 6 (12)
        (2, 66, 48, 3, 1, True, 1, 7),  # N = 16: AVX-512 quad tiles of 4 vectors; K = 22 (% 4)
        (2, 4, 64, 4, 1, False, 1, 5),  # N = 16, K = 1: the single steps only
        (2, 112, 128, 8, 1, False, 8, 32),  # N = 16 and a 4 MiB output: quad tiles streamed
        (2, 20, 16, 2, 1, True, 1, 5),  # N = 8, K = 10: AVX-512 quads, then two single steps
        (2, 24, 36, 4, 2, False, 2, 11),  # N = 9: an 8-column tile and a 1-column tail
        (2, 12, 10, 2, 1, True, 1, 5),  # N = 5: pair tiles (N <= 8), K = 6
        (2, 21, 21, 3, 1, True, 2, 7),  # N = 7, odd K = 7: pairs, then one single step
        (2, 8, 16, 8, 1, False, 3, 5),  # K = 1: the single step only
        (2, 64, 32, 4, 1, False, 8, 32),  # N = 8 and a 1 MiB output: pair tiles streamed
        (2, 8, 96, 1, 1, True, 1, 1),  # B = 1, one pixel: fewer rows than a tile
        (2, 64, 128, 2, 1, True, 4, 32),  # a 2 MiB output: written with streaming stores
        (1, 32, 48, 4, 1, True, 2, 13),
        (3, 16, 32, 4, 1, False, 2, 5),
    ],
)
def test_kernel_equals_the_reference_forward_and_backward(
    nd, cin, cout, B, stride, bias, batch, size
):
    torch.manual_seed(0)
    layer = TIED[nd](cin, cout, 1, stride=stride, B=B, bias=bias)
    x = channels_last(torch.randn(batch, cin, *(size,) * nd))
    if stride == 1 and nd == 2 and cout in (128, 32):
        assert batch * size * size * cout * 4 >= _kernel.STREAM_MIN_BYTES
    assert "kernel" in check_all_paths(layer, x)  # forward and backward (autograd records)
    with torch.no_grad():  # the other branch: the kept transposed bank, no autograd
        y = _paths.run_path(layer, x, "kernel")
        kept = _paths.run_path(layer, x, "kernel")  # the call kept, its output allocated anew
        gemm = _paths.run_path(layer, x, "gemm")  # a view of the same product's rows
    torch.testing.assert_close(y, _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kept, y, rtol=0, atol=0)
    assert _paths.is_channels_last(y)  # the output is channels-last, like the input
    assert y.stride() == kept.stride() == gemm.stride()


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize(
    "nd,cin,cout,B,bias,batch,size,stride",
    [
        (2, 64, 256, 4, True, 2, 56, 1),  # N = 64: 10 tiles of 6 and one of 4; streamed output
        (2, 256, 64, 8, False, 2, 28, 1),  # N = 8: a tile of 6 and one of 2
        (2, 10, 18, 2, True, 2, (3, 7), 1),  # N = 9, 21 pixels: the last strip overlaps
        (2, 12, 14, 2, False, 1, (4, 4), 1),  # 16 pixels: one strip
        (2, 64, 128, 4, True, 2, (15, 14), 2),  # stride 2: 8×7 kept pixels, copied out
        (2, 16, 24, 2, False, 1, (12, 12), 3),  # stride 3: 4×4 kept pixels
        (2, 16, 8, 8, True, 3, (5, 9), 1),  # K = 2, N = 1
        (2, 2, 2, 2, True, 2, (4, 4), 1),  # K = N = 1
        (1, 8, 8, 2, True, 2, 40, 1),
        (3, 8, 12, 4, False, 1, (2, 3, 4), 1),
    ],
)
def test_channels_first_kernel_equals_the_reference(nd, cin, cout, B, bias, batch, size, stride):
    """The channels-first (NCHW) product of a pointwise layer: a kept call (twice), a call
    made anew (parameters made under inference_mode), and, while autograd records, the
    batched matrix multiply with the reference's gradients; the output is NCHW."""
    torch.manual_seed(0)
    size = size if isinstance(size, tuple) else (size,) * nd
    make = lambda: TIED[nd](cin, cout, 1, stride=stride, B=B, bias=bias).eval()  # noqa: E731
    call = check_nchw_kernel(make, torch.randn(batch, cin, *size))
    assert call.planar and not call.transposed


def check_nchw_kernel(make, x: torch.Tensor):
    """The kernel path of ``make()`` on the NCHW ``x`` equals the reference forward and
    backward (every path's check), by a kept call (twice) and by one kept for parameters
    made under inference_mode (twice); its output is NCHW. Returns the kept call."""
    layer = make()
    assert "kernel" in check_all_paths(layer, x)
    ref = _paths.fold_forward(layer, x).detach()
    with torch.no_grad():
        for _ in range(2):
            y = _paths.run_path(layer, x, "kernel")
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
            assert y.is_contiguous()  # NCHW in, NCHW out
        (call,) = _paths._CALLS[layer].values()
        torch.testing.assert_close(call(x), ref, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        frozen = make()
        frozen.load_state_dict(layer.state_dict())
        for _ in range(2):
            y = _paths.run_path(frozen, x, "kernel")
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
            assert y.is_contiguous()
    assert len(_paths._CALLS[frozen]) == 1
    return call


def test_the_channels_first_kernel_takes_pointwise_and_2d_kxk_layers():
    layer = TiedConv2d(16, 32, 1, B=4)
    x = torch.randn(2, 16, 8, 8)
    kernel = _kernel.kernel_available()
    assert ("kernel" in _paths.applicable_paths(layer, x)) == kernel
    # Strided: the kept pixels (4×4 of 8×8, 4×3 of 7×5) against the 16 a strip needs.
    strided = TiedConv2d(16, 32, 1, stride=2, B=4)
    assert ("kernel" in _paths.applicable_paths(strided, x)) == kernel
    assert "kernel" not in _paths.applicable_paths(strided, torch.randn(2, 16, 7, 5))
    # k×k: the convolution kernel on a channels-last copy, of any size and stride.
    conv = TiedConv2d(16, 32, 3, stride=2, padding=1, B=4)
    assert ("kernel" in _paths.applicable_paths(conv, torch.randn(1, 16, 3, 5))) == kernel
    assert "kernel" not in _paths.applicable_paths(conv, x.transpose(2, 3))  # not dense
    for other in (
        TiedConv2d(16, 32, 3, padding=1, groups=2, B=4),  # TGC: the kernel has no groups
        TiedConv2d(16, 32, 3, padding=1, padding_mode="reflect", B=4),
    ):
        assert "kernel" not in _paths.applicable_paths(other, x)
    assert "kernel" not in _paths.applicable_paths(
        TIED[1](16, 32, 3, padding=1, B=4), torch.randn(2, 16, 20)
    )
    assert "kernel" not in _paths.applicable_paths(layer, x[..., :3, :5])  # 15 pixels
    assert "kernel" not in _paths.applicable_paths(layer, x.transpose(2, 3))  # not dense
    assert "kernel" not in _paths.applicable_paths(layer.double(), x.double())


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize(
    "cin, cout, B, k, stride, padding, dilation, bias, batch, size",
    [
        (64, 64, 2, 3, 1, 1, 1, True, 2, (8, 10)),  # 32 channels a block: Winograd
        (64, 128, 2, 3, 1, 0, 1, False, 1, (7, 7)),  # Winograd without padding
        (16, 24, 4, 3, 2, 1, 1, True, 2, (9, 11)),  # the direct conv, strided
        (12, 12, 3, 5, 1, 4, 2, False, 3, (6, 5)),  # 5×5, dilated
        (8, 16, 2, (1, 3), 1, (0, 1), 1, True, 2, (4, 6)),
    ],
)
def test_channels_first_conv_kernel_equals_the_reference(
    cin, cout, B, k, stride, padding, dilation, bias, batch, size
):
    """A k×k layer on an NCHW input: the convolution kernel on a channels-last copy, the
    output copied back to NCHW; forward and backward (autograd records: the operator), a
    kept call (twice) and one made anew (parameters made under inference_mode)."""
    torch.manual_seed(0)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    make = lambda: TiedConv2d(cin, cout, k, **geometry, B=B, bias=bias).eval()  # noqa: E731
    call = check_nchw_kernel(make, torch.randn(batch, cin, *size))
    assert call.transposed and not call.planar


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("alone", [False, True])
def test_the_rule_takes_the_kernel_for_nchw_winograd_layers_and_at_a_batch_of_one(
    monkeypatch, alone
):
    """On an NCHW input a k×k layer runs the kernel by default where the kernel wins alone
    and Winograd applies (its 2.25x fewer multiply-adds pay for the copies) or the batch is
    one; a direct conv at a larger batch keeps the fold."""
    monkeypatch.setattr(_paths, "_KERNEL_WINS_ALONE", alone)
    winograd = TiedConv2d(64, 64, 3, padding=1, B=2).eval()
    direct = TiedConv2d(32, 32, 3, padding=1, B=2).eval()  # 16 channels a block: no Winograd
    for batch in (1, 8):
        x = torch.randn(batch, 64, 14, 14)  # above NATIVE_MAX_NUMEL at a batch of one
        assert _paths.default_path(winograd, x) == ("kernel" if alone else "fold")
        expected = "kernel" if alone and batch == 1 else "fold"
        assert _paths.default_path(direct, x[:, :32]) == expected
        small = x[:, :32, :6, :6].contiguous()  # up to NATIVE_MAX_NUMEL at a batch of one
        assert _paths.default_path(direct, small) == (
            "kernel" if alone and batch == 1 else "native" if batch == 1 else "fold"
        )
        with torch.no_grad():
            torch.testing.assert_close(direct(x[:, :32]), _paths.fold_forward(direct, x[:, :32]))
        with torch.no_grad():
            torch.testing.assert_close(winograd(x), _paths.fold_forward(winograd, x))
    narrow = torch.randn(8, 64, 7, 6)  # 6 wide: below KERNEL_WINOGRAD_MIN_WIDTH
    assert _paths.KERNEL_WINOGRAD_MIN_WIDTH == 7
    monkeypatch.setattr(_paths, "_CPU_HAS_AVX512", True)
    assert _paths.default_path(winograd, narrow) == "fold"


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize(
    "shape",
    [
        (2, 64, 56, 56),  # whole strips of 16 channels, 8-pixel steps
        (3, 19, 5, 7),  # a strip of 16 channels and one of 3; 35 pixels: a 3-pixel tail
        (1, 7, 4, 4),  # fewer than 16 channels: the element-wise loop only
        (2, 33, 1, 9),
        (2, 16, 1, 1),  # one pixel: both layouts describe the same memory
    ],
)
def test_the_kernels_layout_copies_equal_pytorchs(monkeypatch, shape):
    """The kernel's copies between NCHW and channels-last hold the same values in the same
    layout as PyTorch's; an NCHW layer's kernel conv makes them so in eager inference and
    leaves them to PyTorch where autograd records. (The kernel's copy for every size here:
    by default tensors below RELAYOUT_MIN_NUMEL elements take PyTorch's.)"""
    monkeypatch.setattr(_kernel, "RELAYOUT_MIN_NUMEL", 0)
    copies = []
    relayout = _kernel.relayout
    monkeypatch.setattr(
        _kernel,
        "relayout",
        lambda t, channels_last: copies.append(channels_last) or relayout(t, channels_last),
    )
    x = torch.randn(shape)
    cl = _kernel.relayout(x, channels_last=True)
    torch.testing.assert_close(cl, x, rtol=0, atol=0)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    back = _kernel.relayout(cl, channels_last=False)
    torch.testing.assert_close(back, x, rtol=0, atol=0)
    assert back.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(_paths.to_channels_last(x), x, rtol=0, atol=0)
        torch.testing.assert_close(_paths.to_channels_first(cl), x, rtol=0, atol=0)
    assert copies == [True, False, True, False]  # the two above, then the two in no_grad
    grad = x.clone().requires_grad_()
    copied = _paths.to_channels_last(grad)  # PyTorch's copy: differentiable
    assert copied.requires_grad and copied.is_contiguous(memory_format=torch.channels_last)
    copied.sum().backward()
    torch.testing.assert_close(grad.grad, torch.ones(shape))
    assert len(copies) == 4


def test_small_tensors_take_pytorchs_layout_copy(monkeypatch):
    """Below RELAYOUT_MIN_NUMEL elements relayout copies with PyTorch (less per-call cost):
    the library is not reached, and the result is a new tensor in the asked layout even
    where both layouts describe the input's memory."""
    monkeypatch.setattr(_kernel, "_library", lambda: None)  # reaching it would fail
    for shape in ((1, 16, 16, 16), (2, 16, 1, 1), (1, 7, 4, 4)):
        x = torch.randn(shape)
        assert x.numel() < _kernel.RELAYOUT_MIN_NUMEL
        cl = _kernel.relayout(x, channels_last=True)
        assert cl.is_contiguous(memory_format=torch.channels_last)
        back = _kernel.relayout(cl, channels_last=False)
        assert back.is_contiguous() and back.data_ptr() != cl.data_ptr()
        assert cl.data_ptr() != x.data_ptr()
        torch.testing.assert_close(cl, x, rtol=0, atol=0)
        torch.testing.assert_close(back, x, rtol=0, atol=0)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_the_channels_first_kernel_refuses_operands_it_would_read_past():
    x, weight = torch.randn(2, 8, 4, 4), torch.randn(6, 4)
    wp, out = _kernel.pack_planar(weight), torch.empty(2, 12, 4, 4)
    assert wp.shape == (1, 4, 6)
    torch.testing.assert_close(wp[0], weight.t())
    got = _kernel.prepare_pointwise_planar(x, wp, None, out, 2).run(x, out)
    expected = torch.einsum("ok,nbkp->nbop", weight, x.view(2, 2, 4, 16)).reshape(out.shape)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"at least 16 pixels.*x \(2, 8, 3, 4\)"):
        _kernel.prepare_pointwise_planar(x[..., :3, :].contiguous(), wp, None, out, 2)
    with pytest.raises(ValueError, match=r"wp \(1, 3, 6\)"):
        _kernel.prepare_pointwise_planar(x, wp[:, :3].contiguous(), None, out, 2)
    with pytest.raises(ValueError, match=r"out \(2, 12, 4, 3\)"):
        _kernel.prepare_pointwise_planar(x, wp, None, out[..., :3], 2)
    with pytest.raises(ValueError, match="contiguous"):
        _kernel.prepare_pointwise_planar(x.transpose(2, 3), wp, None, out, 2)
    with pytest.raises(ValueError, match=r"bias \(5,\)"):
        _kernel.prepare_pointwise_planar(x, wp, torch.randn(5), out, 2)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_kernel_reads_the_input_in_place_and_keeps_a_transposed_bank(monkeypatch):
    layer = TiedConv2d(64, 32, 1, B=4, bias=True).eval()
    x = channels_last(torch.randn(2, 64, 8, 8))
    seen = spy_kernel(monkeypatch, lambda conv, args: args[0:1] + args[3:5])  # A, R, K
    with torch.no_grad():
        _paths.run_path(layer, x, "kernel")
    assert seen == [(x.data_ptr(), 2 * 8 * 8 * 4, 16)]
    monkeypatch.undo()
    with torch.no_grad():
        first = _paths.run_path(layer, x, "kernel")
        bank = _paths._FORMS[layer]["packed"][1][0]
        assert bank.shape == (16 * 8,) and bank.is_contiguous()  # one panel of 8: (16, 8) rows
        torch.testing.assert_close(bank, layer.weight.reshape(8, 16).t().reshape(-1))
        _paths.run_path(layer, x, "kernel")
        assert _paths._FORMS[layer]["packed"][1][0] is bank  # reused
        layer.weight.mul_(-1.0)  # a new version of the weights: a new bank
        torch.testing.assert_close(
            _paths.run_path(layer, x, "kernel"),
            -first + 2 * layer.bias.repeat(4).reshape(1, -1, 1, 1),
            rtol=1e-4,
            atol=1e-4,
        )
        assert _paths._FORMS[layer]["packed"][1][0] is not bank


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize(
    "cin, cout, k, stride, padding, bias",
    [
        (64, 32, 1, 1, 0, True),
        (24, 36, 1, 2, 0, False),
        (16, 32, 3, 1, 1, True),
        (16, 16, 3, 2, 1, False),
    ],
)
def test_eager_calls_keep_a_prepared_call_that_follows_the_parameters(
    monkeypatch, cin, cout, k, stride, padding, bias
):
    """An eager no-grad call of the kernel path prepares its call once per input layout and
    reuses it; new data of that layout, an in-place or replaced parameter, another pinned
    path, another batch and autograd all give the reference's result."""
    torch.manual_seed(0)
    layer = TiedConv2d(cin, cout, k, stride=stride, padding=padding, B=4, bias=bias).eval()
    layer.path = "kernel"
    x = channels_last(torch.randn(2, cin, 11, 12))
    calls = spy_kernel(monkeypatch)

    def check(x):
        torch.testing.assert_close(layer(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        check(x)
        (kept,) = _paths._CALLS[layer].values()
        check(channels_last(torch.randn(2, cin, 11, 12)))  # new data, the same layout
        assert list(_paths._CALLS[layer].values()) == [kept] and len(calls) == 2
        layer.weight.mul_(-0.5)  # in place: a new version, a new bank
        check(x)
        layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # replaced
        check(x)
        check(channels_last(torch.randn(3, cin, 11, 12)))  # another batch: its own call
        assert kept not in _paths._CALLS[layer].values() and len(calls) == 5
        layer.path = "grouped"  # pinned elsewhere: the kept call is not used
        check(x)
        assert len(calls) == 5
        layer.path = "kernel"
    y = layer(x.requires_grad_())  # autograd records: the operator, with its backward
    assert y.grad_fn is not None and len(calls) == 6
    if bias:  # the helper's gradients include the bias's
        check_against_the_fold(layer, x, y)
    # The kept calls live beside the layer, not in it: copies and pickles carry none.
    clone = copy.deepcopy(layer)
    assert clone not in _paths._CALLS and pickle.loads(pickle.dumps(layer)) not in _paths._CALLS
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_a_call_kept_for_timing_the_named_path_leaves_the_forward_to_the_rule(monkeypatch):
    """``run_path(layer, x, "kernel")`` (how ``optimize`` times it) keeps its call apart: the
    layer's own forward still runs the path the rule picks for that input."""
    layer = TiedConv2d(64, 64, 1, B=4).eval()
    x = channels_last(torch.randn(1, 64, 8, 8))  # 64 pixels: the rule keeps gemm
    assert _paths.select_path(layer, x) == "gemm"
    calls = spy_kernel(monkeypatch)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(
                _paths.run_path(layer, x, "kernel"), layer(x), rtol=1e-4, atol=1e-4
            )
    assert calls == [64 * 4] * 2  # the named runs only; the forward ran gemm
    assert len(_paths._CALLS[layer]) == 1


def test_banks_are_kept_for_parameters_made_under_inference_mode_until_their_values_change():
    """The forms of the bank other paths run on (the grouped path's bank repeated B times)
    are kept for parameters made under inference_mode too, with a copy of their values, and
    made again when an in-place change alters them."""
    made = []

    def repeat(weight, bias, B):
        made.append(B)
        return _paths._repeat_bank(weight, bias, B)

    x = torch.randn(2, 16, 8, 8)
    with torch.inference_mode():
        layer = TiedConv2d(16, 32, 3, padding=1, B=4)
        first = _paths._cached(layer, "repeated", repeat)
        assert _paths._cached(layer, "repeated", repeat) is first and made == [4]
        layer.weight.mul_(2.0)  # in place, the same address
        again = _paths._cached(layer, "repeated", repeat)
        assert again is not first and made == [4, 4]
        torch.testing.assert_close(again[0], _paths._repeat_bank(layer.weight, None, 4)[0])
        for _ in range(2):
            torch.testing.assert_close(
                _paths.run_path(layer, x, "grouped"),
                _paths.fold_forward(layer, x),
                rtol=1e-4,
                atol=1e-4,
            )
    assert made == [4, 4]


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_calls_are_kept_for_parameters_made_under_inference_mode_until_their_values_change(
    monkeypatch, kernel_size
):
    """Parameters made under inference_mode (a model converted or copied there) have no
    version counter: their calls are kept with a copy of the values and made again when an
    in-place change (a weight reloaded, a bias shifted) alters them. The kept calls of a
    layer are bounded, like the path memo."""
    made = counting_preparations(monkeypatch)
    x = channels_last(torch.randn(2, 16, 8, 8))
    with torch.inference_mode():
        layer = TiedConv2d(16, 16, kernel_size, padding=kernel_size // 2, B=4)
        layer.path = "kernel"
        assert layer.weight.is_inference()
        for _ in range(3):
            torch.testing.assert_close(
                layer(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4
            )
        assert len(made) == 1 and len(_paths._CALLS[layer]) == 1
        layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
        layer.bias.add_(1.0)  # in place, the same address
        torch.testing.assert_close(layer(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert len(made) == 3
    other = TiedConv2d(16, 16, 1, B=4)
    other.path = "kernel"
    with torch.no_grad():
        for h in range(1, 2 * _paths._MEMO_SIZE):
            other(channels_last(torch.randn(1, 16, h, 3)))
    assert len(_paths._CALLS[other]) <= _paths._MEMO_SIZE


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_kernel_gives_the_same_result_on_one_and_on_two_threads():
    layer = TiedConv2d(128, 64, 1, B=4, bias=False)
    x = channels_last(torch.randn(4, 128, 20, 20))
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = _paths.run_path(layer, x, "kernel")
            torch.set_num_threads(2)
            two = _paths.run_path(layer, x, "kernel")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, rtol=0, atol=0)  # rows split, same sums


def as_if_avx512(monkeypatch, avx512: bool) -> None:
    """The rule as on a CPU with AVX-512 (True) or without (False), whatever this one has."""
    monkeypatch.setattr(_paths, "_CPU_HAS_AVX512", avx512)
    monkeypatch.setattr(_paths, "_KERNEL_WINS_ALONE", not avx512)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("avx512", [False, True])
def test_the_rule_takes_the_kernel_for_large_inputs_and_small_banks(monkeypatch, avx512):
    """Unfused, on a CPU without AVX-512; for a chain tieify.fuse fused, on any."""
    as_if_avx512(monkeypatch, avx512)
    layer = TiedConv2d(64, 64, 1, B=4).eval()  # the rule for inference
    # 784 pixels: the threshold, reached by batch and spatial size together.
    big = channels_last(torch.randn(4, 64, 14, 14))
    small = channels_last(torch.randn(3, 64, 14, 14))
    assert 4 * 14 * 14 == _paths.KERNEL_MIN_PIXELS
    assert _paths.default_path(layer, small) == "gemm"
    assert _paths.default_path(layer, big) == ("gemm" if avx512 else "kernel")
    assert _paths.default_path(layer, big, fused=True) == "kernel"
    assert _paths.default_path(layer, small, fused=True) == "gemm"
    # The per-layer memo tells the two batches apart.
    layer._path_memo = {}
    for x in (small, big, small):
        expected = "kernel" if x is big and not avx512 else "gemm"
        assert _paths.select_path(layer, x) == expected
        torch.testing.assert_close(layer(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    # A bank above KERNEL_MAX_BANK entries keeps the BLAS paths (widen: many pixels).
    wide = TiedConv2d(512, 528, 1, B=2).eval()
    assert 256 * 264 > _paths.KERNEL_MAX_BANK >= 128 * 512
    x = channels_last(torch.randn(1, 512, 64, 64))
    assert "kernel" in _paths.applicable_paths(wide, x)
    assert _paths.default_path(wide, x) == ("gemm" if avx512 else "widen")
    assert _paths.default_path(wide, x, fused=True) == ("gemm" if avx512 else "widen")
    # Not float32 or traced: the kernel does not apply.
    assert "kernel" not in _paths.applicable_paths(layer.to(torch.bfloat16), big.bfloat16())
    layer.float()
    # NCHW: the channels-first product, by the same rule (else the native fold).
    assert _paths.default_path(layer, big.contiguous()) == ("native" if avx512 else "kernel")
    assert _paths.default_path(layer, small.contiguous()) == "native"
    thin = TiedConv2d(16, 64, 1, B=8).eval()  # 2 input channels a block: native on NCHW
    assert _paths.default_path(thin, big[:, :16].contiguous()) == "native"
    thin_cl = channels_last(big[:, :16].contiguous())
    assert _paths.default_path(thin, thin_cl) == ("gemm" if avx512 else "kernel")
    grouped = TiedConv2d(64, 64, 3, padding=1, groups=2, B=4)
    assert "kernel" not in _paths.applicable_paths(grouped, big)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("avx512", [False, True])
def test_the_conv_rule_takes_the_kernel_at_batch_one_and_fused_from_28_wide(monkeypatch, avx512):
    """Unfused, k×k layers keep widen above a batch of one; for a chain tieify.fuse fused,
    the rule takes the kernel where the output is at least 28 wide; at a batch of one it
    takes the kernel, fused or not (on a CPU with AVX-512: fused only); by Winograd from 14
    wide; and where a stride along the width rules widen out, at any width and batch (on a
    CPU with AVX-512: fused only), never lift."""
    as_if_avx512(monkeypatch, avx512)
    assert _paths.KERNEL_CONV_MIN_WIDTH == 28
    layer = TiedConv2d(16, 16, 3, padding=1, B=4).eval()  # the rule for inference
    strided = TiedConv2d(16, 16, 3, stride=2, padding=1, B=4).eval()
    for x, width in [(torch.randn(2, 16, 5, 28), 28), (torch.randn(2, 16, 5, 27), 27)]:
        x = channels_last(x)
        assert _paths.output_size(layer, x)[-1] == width
        kernel = width >= 28
        assert _paths.default_path(layer, x) == "widen"
        assert _paths.default_path(layer, x, fused=True) == ("kernel" if kernel else "widen")
        assert _paths.select_path(layer, x, fused=True) == ("kernel" if kernel else "widen")
        assert _paths.select_path(layer, x) == "widen"  # the memo keeps the two apart
        # Widen cannot stride across blocks: a strided layer takes the kernel at any width.
        assert "widen" not in _paths.applicable_paths(strided, x)
        assert _paths.default_path(strided, x, fused=True) == "kernel"
        assert _paths.default_path(strided, x) == ("grouped" if avx512 else "kernel")
        # One sample of the same input: the kernel, fused or not, at any width.
        one = x[:1]
        for fused in (False, True):
            alone = avx512 and not fused
            assert _paths.default_path(layer, one, fused) == ("widen" if alone else "kernel")
            assert _paths.select_path(layer, one, fused) == ("widen" if alone else "kernel")
            assert _paths.default_path(strided, one, fused) == ("grouped" if alone else "kernel")
        assert _paths.select_path(layer, x) == "widen"  # the memo tells the batches apart
    x = channels_last(torch.randn(2, 16, 3, 56))
    assert _paths.default_path(strided, x, fused=True) == "kernel"
    assert _paths.default_path(strided, x) == ("grouped" if avx512 else "kernel")
    with torch.no_grad():
        torch.testing.assert_close(strided(x), _paths.lift_forward(strided, x))
    # A pinned path is kept, fused or not.
    layer.path = "widen"
    assert _paths.select_path(layer, x, fused=True) == "widen"
    assert _paths.select_path(layer, x[:1]) == "widen"
    layer.path = "auto"
    # Many pixels (the pointwise rule's count) do not decide a k×k layer: its width does.
    many = channels_last(torch.randn(8, 16, 14, 14))
    assert _paths._pixels(many) >= _paths.KERNEL_MIN_PIXELS
    assert _paths.default_path(layer, many, fused=True) == "widen"
    # A layer the kernel runs by Winograd's F(2×2, 3×3) (32 channels a block) takes it at
    # any batch from an output 7 wide, with AVX-512 or without (fused, or unfused where the
    # kernel wins alone); narrower, the rule above decides. Stride 2 is not Winograd's.
    least = _paths.KERNEL_WINOGRAD_MIN_WIDTH
    assert least == 7
    wide = TiedConv2d(64, 64, 3, padding=1, B=2).eval()
    wide_strided = TiedConv2d(64, 64, 3, stride=2, padding=1, B=2).eval()
    for width in (least, least - 1):
        x = channels_last(torch.randn(2, 64, 3, width))
        winograd = width >= least
        assert _paths.default_path(wide, x, fused=True) == ("kernel" if winograd else "widen")
        assert _paths.default_path(wide, x) == ("kernel" if winograd and not avx512 else "widen")
        assert _paths.default_path(wide_strided, x, fused=True) == "kernel"
    # 'same' padding that is asymmetric (an even kernel) is not the kernel's.
    even = TiedConv2d(16, 16, 2, padding="same", B=4)
    assert "kernel" not in _paths.applicable_paths(even, x)
    assert "kernel" in _paths.applicable_paths(TiedConv2d(16, 16, 3, padding="same", B=4), x)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize(
    "cin, cout, B, k, stride, padding, dilation, bias, batch, size",
    [
        (32, 32, 4, 3, 1, 1, 1, True, 2, (5, 23)),  # K = N = 8: block pairs of 7 pixels
        (24, 24, 3, 3, 1, 1, 1, True, 2, (5, 23)),  # K = N = 8, odd blocks: pixel tiles of 10
        (64, 64, 8, 3, 1, 1, 1, True, 1, (6, 5)),  # K = N = 8, 5 wide: pixel tiles of 4
        (64, 64, 4, 3, 1, 1, 1, True, 2, (5, 23)),  # N = 16: AVX-512 pixel tiles of 14, overlap
        (64, 64, 2, 3, 1, 1, 1, False, 2, (5, 23)),  # N = 32: AVX-512 pixel tiles of 7, 2 vectors
        (64, 64, 4, 3, 1, 1, 1, False, 4, (40, 40)),  # N = 16, a 1.6 MiB output: streamed
        (16, 8, 2, 3, 1, 1, 1, False, 1, (4, 7)),  # N = 4 < 8: pixel tiles of 4, a padded bank
        (16, 16, 2, 3, 1, 0, 1, True, 2, (6, 5)),  # 3 wide outputs: single-pixel tiles
        (24, 72, 2, 3, 1, 1, 1, True, 2, (7, 9)),  # N = 36: 16 + 16 + a 4-column tail; overlap
        (64, 64, 4, 3, 2, 1, 1, False, 2, (9, 12)),  # stride 2: two phases, row tiles
        (12, 30, 3, 5, 3, 2, 1, True, 1, (11, 13)),  # 5×5, stride 3, N = 10
        (16, 32, 2, 3, 1, 2, 2, True, 2, (8, 10)),  # dilation 2, N = 16
        (8, 16, 2, (1, 3), 1, (0, 1), 1, False, 2, (4, 6)),  # 1×3, padding only along W
        (32, 32, 4, (3, 1), 1, (1, 0), 1, True, 1, (5, 30)),  # 3×1: N = 8, not 3 wide
        (64, 64, 8, 3, 1, 1, 1, False, 4, (40, 40)),  # a 1.6 MiB output: streaming stores
        # Winograd's F(2×2, 3×3) (K, N >= 32): odd sizes (tiles partly outside the output),
        # padding 0 and 2, N = 48 (panels of 32 and 16), K = 33 (a pixel of 66 channels:
        # vectors of 16, then one by one), 3 blocks, a 7×7 input (runs of several tile rows)
        (64, 96, 2, 3, 1, 1, 1, True, 2, (5, 23)),
        (66, 64, 2, 3, 1, 0, 1, True, 1, (9, 8)),
        (96, 96, 3, 3, 1, 2, 1, False, 2, (6, 7)),
        (128, 128, 2, 3, 1, 1, 1, True, 3, (7, 7)),
        (96, 96, 3, 3, 1, 1, 1, True, 1, (3, 181)),  # 91 tiles a row, runs of 85: split rows
    ],
)
@pytest.mark.parametrize("winograd", [True, False])
def test_conv_kernel_equals_the_reference_forward_and_backward(
    cin, cout, B, k, stride, padding, dilation, bias, batch, size, winograd, monkeypatch
):
    """Each case by the direct kernel and, where it applies, by Winograd's F(2×2, 3×3)."""
    if not winograd:  # no bank is large enough
        monkeypatch.setattr(_kernel, "WINOGRAD_MIN_CHANNELS", 1 << 30)
    torch.manual_seed(0)
    layer = TiedConv2d(
        cin, cout, k, stride=stride, padding=padding, dilation=dilation, B=B, bias=bias
    )
    x = channels_last(torch.randn(batch, cin, *size))
    if size == (40, 40):
        assert batch * 40 * 40 * cout * 4 >= _kernel.STREAM_MIN_BYTES
    assert "kernel" in check_all_paths(layer, x)  # forward and backward (the operator)
    with torch.no_grad():  # the direct call, with the kept bank
        y = _paths.run_path(layer, x, "kernel")
    torch.testing.assert_close(y, _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert _paths.is_channels_last(y)
    K, N = cin // B, cout // B
    applies = _kernel.winograd_applies(K, N, B, layer.kernel_size, layer.stride, layer.dilation)
    assert applies == (winograd and k == 3 and stride == dilation == 1 and min(K, N) >= 32)
    kh, kw = layer.kernel_size
    kind, points = ("winograd", 16) if applies else ("taps", kh * kw)
    bank = _paths._FORMS[layer][kind][1][0]
    assert bank.shape == (points * K * -(-N // 8) * 8,)  # packed


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_conv_kernel_epilogue_and_threads():
    """The conv's epilogue (per-block scale and shift, residual, ReLU) against the separate
    operators, on pixel tiles (8 and 16 columns) and row tiles (24 columns), and by
    Winograd's F(2×2, 3×3) (32 channels a block), and the same sums on one and on two
    threads."""
    torch.manual_seed(0)
    cases = [(32, 32, 4, 1), (32, 48, 2, 2), (64, 64, 4, 1), (64, 64, 2, 1), (128, 96, 4, 1)]
    for cin, cout, B, stride in cases:
        layer = TiedConv2d(cin, cout, 3, stride=stride, padding=1, B=B, bias=True)
        x = channels_last(torch.randn(2, cin, 12, 21))
        o = cout // B
        scale, shift = torch.randn(B, o), torch.randn(B, o)
        with torch.no_grad():
            y = _paths.fold_forward(layer, x)
        residual = channels_last(torch.randn_like(y))
        expected = torch.relu(
            y * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1) + residual
        )
        outs = []
        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with torch.no_grad():
                    outs.append(
                        _paths.kernel_conv_call(
                            layer, x, layer.bias, scale=scale, shift=shift,
                            residual=_paths.channels_inner(residual).contiguous(), relu=True,
                        )
                    )  # fmt: skip
        finally:
            torch.set_num_threads(before)
        torch.testing.assert_close(outs[0], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_winograd_rule_banks_and_an_epilogue_of_fewer_blocks():
    """Winograd's F(2×2, 3×3) runs 3×3 convs with stride and dilation 1 of at least 32
    channels a block on both sides; an epilogue's blocks must divide the conv's (its scale
    of block b % blocks); anything else is refused with the rule."""
    rule = _kernel.winograd_applies
    assert rule(32, 32, 2, (3, 3), (1, 1), (1, 1))
    assert not rule(16, 32, 2, (3, 3), (1, 1), (1, 1))  # K below 32
    assert not rule(32, 31, 2, (3, 3), (1, 1), (1, 1))  # N below 32
    assert not rule(32, 32, 2, (3, 3), (2, 2), (1, 1))  # a stride
    assert not rule(32, 32, 2, (3, 3), (1, 1), (2, 2))  # a dilation
    assert not rule(32, 32, 2, (5, 5), (1, 1), (1, 1))  # another filter
    assert rule(32, 32, 4, (3, 3), (1, 1), (1, 1), epilogue_blocks=2)
    assert not rule(32, 32, 4, (3, 3), (1, 1), (1, 1), epilogue_blocks=3)
    gen = torch.Generator().manual_seed(0)
    B, K, N, (n, h, w) = 4, 32, 40, (2, 7, 9)
    x = torch.randn(n, B * K, h, w, generator=gen)
    weight, bias = torch.randn(N, K, 3, 3, generator=gen), torch.randn(N, generator=gen)
    scale, shift = torch.randn(2, N, generator=gen), torch.randn(2, N, generator=gen)
    y = torch.nn.functional.conv2d(x.reshape(n * B, K, h, w), weight, bias, 1, 1)
    blockwise = y.reshape(n, B, N, h, w) * scale.repeat(2, 1)[:, :, None, None]
    blockwise = blockwise + shift.repeat(2, 1)[:, :, None, None]  # block b takes row b % 2
    expected = blockwise.reshape(n, B * N, h, w).permute(0, 2, 3, 1)
    bank = _kernel.winograd_bank(weight)
    assert bank.shape == (16 * K * N,)
    xc = x.permute(0, 2, 3, 1).contiguous()
    geometry = {"blocks": B, "kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1)}
    geometry["dilation"] = (1, 1)
    got = _kernel.conv2d(
        xc, bank, bias, torch.empty(n, h, w, B * N), scale=scale, shift=shift, winograd=True,
        **geometry,
    )  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"blocks that divide the conv's.*scale \(3, 40\)"):
        _kernel.conv2d(
            xc, bank, bias, torch.empty(n, h, w, B * N), scale=scale.repeat(2, 1)[:3],
            shift=shift.repeat(2, 1)[:3], winograd=True, **geometry,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"stride 1.*stride=\(2, 2\)"):
        _kernel.conv2d(
            xc, bank, None, torch.empty(n, 4, 5, B * N), winograd=True,
            **{**geometry, "stride": (2, 2)},
        )  # fmt: skip
    taps = _kernel.pack(weight.permute(2, 3, 1, 0).reshape(9 * K, N))
    with pytest.raises(ValueError, match=r"winograd_bank makes it \(1-D, 20480 entries"):
        _kernel.conv2d(xc, taps, None, torch.empty(n, h, w, B * N), winograd=True, **geometry)


@st.composite
def pointwise_cases(draw):
    """A pointwise product the kernel runs in each of its tiles: K = 1-70 (with AVX-512 a
    quad tile's groups of four rows and a tail of 0-3), N of up to 8 (pair or quad tiles),
    16 (quad tiles with AVX-512), a multiple of 32 (32-column tiles without AVX-512), or
    wider (tiles of rows, with a narrow part), rows that are not a multiple of a tile's, and
    an epilogue of 1-3 blocks or none."""
    K = draw(st.integers(1, 70))
    N = draw(st.sampled_from([1, 3, 5, 8, 12, 16, 16, 17, 24, 32, 40, 64]))
    blocks = draw(st.integers(1, 3))
    rows = blocks * draw(st.integers(1, 30))
    return K, N, rows, blocks, draw(st.sampled_from(["none", "bias", "affine", "all"]))


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pointwise_cases(), st.integers(0, 2**16))
def test_pointwise_kernel_equals_a_matmul_on_random_shapes(case, seed):
    """The product and its epilogue (per-block affine, residual, ReLU) against PyTorch's."""
    K, N, rows, blocks, epilogue = case
    gen = torch.Generator().manual_seed(seed)
    a, bt = torch.randn(rows, K, generator=gen), torch.randn(K, N, generator=gen)
    bias = torch.randn(N, generator=gen) if epilogue != "none" else None
    expected = a @ bt + (bias if bias is not None else 0)
    kw: dict = {}
    if epilogue in ("affine", "all"):
        scale, shift = torch.randn(blocks, N, generator=gen), torch.randn(blocks, N, generator=gen)
        block = torch.arange(rows) % blocks
        expected = expected * scale[block] + shift[block]
        kw |= {"scale": scale, "shift": shift}
    if epilogue == "all":
        residual = torch.randn(rows, N, generator=gen)
        expected = torch.relu(expected + residual)
        kw |= {"residual": residual, "relu": True}
    out = _kernel.pointwise(a, bt, bias, torch.empty(rows, N), **kw)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@st.composite
def winograd_cases(draw):
    """A 3×3 tied conv the kernel runs by Winograd: 32-40 channels a block in and out, 1-3
    blocks, padding 0-2, odd and even sizes (tiles partly outside), one or two images."""
    B = draw(st.integers(1, 3))
    K, N = draw(st.integers(32, 40)), draw(st.integers(32, 40))
    padding = draw(st.integers(0, 2))
    h, w = (draw(st.integers(max(1, 3 - 2 * padding), 9)) for _ in range(2))
    return B, K, N, padding, (h, w), draw(st.integers(1, 2)), draw(st.booleans())


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(winograd_cases(), st.integers(0, 2**16))
def test_winograd_equals_the_reference_on_random_shapes(case, seed):
    """Forward (the direct call) and forward and backward (the operator) against the fold."""
    B, K, N, padding, size, n, bias = case
    torch.manual_seed(seed)
    layer = TiedConv2d(B * K, B * N, 3, padding=padding, B=B, bias=bias)
    assert _kernel.winograd_applies(K, N, B, (3, 3), (1, 1), (1, 1))
    x = channels_last(torch.randn(n, B * K, *size))
    with torch.no_grad():
        y = _paths.run_path(layer, x, "kernel")
    torch.testing.assert_close(y, _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert "winograd" in _paths._FORMS[layer]
    xg = x.clone().requires_grad_()
    yg = _paths.run_path(layer, xg, "kernel")  # the tieify::conv2d operator
    params = (xg, layer.weight, *([layer.bias] if bias else []))
    grads = torch.autograd.grad(yg.square().sum(), params)
    ref = _paths.fold_forward(layer, xg)
    torch.testing.assert_close(yg, ref, rtol=1e-4, atol=1e-4)
    expected = torch.autograd.grad(ref.square().sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("tiles", [1, 3, 4, 5, 11, 12, 13, 15, 16, 24, 26, 28, 35])
def test_winograd_products_of_every_row_count(tiles):
    """A run's products take tiles of WIDE_MR rows (12 with AVX-512), then of 4 (the last
    overlapping the rows before), or single rows below 4: one block and a 2-high image of
    ``tiles`` 2×2 tiles gives products of that many rows (runs of at most 24 tiles: more
    give a run of 24 and the rest), every remainder equal to the reference."""
    torch.manual_seed(tiles)
    layer = TiedConv2d(32, 32, 3, padding=1, B=1, bias=True)
    x = channels_last(torch.randn(1, 32, 2, 2 * tiles))
    with torch.no_grad():
        y = _paths.run_path(layer, x, "kernel")
    assert "winograd" in _paths._FORMS[layer]
    torch.testing.assert_close(y, _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_winograd_keeps_non_finite_values_to_the_outputs_that_see_them():
    """A NaN or an infinity in the input reaches exactly the outputs whose 3×3 field holds it,
    as in the direct convolution, though an infinity arrives there as NaN (the transforms
    subtract it from itself); every other output is the reference's."""
    torch.manual_seed(0)
    layer = TiedConv2d(64, 64, 3, padding=1, B=2)
    assert _kernel.winograd_applies(32, 32, 2, (3, 3), (1, 1), (1, 1))
    for value in (float("inf"), float("nan")):
        for i, j in [(0, 0), (3, 4), (5, 6), (2, 7)]:  # corners and edges of 2×2 tiles
            x = torch.randn(1, 64, 6, 8)
            x[0, 5, i, j] = value
            x = channels_last(x)
            with torch.no_grad():
                y = _paths.run_path(layer, x, "kernel")
                ref = _paths.fold_forward(layer, x)
            finite = torch.isfinite(ref)
            assert torch.equal(torch.isfinite(y), finite)
            torch.testing.assert_close(y[finite], ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("winograd", [False, True])
def test_conv_epilogue_of_fewer_blocks_or_none_on_every_tile(winograd, monkeypatch):
    """A residual and a ReLU without an affine, and an affine of 2 rows for a conv of 4
    blocks (block b takes row b % 2), on pixel tiles (N = 5, 8, 16 and 32 columns) and row
    tiles (stride 2; N = 24), directly and by Winograd (32 channels a block); an affine
    whose rows do not divide the blocks is refused."""
    if not winograd:
        monkeypatch.setattr(_kernel, "WINOGRAD_MIN_CHANNELS", 1 << 30)
    gen = torch.Generator().manual_seed(0)
    geometry = {"kernel_size": (3, 3), "padding": (1, 1), "dilation": (1, 1)}
    for B, k, n_out, stride in [(4, 3, 5, 1), (4, 8, 8, 1), (4, 16, 16, 1), (4, 32, 32, 1),
                                (4, 4, 24, 2), (2, 32, 40, 1)]:  # fmt: skip
        n, h, w = 2, 6, 23
        x = torch.randn(n, B * k, h, w, generator=gen)
        weight = torch.randn(n_out, k, 3, 3, generator=gen)
        y = torch.nn.functional.conv2d(x.reshape(n * B, k, h, w), weight, None, stride, 1)
        ho, wo = y.shape[2:]
        y = y.reshape(n, B, n_out, ho, wo)
        scale, shift = torch.randn(2, n_out, generator=gen), torch.randn(2, n_out, generator=gen)
        affine = y * scale.repeat(B // 2, 1)[:, :, None, None]
        affine = affine + shift.repeat(B // 2, 1)[:, :, None, None]
        residual = torch.randn(n, ho, wo, B * n_out, generator=gen)
        y, affine = (t.reshape(n, B * n_out, ho, wo).permute(0, 2, 3, 1) for t in (y, affine))
        xc = x.permute(0, 2, 3, 1).contiguous()
        use = winograd and stride == 1 and min(k, n_out) >= 32
        bank = (
            _kernel.winograd_bank(weight)
            if use
            else weight.permute(2, 3, 1, 0).reshape(9 * k, n_out)
        )
        run = {**geometry, "blocks": B, "stride": (stride, stride), "winograd": use}
        out = torch.empty(n, ho, wo, B * n_out)
        got = _kernel.conv2d(xc, bank, None, out, residual=residual, relu=True, **run)
        torch.testing.assert_close(got, torch.relu(y + residual), rtol=1e-4, atol=1e-4)
        got = _kernel.conv2d(xc, bank, None, out, scale=scale, shift=shift, **run)
        torch.testing.assert_close(got, affine, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"blocks that divide the conv's.*scale \(3, 40\)"):
        _kernel.conv2d(
            xc, bank, None, out, scale=torch.ones(3, n_out), shift=torch.ones(3, n_out), **run
        )


def test_conv_kernel_refuses_operands_it_would_read_past():
    if not _kernel.kernel_available():
        pytest.skip(_kernel.kernel_status())
    x = torch.randn(1, 5, 5, 8)
    bank = torch.randn(9 * 4, 4)
    geometry = {"blocks": 2, "kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1)}
    geometry["dilation"] = (1, 1)
    ok = _kernel.conv2d(x, bank, None, torch.empty(1, 5, 5, 8), **geometry)
    assert ok.shape == (1, 5, 5, 8)
    with pytest.raises(ValueError, match=r"out \(n, ho, wo, blocks·N\).*out \(1, 4, 5, 8\)"):
        _kernel.conv2d(x, bank, None, torch.empty(1, 4, 5, 8), **geometry)
    with pytest.raises(ValueError, match=r"bank bt as \(9·K, N\) = \(36, 4\).*got \(36, 3\)"):
        _kernel.conv2d(x, bank[:, :3], None, torch.empty(1, 5, 5, 8), **geometry)
    with pytest.raises(ValueError, match="dense: False"):
        _kernel.conv2d(x.transpose(1, 2), bank, None, torch.empty(1, 5, 5, 8), **geometry)
    with pytest.raises(ValueError, match="dtypes"):
        _kernel.conv2d(x, bank.double(), None, torch.empty(1, 5, 5, 8), **geometry)
    strided = torch.randn(1, 5, 8, 5).transpose(2, 3)  # the output's shape, not its layout
    with pytest.raises(ValueError, match="dense x"):
        _kernel.conv2d(x, bank, None, torch.empty(1, 5, 5, 8), residual=strided, **geometry)


def conv_input_shape(conv: bool, args: tuple) -> tuple[int, ...] | None:
    """A kernel call's (n, h, w, channels) input, read from a convolution's geometry."""
    if not conv:
        return None
    n, h, w, blocks, k = (ctypes.c_int64 * 5).from_address(args[1])
    return (n, h, w, blocks * k)


def counting_kernel_calls(monkeypatch) -> list[int]:
    """Count the kernel's pointwise calls (the rows of each)."""
    return spy_kernel(monkeypatch)


def check_against_the_fold(layer, x, y) -> torch.Tensor:
    """``y`` (computed from ``x`` by ``layer``, with autograd) and its gradients equal the
    reference fold's; ``y`` is channels-last. Returns the fold's output."""
    grads = torch.autograd.grad(y.square().sum(), (x, layer.weight, layer.bias))
    ref = _paths.fold_forward(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    expected = torch.autograd.grad(ref.square().sum(), (x, layer.weight, layer.bias))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert _paths.is_channels_last(y)
    return ref


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_calls_the_kernel_as_an_operator(monkeypatch, backend):
    """A compiled graph runs the kernel (the tieify::pointwise operator, forward; the backward
    is matrix products), with the same values and gradients as the reference fold."""
    as_if_avx512(monkeypatch, False)  # the rule's unfused choice there: the kernel
    calls = counting_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    layer = TiedConv2d(64, 128, 1, B=4, bias=True)
    layer.path = "kernel"  # training: the rule would leave the kernel (test_the_training_rule)
    x = channels_last(torch.randn(4, 64, 16, 16)).requires_grad_()
    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)
    y = compiled(x)
    assert calls == [4 * 16 * 16 * 4]
    check_against_the_fold(layer, x, y)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("cin, cout, B", [(16, 32, 4), (64, 64, 2)])  # direct, Winograd
def test_torch_compile_calls_the_conv_kernel_as_an_operator(monkeypatch, backend, cin, cout, B):
    """A 3×3 layer pinned to the kernel: the compiled graph runs it (the tieify::conv2d
    operator, by Winograd's F(2×2, 3×3) from 32 channels a block; the backward is the
    fold's), with the reference's values and gradients, also with a dynamic batch."""
    calls = spy_kernel(monkeypatch, describe=conv_input_shape)
    banks: list[int] = []
    make_bank = _kernel.winograd_bank
    monkeypatch.setattr(_kernel, "winograd_bank", lambda w: banks.append(1) or make_bank(w))
    torch.manual_seed(0)
    torch._dynamo.reset()  # fresh code caches: other tests compiled the same forward
    layer = TiedConv2d(cin, cout, 3, padding=1, B=B, bias=True)
    layer.path = "kernel"
    x = channels_last(torch.randn(2, cin, 5, 28)).requires_grad_()
    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)
    y = compiled(x)
    assert calls == [(2, 5, 28, cin)]
    assert bool(banks) == (cin // B >= 32)
    ref = check_against_the_fold(layer, x, y)
    calls.clear()
    with torch.no_grad():
        dynamic = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
        for batch in (2, 1):
            torch.testing.assert_close(dynamic(x[:batch]), ref[:batch], rtol=1e-4, atol=1e-4)
    assert calls == [(2, 5, 28, cin), (1, 5, 28, cin)]
    torch._dynamo.reset()


def counting_preparations(monkeypatch) -> list[str]:
    """Record every call the operators make ready (packing the bank), by kind."""
    made: list[str] = []
    for kind in ("pointwise", "conv2d"):
        prepare = getattr(_kernel, f"prepare_{kind}")
        monkeypatch.setattr(
            _kernel,
            f"prepare_{kind}",
            lambda *a, _p=prepare, _k=kind, **kw: made.append(_k) or _p(*a, **kw),
        )
    return made


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_compiled_graphs_keep_the_operators_calls_until_the_parameters_change(
    monkeypatch, kernel_size
):
    """A compiled graph's operator packs the bank on its first call only; an in-place update
    of the weight or the bias, or new parameters, make it pack again, and every output
    equals the reference fold with the parameters of the moment."""
    made = counting_preparations(monkeypatch)
    _paths._OPERATOR_CALLS.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = TiedConv2d(32, 64, kernel_size, padding=kernel_size // 2, B=4, bias=True).eval()
    layer.path = "kernel"
    x = channels_last(torch.randn(2, 32, 12, 12))
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    kind = "pointwise" if kernel_size == 1 else "conv2d"

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(
                compiled(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4
            )

    for _ in range(3):
        check()
    assert made == [kind]
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    check()
    with torch.no_grad():
        layer.bias.add_(1.0)
    check()
    check()
    assert made == [kind] * 3
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    check()
    assert made == [kind] * 4
    torch._dynamo.reset()


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_operator_calls_are_kept_for_parameters_only_and_one_library(monkeypatch):
    """A call is kept for parameters, those made under inference_mode (no version counter:
    their values are compared) too, and made again after an in-place change of either; a
    plain tensor (which may be an alias that does not share its parameter's version counter)
    is made ready on every call. A call kept for one library is not run with another (a
    rebuilt kernel)."""
    _paths._OPERATOR_CALLS.clear()
    made = counting_preparations(monkeypatch)
    a = torch.randn(96, 16)
    weight, bias = torch.randn(8, 16, 1, 1), torch.randn(8)

    def run(w: torch.Tensor, b: torch.Tensor) -> None:
        expected = a @ w.detach().view(8, 16).t() + b.detach()
        for _ in range(2):
            with torch.no_grad():
                torch.testing.assert_close(_paths.pointwise_op(a, w, b), expected)

    run(weight, bias)
    assert made == ["pointwise"] * 2 and len(_paths._OPERATOR_CALLS) == 0
    with torch.inference_mode():
        frozen = (nn.Parameter(weight.clone()), nn.Parameter(bias.clone()))
    run(*frozen)
    assert made == ["pointwise"] * 3 and len(_paths._OPERATOR_CALLS) == 1
    with torch.inference_mode():
        frozen[0][0, 0, 0, 0] += 1.0  # no version to see it by: the values differ
        run(*frozen)
    assert made == ["pointwise"] * 4 and len(_paths._OPERATOR_CALLS) == 1
    params = (nn.Parameter(weight.clone()), nn.Parameter(bias.clone()))
    run(*params)
    assert made == ["pointwise"] * 5 and len(_paths._OPERATOR_CALLS) == 2
    with torch.no_grad():
        params[1].add_(1.0)
    run(*params)
    assert made == ["pointwise"] * 6 and len(_paths._OPERATOR_CALLS) == 2
    calls = spy_kernel(monkeypatch)
    run(*params)
    assert made == ["pointwise"] * 7 and calls == [96, 96]


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_compiled_graphs_keep_the_operators_calls_of_parameters_made_under_inference_mode(
    monkeypatch,
):
    """A model converted under inference_mode holds inference tensors as parameters; its
    compiled graph packs the bank once, packs it again after an in-place change made under
    inference_mode, and equals the reference fold throughout."""
    made = counting_preparations(monkeypatch)
    _paths._OPERATOR_CALLS.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = TiedConv2d(32, 64, 3, padding=1, B=4, bias=True).eval()
    layer.path = "kernel"
    x = channels_last(torch.randn(2, 32, 12, 12))
    with torch.inference_mode():
        frozen = copy.deepcopy(layer).to(memory_format=torch.channels_last)
        assert all(p.is_inference() for p in frozen.parameters())
        compiled = torch.compile(frozen, fullgraph=True, dynamic=False)
        for _ in range(3):
            torch.testing.assert_close(
                compiled(x), _paths.fold_forward(frozen, x), rtol=1e-4, atol=1e-4
            )
        assert made == ["conv2d"]
        frozen.weight.mul_(-2.0)
        for _ in range(2):
            torch.testing.assert_close(
                compiled(x), _paths.fold_forward(frozen, x), rtol=1e-4, atol=1e-4
            )
    assert made == ["conv2d"] * 2
    torch._dynamo.reset()


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_kept_operator_calls_never_keep_a_model_alive_and_are_bounded(monkeypatch):
    """A kept call holds copies, not the parameters: a dead bank's storage expires and its
    call is dropped at the next insertion past the limit; live calls beyond the limit drop
    the oldest half."""
    calls = _paths._OperatorCalls()
    monkeypatch.setattr(calls, "LIMIT", 4)
    a = torch.randn(12, 8)

    def run(bt: nn.Parameter) -> None:
        def prepare() -> _kernel.Prepared:
            return _kernel.prepare_pointwise(a, _kernel.pack(bt).clone(), None, a.new_empty(12, 8))

        call = calls.get((bt, None), ("pointwise", a.shape), prepare)
        torch.testing.assert_close(call.run(a, torch.empty(12, 8)), a @ bt)

    live = [nn.Parameter(torch.randn(8, 8)) for _ in range(5)]
    for bt in live[:3]:
        run(bt)
    dead = nn.Parameter(torch.randn(8, 8))
    run(dead)
    ref = torch.multiprocessing.reductions.StorageWeakRef(dead.untyped_storage())
    del dead
    gc.collect()
    assert ref.expired() and len(calls) == 4
    run(live[3])  # full: the dead bank's call goes, the live ones stay
    assert len(calls) == 4
    for bt in live[:4]:  # all kept: no insertion
        run(bt)
    assert len(calls) == 4
    run(live[4])  # full, none dead: the oldest half goes
    assert len(calls) == 3


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_compiled_graphs_take_the_kernel_only_where_the_sizes_prove_the_rule(monkeypatch):
    as_if_avx512(monkeypatch, False)  # the rule's unfused choice there: the kernel
    torch._dynamo.reset()
    calls = counting_kernel_calls(monkeypatch)
    layer = TiedConv2d(64, 64, 1, B=4).eval()
    x = channels_last(torch.randn(4, 64, 14, 14))  # 784 pixels
    with torch.no_grad():
        # Dynamic sizes: the count is not known, so no guard on it, and the BLAS path.
        dynamic = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
        for batch in (4, 2):
            torch.testing.assert_close(dynamic(x[:batch]), layer(x[:batch]), rtol=1e-4, atol=1e-4)
        assert calls == [4 * 196 * 4]  # the eager call at 784 pixels only
        calls.clear()
        # Pinned by optimize, the dynamic graph takes it too.
        layer.path = "kernel"
        torch._dynamo.reset()
        dynamic = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
        torch.testing.assert_close(dynamic(x[:2]), _paths.fold_forward(layer, x[:2]))
        assert calls == [2 * 196 * 4]
        calls.clear()
        # torch.export: a program that must run without tieify's build (and ONNX) never
        # holds the operator, pinned or not.
        program = torch.export.export(layer, (x,))
        assert "tieify" not in str(program.graph) and not calls
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_optimize_times_the_kernel_among_the_candidates():
    layer = TiedConv2d(64, 64, 1, B=8)
    x = channels_last(torch.randn(1, 64, 16, 16))
    assert "kernel" in _paths.applicable_paths(layer, x)
    key = _optimize.path_key(layer, x)
    choice = _optimize.choose_path(layer, x, repeats=1)
    entry = _optimize.PATH_CACHE.get(key)
    assert entry["path"] == choice and "kernel" in entry["seconds"]


def test_switched_off_the_kernel_is_not_offered_and_nothing_warns(fresh_kernel):
    fresh_kernel.setenv("TIEIFY_KERNEL", "0")
    layer = TiedConv2d(64, 64, 1, B=4)
    x = channels_last(torch.randn(2, 64, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "kernel" not in _paths.applicable_paths(layer, x)
        torch.testing.assert_close(layer(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert not _kernel.kernel_available()
    assert tieify.kernel_status() == "disabled by TIEIFY_KERNEL=0"
    assert _kernel.kernel_build() is None  # no build to key cached timings by


def test_without_a_compiler_the_layer_runs_and_one_warning_says_why(fresh_kernel):
    fresh_kernel.setattr(_kernel.shutil, "which", lambda name: None)
    layer = TiedConv2d(64, 64, 1, B=4)
    x = channels_last(torch.randn(2, 64, 32, 32))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        y = layer(x)
    torch.testing.assert_close(y, _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert "kernel" not in _paths.applicable_paths(layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per layer or call
        TiedConv2d(32, 64, 1, B=2)(channels_last(torch.randn(2, 32, 32, 32)))
    assert "apt install g++" in _kernel.kernel_status()
    assert _kernel.kernel_build() is None


def test_a_compiler_that_fails_is_reported_with_its_error(fresh_kernel, tmp_path):
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'fatal error: no space left' >&2\nexit 1\n")
    fake.chmod(0o755)
    fresh_kernel.setenv("CXX", str(fake))
    fresh_kernel.setenv("TIEIFY_CACHE_DIR", str(tmp_path / "cache"))
    assert not _kernel.kernel_available()
    status = _kernel.kernel_status()
    assert "could not build _kernel.cpp" in status and "no space left" in status
    assert _kernel.kernel_build() is None
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written build is kept
    assert not list((tmp_path / "cache").rglob("*.o"))  # nor the parts' objects


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_the_build_is_cached_and_a_corrupted_build_is_rebuilt(fresh_kernel, tmp_path):
    fresh_kernel.setenv("TIEIFY_CACHE_DIR", str(tmp_path))
    build = _kernel.build_path(_kernel._compiler())
    # A build cut short (a full disk, a killed copy) is rebuilt, with a warning. (A build
    # this process has loaded is never written to: the loader maps the file.)
    build.parent.mkdir(parents=True)
    build.write_bytes(b"\x7fELF cut short")
    with pytest.warns(RuntimeWarning, match="cannot be loaded.*rebuilding"):
        assert _kernel.kernel_available()
    assert "built with" in _kernel.kernel_status()
    assert build.stat().st_size > 1000
    _kernel.reset()  # a new process: the build is found, not compiled again
    assert _kernel.kernel_status().startswith(f"available: {build} (cached build")
    assert build.name == f"kernel-{_kernel.kernel_build()}.so"  # the key cached timings hold
    layer = TiedConv2d(16, 32, 1, B=2)
    x = channels_last(torch.randn(2, 16, 8, 8))
    torch.testing.assert_close(
        _paths.run_path(layer, x, "kernel"), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_an_unwritable_cache_builds_for_the_process(fresh_kernel, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fresh_kernel.setenv("TIEIFY_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    assert _kernel.kernel_available()
    assert "built with" in _kernel.kernel_status() and str(blocker) not in _kernel.kernel_status()


def test_the_kernel_builds_wherever_a_compiler_is_found():
    """Where this machine has a C++ compiler the kernel must build and load: the tests above
    skip without it, and this one keeps a broken build from passing as 'no compiler'."""
    if _kernel._compiler() is None:
        pytest.skip(_kernel.kernel_status())
    assert _kernel.kernel_available(), _kernel.kernel_status()
    assert "OpenMP" in _kernel.kernel_status()


@pytest.mark.skipif(
    not (_kernel.kernel_available() and "avx512f" in _kernel._cpu_flags().split()),
    reason="a CPU with AVX-512 and the kernel built: its builds without AVX-512 are then others",
)
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_the_builds_without_avx512_compute_the_same(fresh_kernel, tmp_path, arch, monkeypatch):
    """The kernel built for a CPU without AVX-512 (x86-64-v3: AVX2 and FMA, 256-bit vectors,
    which CPUs like the AVX2 EPYC run; x86-64: no AVX, the vector code in SSE halves and a
    panel's narrow part copied through memory) passes its self-test (the pointwise product
    with and without its epilogue, the direct and the Winograd convolutions with theirs, the
    channels-first product) and runs layers of each kind like the reference, on this AVX-512
    machine: banks of 2, 4 and 18 columns a block among them, with a batch norm, a residual
    and a ReLU in the epilogue (a panel's narrow part read and written by masked loads and
    stores, or through memory)."""
    from tieify.nn import _fused

    compiler = _kernel._compiler()
    assert compiler is not None
    target = tmp_path / f"kernel-{arch}.so"
    flags = ("-O3", f"-march={arch}", "-fopenmp")
    error = _kernel._compile_with(compiler, flags, target)
    assert error == "", error
    lib = ctypes.CDLL(str(target))
    assert _kernel._check(lib) == ""  # ABI and the self-test (a Winograd conv among them)
    fresh_kernel.setitem(_kernel._state, "lib", lib)
    fresh_kernel.setitem(_kernel._state, "status", f"available: the {arch} build")
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 64, 7, 15))
    for layer in (
        TiedConv2d(64, 72, 1, B=4, bias=True),  # pointwise, N = 18: 16 + a padded tail
        TiedConv2d(64, 64, 3, padding=1, B=4),  # direct: pixel tiles of 16 columns
        TiedConv2d(64, 96, 3, padding=1, B=2, bias=True),  # Winograd, N = 48
    ):
        with torch.no_grad():
            y = _paths.run_path(layer, x, "kernel")
            torch.testing.assert_close(y, _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    assert "winograd" in _paths._FORMS[layer]
    pointwise = TiedConv2d(64, 32, 1, B=2)
    nchw = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        y = _paths.run_path(pointwise, nchw, "kernel")  # the channels-first product
        torch.testing.assert_close(y, _paths.fold_forward(pointwise, nchw), rtol=1e-4, atol=1e-4)
    residuals = spy_kernel(monkeypatch, lambda conv, args: args[-2] is not None)
    for conv in (
        TiedConv2d(16, 16, 3, padding=1, B=4),  # pixel tiles of 4 columns
        TiedConv2d(16, 16, 3, padding=1, B=8),  # of 2
        TiedConv2d(64, 72, 1, B=4),  # row tiles of 16 and a tail of 2
        TiedConv2d(64, 128, 1, B=2),  # 32-column tiles
        TiedConv2d(16, 8, 1, B=4),  # pair tiles of 2
    ):
        conv.path = "kernel"
        bn = nn.BatchNorm2d(conv.out_channels).eval()
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        xi = channels_last(torch.randn(2, conv.in_channels, 7, 15))
        res = channels_last(torch.randn(2, conv.out_channels, 7, 15))
        with torch.no_grad():
            y = _fused.conv_bn_act(xi, conv, bn, res, relu=True)
            expected = torch.relu(bn(_paths.fold_forward(conv, xi)) + res)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert residuals == [True] * 5  # each one kernel call, the residual in its epilogue


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
@pytest.mark.parametrize(
    "k, batch, size, layout",
    [
        (3, 1, 4, "channels_last"),  # the direct conv at a batch of one
        (3, 1, 1, "contiguous"),  # NCHW at a batch of one: its copy back is the output itself
        (3, 4, 14, "channels_last"),  # Winograd
        (1, 2, 28, "channels_last"),  # the pointwise operator
    ],
)
def test_a_kernel_output_can_be_changed_in_place_in_training(k, batch, size, layout):
    """A tied conv on the kernel path while autograd records, then an in-place ReLU (VGG's
    ``ReLU(inplace=True)`` right after a conv): the forward and the gradients equal the
    reference's. The operator's output is a tensor of its own: a view made inside it
    could not be changed in place."""
    torch.manual_seed(0)
    layer = TiedConv2d(64, 64, k, padding=k // 2, B=2, bias=True)
    layer.path = "kernel"  # pinned: the rule leaves the kernel in training
    x = to_layout(torch.randn(batch, 64, size, size), layout).requires_grad_()
    assert _paths.select_path(layer, x) == "kernel"
    y = torch.relu_(layer(x))
    ref = torch.relu(_paths.fold_forward(layer, x))
    assert_matches_reference(y, ref, [x, layer.weight, layer.bias])


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_the_kernel_refuses_tensors_it_would_read_past():
    a, bt, out = torch.randn(10, 4), torch.randn(4, 8), torch.empty(10, 8)
    torch.testing.assert_close(_kernel.pointwise(a, bt, None, out), a @ bt)
    for bad in (
        (a.t().contiguous().t(), bt, None, out),  # not row-major
        (a, bt, torch.randn(7), out),  # bias of the wrong length
        (a.double(), bt, None, out),
    ):
        with pytest.raises(ValueError, match="dense float32 CPU tensors"):
            _kernel.pointwise(*bad)
    for bad in (
        (a, torch.randn(5, 8), None, out),  # K does not match
        (a, bt, None, torch.empty(10, 9)),  # N does not match
        (a, _kernel.pack(bt)[:-1], None, out),  # a packed bank one entry short
    ):
        with pytest.raises(ValueError, match=r"takes the bank bt as \(1·K, N\)"):
            _kernel.pointwise(*bad)


def test_pack_lays_the_bank_out_in_the_panels_the_tiles_read():
    """Panels of 16 columns while 16 remain, then of 8, the last zero-padded; each panel's
    rows in order, one panel after the other."""
    k = 3
    for n, widths in ((40, (16, 16, 8)), (24, (16, 8)), (12, (8, 8)), (5, (8,)), (32, (16, 16))):
        bt = torch.arange(k * n, dtype=torch.float32).reshape(k, n)
        padded = torch.nn.functional.pad(bt, (0, sum(widths) - n))
        expected, n0 = [], 0
        for width in widths:
            expected += [padded[row, n0 : n0 + width] for row in range(k)]
            n0 += width
        packed = _kernel.pack(bt)
        torch.testing.assert_close(packed, torch.cat(expected), rtol=0, atol=0)
        torch.testing.assert_close(_kernel.pack(bt.t().contiguous().t()), packed)  # any strides
    # Differentiable: its gradient is the unpacked, unpadded gradient.
    bt = torch.randn(4, 12, requires_grad=True)
    _kernel.pack(bt).sum().backward()
    torch.testing.assert_close(bt.grad, torch.ones(4, 12))


def test_outputs_stream_from_half_a_large_last_level_cache(tmp_path, monkeypatch):
    """The last-level cache as Linux reports it (the largest data or unified cache), and the
    output size from which the kernel writes with non-temporal stores: half of it where it
    holds at least 64 MiB, else 1 MiB (also where it is not known). A prepared call streams
    by that size."""
    caches = {"index0": ("Data", "48K"), "index1": ("Instruction", "64K")}
    caches |= {"index2": ("Unified", "2048K"), "index3": ("Unified", "491520K")}
    for name, (kind, size) in caches.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
        (tmp_path / name / "size").write_text(size + "\n")
    assert _kernel.last_level_cache_bytes(str(tmp_path)) == 491520 * 1024
    (tmp_path / "index3" / "size").write_text("32M\n")
    assert _kernel.last_level_cache_bytes(str(tmp_path)) == 32 << 20
    assert _kernel.last_level_cache_bytes(str(tmp_path / "absent")) is None
    assert _kernel.stream_min_bytes(None) == 1 << 20
    assert _kernel.stream_min_bytes(512 << 10) == 1 << 20
    assert _kernel.stream_min_bytes(32 << 20) == 1 << 20  # the AVX-512 EPYC's L3
    assert _kernel.stream_min_bytes((64 << 20) - 1) == 1 << 20
    assert _kernel.stream_min_bytes(64 << 20) == 32 << 20
    assert _kernel.stream_min_bytes(491520 << 10) == 240 << 20  # the AVX-512 Xeon's
    if not _kernel.kernel_available():
        return
    a, out = torch.randn(8192, 32), torch.empty(8192, 64)  # a 2 MiB output
    bt = torch.randn(32, 64)
    bank = _kernel.pack(bt)
    for threshold, streamed in ((1 << 20, 1), (4 << 20, 0)):
        monkeypatch.setattr(_kernel, "STREAM_MIN_BYTES", threshold)
        call = _kernel.prepare_pointwise(a, bank, None, out)
        assert call._tail[0] == streamed
        torch.testing.assert_close(call.run(a, out), a @ bt, rtol=1e-4, atol=1e-4)
