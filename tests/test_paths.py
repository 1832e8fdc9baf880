"""Forward paths of tied convolutions: equality with the reference, selection, tuning cache."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from _path_helpers import CL, TIED, assert_matches_reference, check_all_paths, to_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tieify
from tieify.latency import _machine, _optimize
from tieify.latency._cache import JsonCache, cache_dir
from tieify.nn import TiedConv1d, TiedConv2d, _kernel, _paths


@st.composite
def conv_cases(draw):
    nd = draw(st.sampled_from([1, 2, 2, 2, 3]))
    B = draw(st.sampled_from([1, 2, 4]))
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = B * groups * draw(st.integers(1, 3))
    cout = B * groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 1, 2, 3]))
    stride = draw(st.sampled_from([1, 1, 2]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    if stride == 1 and draw(st.booleans()):
        padding = draw(st.sampled_from(["same", "valid"]))
    else:
        padding = draw(st.sampled_from([0, 0, 1]))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    if isinstance(padding, str) or padding == 0:
        mode = "zeros" if padding != "same" else mode
    size = draw(st.integers(max(3, dilation * (k - 1) + 1), 7))
    n = draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["contiguous", "channels_last"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    bias = draw(st.booleans())
    return (
        nd,
        B,
        groups,
        cin,
        cout,
        k,
        stride,
        dilation,
        padding,
        mode,
        size,
        n,
        layout,
        dtype,
        bias,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.integers(0, 2**16))
def test_every_path_equals_reference(case, seed):
    nd, B, groups, cin, cout, k, stride, dil, pad, mode, size, n, layout, dtype, bias = case
    torch.manual_seed(seed)
    layer = TIED[nd](
        cin,
        cout,
        k,
        stride=stride,
        padding=pad,
        dilation=dil,
        groups=groups,
        bias=bias,
        padding_mode=mode,
        B=B,
    ).to(dtype)
    x = to_layout(torch.randn(n, cin, *([size] * nd), dtype=dtype), layout)
    check_all_paths(layer, x)


@pytest.mark.parametrize("stride", [(2, 2), (2, 1), (1, 2)])
@pytest.mark.parametrize("cin,cout,B", [(2, 2, 2), (4, 4, 2), (8, 8, 4)])
def test_strided_pointwise_layers_have_the_reference_gradients_on_every_path(cin, cout, B, stride):
    """Thin banks, strided, on channels-last inputs: PyTorch's CPU backward of a strided 1×1
    convolution on such a bank gives wrong weight gradients, and ``widen`` ran one until it
    subsampled first (4 of these 9 cases failed then, C/B = O/B = 1 in 7-10 of 10 draws), as
    did ``expanded`` on the Zen 1 EPYC (2 and 4 channels, stride (1, 2)); ten draws each, as
    the error comes and goes with the memory."""
    for seed in range(10):
        torch.manual_seed(seed)
        layer = TIED[2](cin, cout, 1, stride=stride, B=B, bias=False)
        x = to_layout(torch.randn(2, cin, 4, 4), "channels_last")
        assert "widen" in check_all_paths(layer, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "cin,cout,k,stride,B",
    [(64, 256, 1, 1, 4), (256, 64, 1, 2, 8), (32, 32, 3, 1, 4), (48, 96, 3, 2, 2)],
)
def test_resnet_like_shapes(cin, cout, k, stride, B, layout, dtype):
    torch.manual_seed(0)
    layer = TiedConv2d(cin, cout, k, stride=stride, padding=k // 2, B=B).to(dtype)
    x = to_layout(torch.randn(2, cin, 9, 9, dtype=dtype), layout)
    paths = check_all_paths(layer, x)
    fast = {"contiguous": "bmm", "channels_last": "gemm"}[layout] if k == 1 else "lift"
    assert (fast in paths) == (k == 1 or layout == "channels_last")
    # widen: channels-last, and no stride along the innermost axis unless the kernel is 1 there
    assert ("widen" in paths) == (layout == "channels_last" and (k == 1 or stride == 1))
    assert ("native" in paths) == (layout == "contiguous")  # NCHW, 2-D, one group


@pytest.mark.parametrize("path", ["grouped", "kernel"])
def test_a_layer_made_under_inference_mode_runs_and_sees_in_place_updates(path):
    """Parameters created under inference_mode have no version counter: the paths that keep
    a form of the bank (grouped's repeat, kernel's transpose) make it on every call instead."""
    if path == "kernel" and not _kernel.kernel_available():
        pytest.skip(_kernel.kernel_status())
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = TiedConv2d(16, 32, 1, B=4, bias=True).eval()
        x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
        assert layer.weight.is_inference() and path in _paths.applicable_paths(layer, x)
        first = _paths.run_path(layer, x, path)
        torch.testing.assert_close(first, _paths.fold_forward(layer, x), rtol=1e-5, atol=1e-5)
        layer.weight.mul_(-1.0)  # in place, unversioned
        flipped = _paths.run_path(layer, x, path)
        bias = layer.bias.repeat(4).reshape(1, -1, 1, 1)
        torch.testing.assert_close(flipped, -first + 2 * bias, rtol=1e-5, atol=1e-5)


def test_expanded_runs_the_convolution_the_layer_was_tied_from(monkeypatch):
    """``expanded``: one conv with the layer's groups and ``to_dense(expand=True)``'s
    weight (the bank on each group's diagonal blocks), kept between no-grad calls; offered
    off the CPU only, in eager calls and compiled graphs, never to an export or a count."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    layer = TiedConv2d(128, 64, 3, padding=1, groups=32, B=2, bias=True).eval()
    x = torch.randn(2, 128, 7, 7)
    calls: list[tuple[torch.Tensor, int]] = []
    conv2d = _paths._CONV_FN[2]

    def recorded(x, weight, bias, stride, padding, dilation, groups):
        calls.append((weight, groups))
        return conv2d(x, weight, bias, stride, padding, dilation, groups)

    monkeypatch.setitem(_paths._CONV_FN, 2, recorded)
    with torch.no_grad():
        y = _paths.run_path(layer, x, "expanded")
        torch.testing.assert_close(y, _paths.fold_forward(layer, x), rtol=1e-5, atol=1e-5)
        _paths.run_path(layer, x, "expanded")
        (w1, g1), (w2, g2) = calls
        assert g1 == g2 == 32 and w2 is w1  # the dense layer's groups; the bank kept
        torch.testing.assert_close(w1, layer.to_dense(expand=True).weight, rtol=0, atol=0)
        layer.weight.mul_(2.0)  # in place: a new bank
        _paths.run_path(layer, x, "expanded")
        assert calls[2][0] is not w1
        torch.testing.assert_close(calls[2][0], 2 * w1, rtol=0, atol=0)

    assert "expanded" not in _paths.applicable_paths(layer, x)  # CPU: the thin paths win
    layer.path = "expanded"  # pinned where it does not apply: the rule
    assert _paths.select_path(layer, x) == _paths.default_path(layer, x)
    meta = torch.empty(2, 128, 7, 7, device="meta")
    assert "expanded" in _paths.applicable_paths(layer, meta)  # eager, off the CPU
    assert _paths.select_path(layer, meta) == "expanded"
    with FlopCounterMode(display=False):  # tieify.count: the tied arithmetic
        assert "expanded" not in _paths.applicable_paths(layer, meta)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: False)
    assert "expanded" in _paths.applicable_paths(layer, meta)  # torch.compile
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert "expanded" not in _paths.applicable_paths(layer, meta)  # torch.export: compact


def test_expanded_traces_into_one_compiled_graph_with_its_gradients():
    """Where ``torch.compile`` takes it (a GPU's graphs), the bank's scatter is part of the
    graph: one graph (fullgraph), the reference's values and gradients."""
    torch.manual_seed(0)
    layer = TiedConv2d(32, 16, 3, padding=1, groups=4, B=2)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    run = torch.compile(
        lambda x: _paths.run_path(layer, x, "expanded"), fullgraph=True, backend="aot_eager"
    )
    assert_matches_reference(run(x), _paths.fold_forward(layer, x), [x, layer.weight, layer.bias])


def test_grouped_repeat_is_kept_between_no_grad_calls_and_follows_the_weights():
    import copy
    import pickle

    torch.manual_seed(0)
    layer = TiedConv2d(8, 8, 3, padding=1, B=4, bias=True).eval()
    layer.path = "grouped"
    x = torch.randn(2, 8, 6, 6)

    def check() -> torch.Tensor:
        y = layer(x)
        torch.testing.assert_close(y, _paths.fold_forward(layer, x), rtol=1e-5, atol=1e-5)
        return y

    with torch.no_grad():
        check()
        kept = _paths._FORMS[layer]["repeated"][1][0]
        check()
        assert _paths._FORMS[layer]["repeated"][1][0] is kept  # reused, not repeated again
        layer.weight.mul_(2.0)  # in-place update: a new version
        check()
        assert _paths._FORMS[layer]["repeated"][1][0] is not kept
        layer.bias = torch.nn.Parameter(torch.randn(2))  # a new parameter
        check()
        layer.load_state_dict({"weight": torch.randn(2, 2, 3, 3), "bias": torch.randn(2)})
        check()
        kept = _paths._FORMS[layer]["repeated"][1][0]
        version = layer.weight._version
        layer.weight.data = torch.randn(2, 2, 3, 3)  # new storage, the same version
        assert layer.weight._version == version
        check()
        assert _paths._FORMS[layer]["repeated"][1][0] is not kept
    layer.double()  # new storage and dtype
    x = x.double()
    with torch.inference_mode():
        check()
    # Pickling and deepcopy never carry the repeat (it lives beside the layer).
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone not in _paths._FORMS
        with torch.no_grad():
            torch.testing.assert_close(clone(x), layer(x))
    # While autograd records, the repeat is part of the graph: gradients reach the bank.
    xg = x.clone().requires_grad_()
    layer(xg).square().sum().backward()
    ref = layer.weight.grad.clone()
    layer.weight.grad = None
    _paths.fold_forward(layer, xg).square().sum().backward()
    torch.testing.assert_close(ref, layer.weight.grad)


def test_fast_paths_keep_channels_last_and_the_expected_choice():
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    # The rule for inference (eval mode; training: test_the_training_rule_...).
    pw = TiedConv2d(16, 32, 1, B=4).eval()
    kk = TiedConv2d(16, 32, 3, padding=1, B=4).eval()
    strided = TiedConv2d(16, 32, 3, stride=2, padding=1, B=4).eval()
    even_same = TiedConv2d(16, 32, 2, padding="same", B=4).eval()  # asymmetric padding
    assert _paths.default_path(pw, x) == "gemm"
    assert _paths.default_path(kk, x) == "widen"
    # A stride along W would cross blocks: no widen; tieify's kernel, else (eager) grouped.
    assert _paths.default_path(strided, x) == (
        "kernel" if _kernel.kernel_available() else "grouped"
    )
    assert _paths.default_path(even_same, x) == "lift"
    # A strided grouped layer (TGC), which the kernel does not compute: grouped in eager
    # calls, lift in a trace (no repeated bank in an exported graph).
    tgc = TiedConv2d(16, 32, 3, stride=2, padding=1, groups=2, B=4).eval()
    assert "kernel" not in _paths.applicable_paths(tgc, x)
    assert _paths.default_path(tgc, x) == "grouped"
    torch.testing.assert_close(tgc(x), _paths.fold_forward(tgc, x))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):  # a dispatch mode, as in a trace
        assert _paths.default_path(tgc, x) == "lift"
    compiled = torch.compile(tgc, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), tgc(x))
    # NCHW: pointwise layers run natively at any size, k×k layers only on small inputs.
    big = torch.randn(8, 16, 6, 6)  # 4,608 elements > NATIVE_MAX_NUMEL
    assert big.numel() > _paths.NATIVE_MAX_NUMEL >= x.numel()
    assert _paths.default_path(pw, x.contiguous()) == "native"
    assert _paths.default_path(pw, big) == "native"
    assert _paths.default_path(kk, x.contiguous()) == "native"
    assert _paths.default_path(kk, big) == "fold"
    dilated = TiedConv2d(16, 32, 3, padding=2, dilation=2, B=4)
    assert "native" not in _paths.applicable_paths(dilated, x.contiguous())
    assert "native" not in _paths.applicable_paths(TiedConv2d(16, 32, 3, groups=2, B=4), big)
    assert "native" not in _paths.applicable_paths(TiedConv1d(16, 32, 1, B=4), big[..., 0])
    for layer in (pw, kk, strided, even_same):
        y = layer(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        for path in _paths.applicable_paths(layer, x):
            if path in ("gemm", "lift", "widen", "kernel"):
                y = _paths.run_path(layer, x, path)
                assert y.is_contiguous(memory_format=torch.channels_last), path
    # gemm reads the input in place: the matrix it multiplies is a view of x's storage.
    xl = x.permute(0, 2, 3, 1).reshape(-1, 4)
    assert xl.data_ptr() == x.data_ptr() and xl._base is not None
    # so does widen: (N, H, W·B, C/B) channels-last over the same storage.
    xw = x.permute(0, 2, 3, 1).reshape(2, 6, 6 * 4, 4).permute(0, 3, 1, 2)
    assert xw.data_ptr() == x.data_ptr() and xw.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("avx512", [False, True])
def test_large_pointwise_channels_last_inputs_widen_without_avx512(monkeypatch, avx512, no_kernel):
    monkeypatch.setattr(_paths, "_CPU_HAS_AVX512", avx512)
    layer = TiedConv2d(16, 32, 1, B=4).eval()
    # 4,096 pixels: the threshold, reached by batch and spatial size together.
    big = torch.randn(4, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    small = torch.randn(3, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    assert big.shape[0] * 32 * 32 == _paths.WIDEN_POINTWISE_MIN_PIXELS
    assert _paths.default_path(layer, small) == "gemm"
    assert _paths.default_path(layer, big) == ("gemm" if avx512 else "widen")
    # The memo tells the two inputs apart (same per-sample shape, different batch).
    layer._path_memo = {}
    for x, path in ((small, "gemm"), (big, "gemm" if avx512 else "widen"), (small, "gemm")):
        assert _paths.select_path(layer, x) == path
        torch.testing.assert_close(layer(x), _paths.fold_forward(layer, x), rtol=1e-4, atol=1e-4)
    # A static-shape compile takes the same decision inside its trace.
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(big), layer(big), rtol=1e-4, atol=1e-4)
    # Other dtypes (not measured), NCHW inputs and k×k layers are not affected.
    assert _paths.default_path(layer.to(torch.bfloat16), big.to(torch.bfloat16)) == "gemm"
    layer.float()
    assert _paths.default_path(layer, big.contiguous()) == "native"
    assert _paths.default_path(TiedConv2d(16, 32, 3, padding=1, B=4).eval(), big) == "widen"


def test_pooled_inputs_run_native_while_the_larger_side_is_small():
    """A (N, C, 1, 1) input is channels-last and NCHW at once; up to NATIVE_MAX_NUMEL
    elements on the larger side (input or output, batch included) the rule runs native."""
    expand = TiedConv2d(120, 480, 1, B=4)  # larger side: the output, 480 per sample
    x = torch.randn(8, 120, 1, 1)
    assert _paths.is_channels_last(x) and {"gemm", "native"} <= set(
        _paths.applicable_paths(expand, x)
    )
    assert 8 * 480 <= _paths.NATIVE_MAX_NUMEL < 9 * 480
    expand._path_memo = {}
    for batch, path in ((8, "native"), (9, "gemm"), (1, "native"), (9, "gemm")):
        assert _paths.select_path(expand, x.new_zeros(batch, 120, 1, 1)) == path  # memo too
    torch.testing.assert_close(expand(x), _paths.fold_forward(expand, x), rtol=1e-5, atol=1e-5)
    # A channels-last input with spatial extent is not affected.
    spatial = torch.randn(1, 120, 2, 2).contiguous(memory_format=torch.channels_last)
    assert _paths.default_path(expand, spatial) in ("gemm", "kernel", "widen")
    # Traced, native is not offered: the compiled graph keeps gemm.
    compiled = torch.compile(expand, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), expand(x), rtol=1e-4, atol=1e-4)


def test_small_maps_with_wide_blocks_fold_on_nchw_input(monkeypatch):
    """An unstrided NCHW pointwise layer with at most 7×7 pixels an image, 392 in all and
    128 channels a block on both sides folds (for inference), where it ran native; a batch
    below 392 pixels, narrower blocks, a larger map, a stride, a pooled input and a forward
    that trains keep the other rules, and the memo tells the batches apart."""
    wide = TiedConv2d(1024, 512, 1, B=4, bias=False).eval()  # 256 and 128 channels a block
    narrow = TiedConv2d(1024, 512, 1, B=8, bias=False).eval()  # 64 out a block
    strided = TiedConv2d(1024, 512, 1, stride=2, B=4, bias=False).eval()
    x8, x7 = torch.randn(8, 1024, 7, 7), torch.randn(7, 1024, 7, 7)
    assert 8 * 49 == _paths.FOLD_POINTWISE_MIN_PIXELS > 7 * 49
    assert 8 * 49 < _paths.KERNEL_MIN_PIXELS  # below the kernel's pixels: native before
    assert "native" in _paths.applicable_paths(wide, x8)
    assert _paths.default_path(wide, x8) == "fold"
    assert _paths.default_path(narrow, x8) == "native"
    assert _paths.default_path(wide, torch.randn(2, 1024, 14, 14)) != "fold"  # 196 an image
    assert _paths.default_path(strided, x8) != "fold"  # 7×7 in, 4×4 out
    wide._path_memo = {}
    for x, path in ((x8, "fold"), (x7, "native"), (x8, "fold"), (x7, "native")):
        assert _paths.select_path(wide, x) == path  # the memo keeps the two apart
    torch.testing.assert_close(wide(x8), _paths.fold_forward(wide, x8))
    pooled = torch.randn(512, 1024, 1, 1)  # channels-last too: the pooled rule
    assert _paths.default_path(wide, pooled) != "fold"
    trains = TiedConv2d(1024, 512, 1, B=4, bias=False)  # the training rule's own choice
    monkeypatch.setattr(_paths, "_fold_pointwise", lambda *a: pytest.fail("asked"))
    _paths.default_path(trains, x8)


@pytest.mark.parametrize(
    ("vendor", "family", "avx512", "mkl", "behind"),
    [
        ("AuthenticAMD", 26, True, True, True),  # Zen 5: MKL's AVX2 code, full-width AVX-512
        ("AuthenticAMD", 27, True, True, True),
        ("AuthenticAMD", 25, True, True, False),  # Zen 4: AVX-512 at half width
        ("GenuineIntel", 6, True, True, False),  # MKL runs its AVX-512 code
        ("AuthenticAMD", 26, False, True, False),
        ("AuthenticAMD", 26, True, False, False),  # another BLAS
        ("", None, True, True, False),  # nothing read
    ],
)
def test_blas_behind_onednn_names_amd_cpus_with_full_width_avx512(
    vendor, family, avx512, mkl, behind
):
    assert _paths.blas_behind_onednn(vendor, family, avx512, mkl) is behind


@pytest.mark.parametrize(
    ("vendor", "family", "model", "outruns"),
    [
        ("AuthenticAMD", 23, 1, True),  # Zen 1 (Naples): 128-bit multiply-add units
        ("AuthenticAMD", 23, 8, True),  # Zen+
        ("AuthenticAMD", 23, 0x31, False),  # Zen 2 (Rome): full-width AVX2, not measured
        ("AuthenticAMD", 25, 1, False),  # Zen 3
        ("AuthenticAMD", 26, 2, False),  # Zen 5: blas_behind_onednn's
        ("GenuineIntel", 23, 1, False),
        ("AuthenticAMD", 23, None, False),  # nothing read
        ("", None, None, False),
    ],
)
def test_kernel_outruns_blas_names_zen_and_zen_plus(vendor, family, model, outruns):
    assert _paths.kernel_outruns_blas(vendor, family, model) is outruns


def test_cpu_vendor_family_and_model_come_from_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "model name\t: AMD EPYC\n\n"
        "processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n\n"
    )
    assert _paths._cpu_id(str(cpuinfo)) == ("AuthenticAMD", 26, 2)
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: SomeVendor\ncpu family\t: ?\n")
    assert _paths._cpu_id(str(cpuinfo)) == ("SomeVendor", None, None)
    assert _paths._cpu_id(str(tmp_path / "missing")) == ("", None, None)


@pytest.mark.parametrize("behind", [False, True])
def test_nchw_pointwise_layers_fold_where_the_blas_runs_behind(monkeypatch, behind):
    """Where the BLAS runs behind oneDNN, NCHW pointwise layers of up to 28×28 input pixels
    an image, a batch above one and 64 channels a block on both sides fold, strided too; a
    56×56 map, one image, 32 channels a block and a forward that trains do not. Elsewhere
    only the 7×7 rule folds."""
    monkeypatch.setattr(_paths, "_BLAS_BEHIND_ONEDNN", behind)
    b2 = TiedConv2d(512, 1024, 1, B=2, bias=False).eval()  # 256 and 512 channels a block
    b8 = TiedConv2d(256, 1024, 1, B=8, bias=False).eval()  # 32 in a block
    strided = TiedConv2d(1024, 2048, 1, stride=2, B=4, bias=False).eval()
    narrow_out = TiedConv2d(1024, 256, 1, B=4, bias=False).eval()  # 256 in, 64 out a block
    x14, x28 = torch.randn(2, 512, 14, 14), torch.randn(2, 512, 28, 28)
    x1024 = torch.randn(2, 1024, 14, 14)
    for layer, x in ((b2, x14), (b2, x28), (strided, x1024), (narrow_out, x1024)):
        assert (_paths.default_path(layer, x) == "fold") is behind
    for layer, x in (
        (b2, torch.randn(2, 512, 56, 56)),  # 56×56: the kernel's
        (b2, torch.randn(1, 512, 28, 28)),  # one image
        (b8, torch.randn(2, 256, 14, 14)),  # 32 channels a block in
    ):
        assert _paths.default_path(layer, x) != "fold"
    torch.testing.assert_close(b2(x14), _paths.fold_forward(b2, x14))
    trains = TiedConv2d(512, 1024, 1, B=2, bias=False)  # the training rule's own choice
    monkeypatch.setattr(_paths, "_fold_pointwise", lambda *a: pytest.fail("asked"))
    _paths.default_path(trains, x14)


@pytest.mark.parametrize("kernel", [False, True])
def test_channels_last_pointwise_layers_leave_a_blas_that_runs_behind(fresh_kernel, kernel):
    """Where the BLAS runs behind oneDNN, a channels-last pointwise layer whose bank is past
    KERNEL_MAX_BANK, or whose input has fewer than KERNEL_MIN_PIXELS pixels, runs tieify's
    kernel (where it is built) instead of gemm, and widen from WIDEN_POINTWISE_MIN_PIXELS
    where it is not; a pooled input of a small layer keeps native. Where the kernel outruns
    a BLAS that keeps up with oneDNN (Zen, Zen+) the kernel takes them too, and without it
    they keep gemm; NCHW inputs keep the bounds."""
    monkeypatch = fresh_kernel
    if not kernel:
        monkeypatch.setenv("TIEIFY_KERNEL", "0")
    elif not _kernel.kernel_available():
        pytest.skip(_kernel.kernel_status())
    monkeypatch.setattr(_paths, "_CPU_HAS_AVX512", True)  # where gemm is the rule's choice
    big_bank = TiedConv2d(512, 2048, 1, B=2, bias=False).eval()  # 256×1024
    few_pixels = TiedConv2d(256, 1024, 1, B=4, bias=False).eval()  # 64×256
    assert 256 * 1024 > _paths.KERNEL_MAX_BANK
    x7 = torch.randn(8, 512, 7, 7).contiguous(memory_format=torch.channels_last)
    x_big = torch.randn(4, 512, 32, 32).contiguous(memory_format=torch.channels_last)
    x14 = torch.randn(1, 256, 14, 14).contiguous(memory_format=torch.channels_last)
    assert 196 < _paths.KERNEL_MIN_PIXELS and 4 * 32 * 32 == _paths.WIDEN_POINTWISE_MIN_PIXELS
    se, pooled = TiedConv2d(240, 960, 1, B=4).eval(), torch.randn(1, 240, 1, 1)
    nchw = torch.randn(8, 512, 7, 7)
    for behind, outruns in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(_paths, "_BLAS_BEHIND_ONEDNN", behind)
        monkeypatch.setattr(_paths, "_KERNEL_OUTRUNS_BLAS", outruns)
        kernel_here = (behind or outruns) and kernel
        assert _paths.default_path(big_bank, nchw) != "kernel"  # NCHW: the bank's bound
        assert _paths.default_path(big_bank, x7) == ("kernel" if kernel_here else "gemm")
        assert _paths.default_path(few_pixels, x14) == ("kernel" if kernel_here else "gemm")
        wide = _paths.default_path(big_bank, x_big)
        assert wide == ("kernel" if kernel_here else "widen" if behind else "gemm")
        assert _paths.default_path(se, pooled) == "native"
        path = _paths.default_path(few_pixels, x14)
        torch.testing.assert_close(
            _paths.run_path(few_pixels, x14, path),
            _paths.fold_forward(few_pixels, x14),
            rtol=1e-4,
            atol=1e-4,
        )


def test_native_is_never_taken_under_a_dispatch_mode():
    """An eager call remembers native for a small NCHW input (a batch of two: at a batch of
    one the rule takes tieify's kernel); the same input under a dispatch mode (torch's flop
    counter, which tieify.count uses and which cannot count this kernel) must fold instead
    of reusing that choice."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = TiedConv2d(16, 32, 3, padding=1, B=4)
    x = torch.randn(2, 16, 6, 6)
    ref = layer(x)
    assert _paths.select_path(layer, x) == "native"
    counter = FlopCounterMode(display=False)
    with counter:
        assert _paths.select_path(layer, x) == "fold"
        y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert counter.get_total_flops() == 2 * 2 * 32 * 36 * 4 * 9  # 2·N·O·HW·(C/B)·k²


def test_layout_detection_ignores_batch_and_unit_dims():
    x = torch.randn(3, 8, 1, 1)
    assert _paths.is_channels_last(x) and _paths.is_channels_first(x)
    assert _paths.layout_of(x) == "contiguous"
    y = torch.randn(5, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert _paths.layout_of(y) == "channels_last"
    assert _paths.layout_of(y[:1]) == _paths.layout_of(y[:4]) == "channels_last"
    assert _paths.layout_of(torch.randn(2, 8, 4, 6)[..., ::2]) == "strided"


def test_pinned_path_is_used_when_it_applies_and_falls_back_otherwise(monkeypatch):
    layer = TiedConv2d(16, 32, 3, padding=1, B=4)
    x = torch.randn(2, 16, 20, 20)  # above NATIVE_MAX_NUMEL, a batch above one: the rule folds
    calls = []
    for name in ("fold", "grouped", "lift"):
        orig = _paths._FORWARD[name]
        monkeypatch.setitem(
            _paths._FORWARD, name, lambda lay, t, n=name, f=orig: (calls.append(n), f(lay, t))[1]
        )
    layer.path = "grouped"
    layer(x)
    layer.path = "lift"  # needs channels-last: NCHW input falls back to the rule (fold)
    layer(x)
    layer(x.contiguous(memory_format=torch.channels_last))
    assert calls == ["grouped", "fold", "lift"]
    layer.path = "fastest"
    with pytest.raises(ValueError, match="'auto' or one of"):
        layer(x)


def test_path_choice_is_remembered_per_input_layout(monkeypatch):
    layer = TiedConv2d(16, 32, 3, padding=1, B=4).eval()
    checks = []
    orig = _paths.applicable_paths
    monkeypatch.setattr(
        _paths, "applicable_paths", lambda lay, t: (checks.append(1), orig(lay, t))[1]
    )
    x = torch.randn(8, 16, 6, 6)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert _paths.select_path(layer, x) == "fold"
    n = len(checks)
    # The same per-sample layout (any batch size as large) is answered from the memo.
    assert _paths.select_path(layer, torch.randn(9, 16, 6, 6)) == "fold"
    assert len(checks) == n
    # A batch small enough for the native kernel is another entry.
    assert _paths.select_path(layer, torch.randn(2, 16, 6, 6)) == "native"
    assert len(checks) == n + 1
    # Another layout, another path; pinning a path is seen at once (it is part of the key).
    assert _paths.select_path(layer, xc) == "widen"
    layer.path = "lift"
    assert _paths.select_path(layer, xc) == "lift"
    assert _paths.select_path(layer, x) == "fold"  # lift needs channels-last: the rule
    torch.testing.assert_close(layer(xc), _paths.fold_forward(layer, xc))
    # Bounded: many input sizes never grow the memo past its size.
    for h in range(3, 3 + 2 * _paths._MEMO_SIZE):
        _paths.select_path(layer, torch.randn(1, 16, h, 4).contiguous(memory_format=CL[2]))
    assert len(layer._path_memo) <= _paths._MEMO_SIZE


# -- tieify.optimize and its cache ------------------------------------------------------------


class FakeTimer:
    """Deterministic timings: each path's time comes from a table; counts calls."""

    def __init__(self, times: dict[str, float]) -> None:
        self.times = times
        self.calls = 0

    def __call__(self, fns, **kwargs):
        self.calls += 1
        for fn in fns.values():  # the candidates must run
            fn()
        return {name: self.times.get(name, 1.0) for name in fns}


@pytest.fixture
def cache_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("paths.json"))
    return tmp_path


def small_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        TiedConv2d(16, 32, 1, B=4),
        torch.nn.ReLU(),
        TiedConv2d(32, 32, 3, padding=1, B=2),
        TiedConv2d(32, 32, 3, padding=1, B=2),  # same configuration: measured once
    )


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TIEIFY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tieify"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "tieify"
    monkeypatch.setenv("TIEIFY_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_optimize_pins_fastest_and_caches(cache_tmp, monkeypatch):
    timer = FakeTimer(
        {
            "fold": 3.0,
            "grouped": 2.0,
            "gemm": 5.0,
            "lift": 1.0,
            "bmm": 4.0,
            "widen": 6.0,
            "kernel": 7.0,
        }
    )
    monkeypatch.setattr(_optimize, "_timer", timer)
    net = small_net().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    ref = net(x)
    assert tieify.optimize(net, x) is net
    assert [net[0].path, net[2].path, net[3].path] == ["grouped", "lift", "lift"]
    assert timer.calls == 2  # two distinct configurations
    torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4)
    data = json.loads((cache_tmp / "paths.json").read_text())
    assert data["version"] == 1 and len(data["entries"]) == 2
    # A fresh process (new in-memory cache) reads the choice from disk: no timing at all.
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("paths.json"))
    net2 = small_net().to(memory_format=torch.channels_last)
    tieify.optimize(net2, x)
    assert timer.calls == 2
    assert [net2[0].path, net2[2].path] == ["grouped", "lift"]
    # The same layers with NCHW weights on the channels-last input (reordered on every
    # call) are other configurations: the 3×3 ones are timed, the 1×1 bank is not.
    tieify.optimize(small_net(), x)
    assert timer.calls == 3


def test_choice_cached_before_a_new_path_existed_is_timed_again(cache_tmp, monkeypatch, no_kernel):
    """A cache written when fewer paths existed (an older tieify) must not pin the old
    winner: the candidate set is part of the key."""
    layer = TiedConv2d(16, 32, 1, B=4)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    key = json.loads(_optimize.path_key(layer, x))
    assert key["candidates"] == ["fold", "gemm", "grouped", "widen"]
    old = {k: v for k, v in key.items() if k != "candidates"}  # the key before widen existed
    _optimize.PATH_CACHE.set(json.dumps(old, sort_keys=True), {"path": "gemm"})
    timer = FakeTimer({"fold": 3.0, "gemm": 2.0, "grouped": 2.5, "widen": 1.0})
    monkeypatch.setattr(_optimize, "_timer", timer)
    tieify.optimize(torch.nn.Sequential(layer), x)
    assert timer.calls == 1 and layer.path == "widen"


def test_choice_made_on_another_machine_is_timed_again(cache_tmp, monkeypatch, no_kernel):
    """A cache directory shared between machines (NFS home, a cluster's nodes) must not pin
    another CPU's winner: the machine is part of the key."""
    layer = TiedConv2d(16, 32, 1, B=4)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    timer = FakeTimer({"fold": 3.0, "gemm": 2.0, "grouped": 2.5, "widen": 1.0})
    monkeypatch.setattr(_optimize, "_timer", timer)
    tieify.optimize(torch.nn.Sequential(layer), x)
    assert timer.calls == 1 and layer.path == "widen"
    tieify.optimize(torch.nn.Sequential(layer), x)
    assert timer.calls == 1  # same machine: read from the cache
    monkeypatch.setattr(_machine, "_cpu_key", lambda: "Other CPU | x86_64 | AVX2 | 2 CPUs")
    timer.times = {"fold": 3.0, "gemm": 0.5, "grouped": 2.5, "widen": 1.0}
    tieify.optimize(torch.nn.Sequential(layer), x)
    assert timer.calls == 2 and layer.path == "gemm"  # timed there, its own winner
    assert len(json.loads((cache_tmp / "paths.json").read_text())["entries"]) == 2


@pytest.mark.skipif(not _kernel.kernel_available(), reason=_kernel.kernel_status())
def test_choice_timed_against_another_kernel_build_or_version_is_timed_again(
    cache_tmp, monkeypatch
):
    """A choice cached while an older kernel (or tieify) was installed must not pin the old
    winner: the kernel's build is part of the key where ``kernel`` is a candidate, and the
    tieify version always is."""
    layer = TiedConv2d(64, 64, 1, B=8)
    x = torch.randn(2, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    key = json.loads(_optimize.path_key(layer, x))
    assert "kernel" in key["candidates"]
    assert key["kernel"] == _kernel.kernel_build() and len(key["kernel"]) == 20
    assert key["tieify"] == tieify.__version__
    older = {**key, "kernel": "0" * 20}  # the same choice, timed against another build
    _optimize.PATH_CACHE.set(json.dumps(older, sort_keys=True), {"path": "gemm"})
    timer = FakeTimer({"fold": 3.0, "gemm": 2.0, "grouped": 2.5, "widen": 1.5, "kernel": 1.0})
    monkeypatch.setattr(_optimize, "_timer", timer)
    tieify.optimize(torch.nn.Sequential(layer), x)
    assert timer.calls == 1 and layer.path == "kernel"
    tieify.optimize(torch.nn.Sequential(layer), x)
    assert timer.calls == 1  # the same build: read from the cache
    monkeypatch.setattr("tieify._version.__version__", "0.0.0")
    tieify.optimize(torch.nn.Sequential(layer), x)
    assert timer.calls == 2  # another tieify: timed again
    # Where the kernel is no candidate (a float64 layer), its build is not part of the key.
    double = TiedConv2d(64, 64, 1, stride=2, B=8).double()
    nchw = json.loads(_optimize.path_key(double, x.contiguous().double()))
    assert "kernel" not in nchw["candidates"] and "kernel" not in nchw


def test_machine_key_names_the_instruction_set_and_cpus():
    key = _machine.machine_key("cpu")
    assert torch.backends.cpu.get_cpu_capability() in key
    assert f"{_machine._usable_cpus()} CPUs" in key
    assert 1 <= _machine._usable_cpus() <= (os.cpu_count() or 1)
    assert _machine.machine_key(torch.device("cpu")) == key
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in _machine.machine_key("cuda:0")


def test_optimize_ties_are_broken_by_path_order(cache_tmp, monkeypatch):
    monkeypatch.setattr(_optimize, "_timer", FakeTimer({}))  # every path 1.0 s
    net = small_net()
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    tieify.optimize(net, x, cache=False)
    assert net[0].path == "fold" and net[2].path == "fold"
    assert not (cache_tmp / "paths.json").exists()


def test_corrupted_cache_is_rebuilt_with_warning(cache_tmp, monkeypatch):
    (cache_tmp / "paths.json").write_text("{not json")
    timer = FakeTimer({"gemm": 0.1})
    monkeypatch.setattr(_optimize, "_timer", timer)
    net = torch.nn.Sequential(TiedConv2d(16, 32, 1, B=4))
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.warns(RuntimeWarning, match="corrupted"):
        tieify.optimize(net, x)
    assert net[0].path == "gemm" and timer.calls == 1
    data = json.loads((cache_tmp / "paths.json").read_text())
    assert len(data["entries"]) == 1
    # Wrong version is also rebuilt.
    (cache_tmp / "paths.json").write_text(json.dumps({"version": 999, "entries": {}}))
    monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("paths.json"))
    with pytest.warns(RuntimeWarning, match="version"):
        tieify.optimize(net, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(_optimize, "PATH_CACHE", JsonCache("paths.json"))
        tieify.optimize(net, x)  # now clean


def test_optimize_real_timer_gives_a_valid_path(cache_tmp):
    net = small_net()
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    ref = net(x)
    tieify.optimize(net, x, repeats=1)
    for layer in (net[0], net[2]):
        assert layer.path in _paths.applicable_paths(layer, x)
    torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4)


def test_optimize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        tieify.optimize("resnet50", torch.randn(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_inputs"):
        tieify.optimize(small_net(), 3)


def test_optimize_leaves_weights_and_statistics_alone(cache_tmp, monkeypatch):
    monkeypatch.setattr(_optimize, "_timer", FakeTimer({"bmm": 0.5}))
    net = torch.nn.Sequential(TiedConv2d(16, 32, 1, B=4), torch.nn.BatchNorm2d(32)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tieify.optimize(net, torch.randn(2, 16, 4, 4))
    assert net.training and net[0].path == "bmm"
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("avx512", [False, True])
def test_the_training_rule_chooses_for_forward_and_backward(monkeypatch, avx512):
    """Where a forward trains (training mode, autograd recording it), the rule leaves tieify's
    kernel (its backward is the fold's on a copy), widens large pointwise layers on
    channels-last input, folds mid-sized ones on NCHW input and groups strided k×k layers;
    in eval mode, under no_grad, or with nothing requiring a gradient, the inference rule
    holds. The memo keeps the two rules (and the training rule's batch sizes) apart, and
    the gradients are the reference's."""
    monkeypatch.setattr(_paths, "_CPU_HAS_AVX512", avx512)
    monkeypatch.setattr(_paths, "_KERNEL_WINS_ALONE", True)
    kernel = _kernel.kernel_available()
    pw = TiedConv2d(64, 64, 1, B=4)
    kk = TiedConv2d(64, 64, 3, padding=1, B=2)  # 32 channels a block: Winograd's
    strided = TiedConv2d(64, 64, 3, stride=2, padding=1, B=2)
    big = torch.randn(4, 64, 14, 14).contiguous(memory_format=CL[2])  # 784 pixels
    # 4 × 196 pixels × 64 channels = 50,176 output elements: below TRAINING_WIDEN_MIN_NUMEL.
    assert 4 * 196 * 64 < _paths.TRAINING_WIDEN_MIN_NUMEL <= 8 * 196 * 64
    wider = torch.randn(8, 64, 14, 14).contiguous(memory_format=CL[2])
    inference = {
        (pw, big): "kernel" if kernel else "gemm" if avx512 else "gemm",
        (pw, wider): "kernel" if kernel else "gemm" if avx512 else "widen",
        (kk, big): "kernel" if kernel else "widen",
        (strided, big): "kernel" if kernel else "lift",
    }
    training = {
        (pw, big): "gemm" if avx512 else "widen",  # without AVX-512 from 4,096 pixels anyway
        (pw, wider): "widen",
        (kk, big): "widen",
        (strided, big): "grouped",
    }
    if not avx512:  # the inference rule widens from WIDEN_POINTWISE_MIN_PIXELS (here 1,568)
        training[(pw, big)] = "gemm"
        inference[(pw, wider)] = "kernel" if kernel else "gemm"
    for (layer, x), path in training.items():
        assert layer.training and _paths._trains(layer, x)
        assert _paths.default_path(layer, x) == path, (layer, x.shape)
        assert _paths.default_path(layer, x, fused=True) == ("kernel" if kernel else path)
        with torch.no_grad():
            assert not _paths._trains(layer, x)
            assert _paths.default_path(layer, x) == inference[(layer, x)]
        layer.eval()
        assert _paths.default_path(layer, x) == inference[(layer, x)]
        layer.train()
        monkeypatch.setattr(_paths, "_TRAINING_RULE", False)
        assert _paths.default_path(layer, x) == inference[(layer, x)]
        monkeypatch.setattr(_paths, "_TRAINING_RULE", True)
    # Nothing requires a gradient (frozen parameters, a plain input): no backward follows.
    frozen = TiedConv2d(64, 64, 1, B=4).requires_grad_(False)
    assert not _paths._trains(frozen, big)
    assert _paths._trains(frozen, big.clone().requires_grad_())
    # NCHW pointwise: native up to 65,536 input elements or from 56×56 an image, else fold.
    assert _paths.default_path(pw, torch.randn(8, 64, 14, 14)) == "fold"  # 100,352 elements
    assert _paths.default_path(pw, torch.randn(4, 64, 16, 16)) == "native"  # 65,536 elements
    assert _paths.default_path(pw, torch.randn(5, 64, 16, 16)) == "fold"
    assert _paths.default_path(pw, torch.randn(2, 64, 56, 56)) == "native"
    with torch.no_grad():
        nchw = torch.randn(5, 64, 16, 16)
        assert _paths.default_path(pw, nchw) == ("kernel" if kernel else "native")
    # The memo answers each rule, and the training rule each batch, for itself.
    kk._path_memo = {}
    for x, grad, path in (
        (big, True, "widen"),
        (big, False, "kernel" if kernel else "widen"),
        (big, True, "widen"),
    ):
        with torch.set_grad_enabled(grad):
            assert _paths.select_path(kk, x) == path
    pw._path_memo = {}
    assert _paths.select_path(pw, big) == training[(pw, big)]
    assert _paths.select_path(pw, wider) == "widen"
    assert _paths.select_path(pw, big) == training[(pw, big)]
    # The gradients of a training step on the rule's paths are the reference's.
    for layer in (pw, kk, strided):
        x = big.clone().requires_grad_()
        assert_matches_reference(
            layer(x), _paths.fold_forward(layer, x), [x, layer.weight, layer.bias]
        )
