"""The tied layers (TBC, TGC, TFC, TiedBlock): equivalence, counts, transfer, errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tieify import TieError
from tieify.nn import TiedBlock, TiedConv1d, TiedConv2d, TiedConv3d, TiedLinear

TIED = {1: TiedConv1d, 2: TiedConv2d, 3: TiedConv3d}
DENSE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _macs(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-add


@st.composite
def conv_cases(draw):
    nd = draw(st.sampled_from([1, 2, 3]))
    B = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([1, 2]))
    cin = B * G * draw(st.integers(1, 3))
    cout = B * G * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride: tuple[int, ...] = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    if padding_kind == "same":
        padding: object = "same"
        stride = (1,) * nd  # torch: 'same' needs stride 1
    elif padding_kind == "valid":
        padding = "valid"
    elif padding_kind == "int":
        padding = draw(st.integers(0, 1))
    else:
        padding = tuple(draw(st.integers(0, 1)) for _ in range(nd))
    size = tuple(draw(st.integers(5, 7)) for _ in range(nd))
    bias = draw(st.booleans())
    n = draw(st.integers(1, 3))
    return dict(
        nd=nd,
        B=B,
        groups=G,
        cin=cin,
        cout=cout,
        k=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        mode=mode,
        size=size,
        bias=bias,
        n=n,
    )


def _build(case, cls_map=TIED, **extra):
    kwargs = dict(
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        bias=case["bias"],
        padding_mode=case["mode"],
    )
    return cls_map[case["nd"]](case["cin"], case["cout"], case["k"], **kwargs, **extra)


@PROPERTY
@given(conv_cases(), st.integers(0, 2**16))
def test_tied_conv_equals_its_dense_form_forward_and_backward(case, seed):
    torch.manual_seed(seed)
    tied = _build(case, B=case["B"]).double()
    dense = tied.to_dense().double()
    x = torch.randn(case["n"], case["cin"], *case["size"], dtype=torch.double)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = tied(x1), dense(x2)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    # The shared weight's gradient is the sum of the gradients of its B copies.
    B = case["B"]
    dense_grad = dense.weight.grad.reshape(B, *tied.weight.shape).sum(0)
    torch.testing.assert_close(tied.weight.grad, dense_grad)
    if case["bias"]:
        torch.testing.assert_close(tied.bias.grad, dense.bias.grad.reshape(B, -1).sum(0))
    # The expanded form (the original groups, block-diagonal) is equivalent too.
    torch.testing.assert_close(tied.to_dense(expand=True).double()(x), y2.detach())


@PROPERTY
@given(conv_cases(), st.integers(0, 2**16))
def test_from_dense_with_B1_reproduces_the_dense_layer(case, seed):
    torch.manual_seed(seed)
    dense = _build(case, cls_map=DENSE).double()
    tied = TIED[case["nd"]].from_dense(dense, B=1)
    torch.testing.assert_close(tied.weight, dense.weight, rtol=0, atol=0)
    x = torch.randn(case["n"], case["cin"], *case["size"], dtype=torch.double)
    torch.testing.assert_close(tied(x), dense(x), rtol=0, atol=0)


@PROPERTY
@given(conv_cases(), st.integers(0, 2**16))
def test_round_trip_of_an_already_tied_dense_layer_gives_back_the_weight(case, seed):
    torch.manual_seed(seed)
    expanded = _build(case, B=case["B"]).to_dense(expand=True)  # block-diagonal, equal blocks
    again = TIED[case["nd"]].from_dense(expanded, B=case["B"]).to_dense(expand=True)
    torch.testing.assert_close(again.weight, expanded.weight)
    if case["bias"]:
        torch.testing.assert_close(again.bias, expanded.bias)


def test_mean_transfer_is_the_mean_of_the_tied_diagonal_blocks():
    torch.manual_seed(0)
    B, G, cin, cout = 2, 2, 8, 12
    dense = nn.Conv2d(cin, cout, 3, groups=G)
    tied = TiedConv2d.from_dense(dense, B=B)
    co, ci = cout // (G * B), cin // (G * B)
    expected = []
    for g in range(G):  # filter bank g is shared by sub-blocks k = b*G + g
        blocks = []
        for b in range(B):
            k = b * G + g
            pos = k % B  # position of sub-block k inside original group k // B
            blocks.append(dense.weight[k * co : (k + 1) * co, pos * ci : (pos + 1) * ci])
        expected.append(torch.stack(blocks).mean(0))
    torch.testing.assert_close(tied.weight, torch.cat(expected))
    torch.testing.assert_close(tied.bias, dense.bias.reshape(B, -1).mean(0))


def test_mean_transfer_is_the_least_squares_projection():
    torch.manual_seed(0)
    dense = nn.Linear(12, 8)
    tied = TiedLinear.from_dense(dense, B=4)
    mask = tied.to_dense().weight != 0
    w = tied.weight.detach().clone().requires_grad_()
    loss = ((torch.block_diag(*[w] * 4) - dense.weight.detach())[mask] ** 2).sum()
    loss.backward()
    torch.testing.assert_close(w.grad, torch.zeros_like(w.grad), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "B, G, cin, cout, k, hw",
    [
        (1, 1, 64, 64, 3, 8),
        (2, 1, 64, 128, 3, 8),
        (4, 1, 64, 64, 3, 8),
        (4, 1, 256, 64, 1, 7),
        (8, 1, 64, 64, 3, 5),
        (2, 32, 128, 128, 3, 6),
        (4, 2, 32, 64, 5, 9),
    ],
)
def test_hand_computed_params_and_macs(B, G, cin, cout, k, hw):
    dense = nn.Conv2d(cin, cout, k, padding=k // 2, groups=G, bias=False)
    tied = TiedConv2d.from_dense(dense, B=B)
    dense_params = cout * (cin // G) * k * k
    assert dense.weight.numel() == dense_params
    assert tied.weight.numel() * B * B == dense_params
    assert sum(p.numel() for p in tied.parameters()) == cin * cout * k * k // (B * B * G)
    x = torch.randn(2, cin, hw, hw)
    dense_macs = 2 * hw * hw * k * k * cin * cout // G
    assert _macs(dense, x) == dense_macs
    assert _macs(tied, x) * B == dense_macs


def test_tied_linear_counts_and_shapes():
    tied = TiedLinear(512, 256, B=4)
    assert tied.weight.shape == (64, 128) and tied.bias.shape == (64,)
    assert sum(p.numel() for p in tied.parameters()) == 512 * 256 // 16 + 64
    x = torch.randn(3, 5, 512)
    assert _macs(tied, x) == 15 * 512 * 256 // 4
    torch.testing.assert_close(tied(x), tied.to_dense()(x))
    torch.testing.assert_close(tied(x[0, 0]), tied.to_dense()(x[0, 0]))  # 1-D input


@pytest.mark.parametrize("B", [1, 2, 4])
def test_tied_linear_from_dense_and_gradients(B):
    torch.manual_seed(0)
    dense = nn.Linear(16, 8).double()
    tied = TiedLinear.from_dense(dense, B=B)
    if B == 1:
        torch.testing.assert_close(tied.weight, dense.weight, rtol=0, atol=0)
    ref = tied.to_dense()
    x1 = torch.randn(4, 16, dtype=torch.double, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    tied(x1).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_from_dense_keeps_hyper_parameters_dtype_and_requires_grad():
    dense = nn.Conv2d(
        8,
        16,
        (3, 1),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        padding_mode="reflect",
        dtype=torch.float64,
    )
    dense.weight.requires_grad_(False)
    dense.eval()
    tied = TiedConv2d.from_dense(dense, B=2)
    assert (tied.kernel_size, tied.stride, tied.padding, tied.dilation) == (
        (3, 1),
        (2, 1),
        (1, 0),
        (1, 2),
    )
    assert tied.padding_mode == "reflect" and tied.weight.dtype == torch.float64
    assert not tied.weight.requires_grad and tied.bias.requires_grad
    assert not tied.training
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(tied(x), tied.to_dense()(x))


def test_transfer_none_initializes_the_thin_bank_like_torch():
    torch.manual_seed(0)
    dense = nn.Conv2d(64, 64, 3)
    tied = TiedConv2d.from_dense(dense, B=4, transfer=None)
    bound = 1 / (16 * 9) ** 0.5  # torch's kaiming_uniform(a=sqrt(5)) bound for fan_in = 16*3*3
    assert tied.weight.abs().max() <= bound
    assert tied.weight.abs().max() > 0.8 * bound
    means = TiedConv2d.from_dense(dense, B=4).weight
    assert not torch.allclose(tied.weight, means)


def test_unbatched_input_is_accepted_like_torch():
    tied = TiedConv2d(8, 8, 3, padding=1, B=2)
    x = torch.randn(8, 6, 6)
    torch.testing.assert_close(tied(x), tied.to_dense()(x))


def test_extra_repr_shows_B():
    assert "B=4" in repr(TiedConv2d(64, 64, 3, B=4))
    assert "B=2" in repr(TiedLinear(8, 8, B=2))
    assert "groups=2" in repr(TiedConv1d(8, 8, 1, groups=2, B=2))


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [2.0, "4", None, True])
def test_B_must_be_an_int(B):
    with pytest.raises(TypeError, match="`B` must be a positive int"):
        TiedConv2d(8, 8, 3, B=B)


def test_B_must_be_positive():
    with pytest.raises(TieError, match="must be >= 1, but got B=0"):
        TiedLinear(8, 8, B=0)


def test_B_must_divide_channels_and_says_which_values_work():
    with pytest.raises(TieError, match=r"B=3 .*in_channels=64, out_channels=64.*pick B in \[1, 2"):
        TiedConv2d(64, 64, 3, B=3)
    with pytest.raises(TieError, match="per group"):
        TiedConv2d.from_dense(nn.Conv2d(64, 64, 3, groups=32), B=4)


def test_input_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 16, H, W\).*\(1, 8, 5, 5\)"):
        TiedConv2d(16, 16, 3, B=4)(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match=r"\(\*, 16\)"):
        TiedLinear(16, 16, B=4)(torch.randn(2, 15))


def test_from_dense_rejects_wrong_types_and_subclasses_with_own_forward():
    class Standardized(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="TiedBlock"):
        TiedConv2d.from_dense(Standardized(8, 8, 3), B=2)
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        TiedConv2d.from_dense(nn.Conv1d(8, 8, 3), B=2)
    with pytest.raises(TypeError, match="already tied"):
        TiedConv2d.from_dense(TiedConv2d(8, 8, 3, B=2), B=2)
    with pytest.raises(ValueError, match="`transfer` must be 'mean' or None"):
        TiedLinear.from_dense(nn.Linear(8, 8), B=2, transfer="lsq-typo")


# -- serialization, copies, compile and export ---------------------------------------------


def _tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 8),
    )


def _tie_tiny(net: nn.Sequential, B: int) -> nn.Sequential:
    tied = copy.deepcopy(net)
    tied[0] = TiedConv2d.from_dense(net[0], B=B)
    tied[2] = TiedConv2d.from_dense(net[2], B=B)
    tied[5] = TiedLinear.from_dense(net[5], B=B)
    return tied


def test_state_dict_keys_match_dense_and_reload_with_weights_only(tmp_path):
    torch.manual_seed(0)
    net = _tiny_net()
    tied = _tie_tiny(net, 2)
    assert list(tied.state_dict()) == list(net.state_dict())
    path = tmp_path / "tied.pt"
    torch.save(tied.state_dict(), path)
    fresh = _tie_tiny(_tiny_net(), 2)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(fresh(x), tied(x))


def test_deepcopy_and_pickle_keep_outputs():
    tied = _tie_tiny(_tiny_net(), 4)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(copy.deepcopy(tied)(x), tied(x))
    buf = io.BytesIO()
    pickle.dump(tied, buf)
    torch.testing.assert_close(pickle.loads(buf.getvalue())(x), tied(x))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    tied = _tie_tiny(_tiny_net(), 2).eval()
    compiled = torch.compile(tied, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 8, 6, 6)
    torch.testing.assert_close(compiled(x), tied(x))


def test_torch_export_with_dynamic_batch():
    tied = _tie_tiny(_tiny_net(), 2).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(tied, (torch.randn(2, 8, 6, 6),), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        x = torch.randn(n, 8, 6, 6)
        torch.testing.assert_close(ep.module()(x), tied(x))


# -- TiedBlock ----------------------------------------------------------------------------


class _WeightStandardized(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_tied_block_keeps_the_modules_own_forward():
    torch.manual_seed(0)
    conv = _WeightStandardized(16, 32, 3, padding=1)
    before = copy.deepcopy(conv.state_dict())
    block = TiedBlock(conv, B=4)
    for key, value in conv.state_dict().items():  # the original is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert block.module.weight.shape == (8, 4, 3, 3)
    x = torch.randn(2, 16, 5, 5)
    y = block(x)
    torch.testing.assert_close(y, block.blockwise_forward(x))
    # Per block: the standardized thin filter bank applied to that block's channels.
    thin = block.module
    w = thin.weight
    w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
    for b in range(4):
        ref = nn.functional.conv2d(x[:, 4 * b : 4 * b + 4], w, thin.bias, padding=1)
        torch.testing.assert_close(y[:, 8 * b : 8 * b + 8], ref)


def test_tied_block_on_a_linear_subclass_and_errors():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    block = TiedBlock(Scaled(8, 4), B=2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(block(x), block.blockwise_forward(x))
    with pytest.raises(TieError, match="convolutions and linear layers"):
        TiedBlock(nn.BatchNorm2d(8), B=2)
    with pytest.raises(TieError, match="pick B in"):
        TiedBlock(Scaled(6, 4), B=4)
    with pytest.raises(TypeError, match="no dense equivalent"):
        block.to_dense()


def test_tied_block_on_timm_convs():
    layers = pytest.importorskip("timm.layers")
    x = torch.randn(2, 16, 9, 9)
    for conv in (
        layers.StdConv2d(16, 32, 3, padding=1),
        layers.ScaledStdConv2d(16, 32, 3),
        layers.Conv2dSame(16, 32, 3, stride=2),
    ):
        block = TiedBlock(conv, B=4)
        y = block(x)
        assert y.shape[:2] == (2, 32)
        torch.testing.assert_close(y, block.blockwise_forward(x))
    scaled = layers.ScaledStdConv2d(16, 32, 3)
    assert TiedBlock(scaled, B=4).module.scale == pytest.approx(scaled.scale * 2)


def test_tied_block_transfer_none_reinitializes_through_the_module():
    torch.manual_seed(0)
    conv = _WeightStandardized(16, 32, 3, padding=1)
    fresh = TiedBlock(conv, B=4, transfer=None)
    mean = TiedBlock(conv, B=4)
    assert fresh.module.weight.shape == mean.module.weight.shape == (8, 4, 3, 3)
    assert not torch.allclose(fresh.module.weight, mean.module.weight)
    x = torch.randn(1, 16, 5, 5)
    torch.testing.assert_close(fresh(x), fresh.blockwise_forward(x))
