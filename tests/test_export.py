"""Tied models through torch.export (dynamic batch), torch.compile and ONNX (onnxruntime)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tieify.nn import TiedConv2d, TiedLinear, _kernel, _paths

CL = torch.channels_last


class Net(nn.Module):
    """1×1 and 3×3 tied convs, a strided one, BN, a residual add and a tied linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = TiedConv2d(16, 32, 1, B=4)
        self.bn = nn.BatchNorm2d(32)
        self.b = TiedConv2d(32, 32, 3, padding=1, B=2)
        self.c = TiedConv2d(32, 64, 3, stride=2, padding=1, bias=False, B=4)
        self.head = TiedLinear(64, 8, B=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.a(x)))
        y = y + self.b(y)
        y = self.c(y)
        return self.head(y.mean((2, 3)))


def make(layout: str, path: str = "auto") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    for m in net.modules():
        if isinstance(m, TiedConv2d):
            m.path = path
            # NCHW inputs, the tied layers in channels-last (as tieify.optimize may set them)
            m.channels_last = layout == "nchw_in_channels_last"
    x = torch.randn(3, 16, 8, 8)
    if layout == "channels_last":
        net = net.to(memory_format=CL)
        x = x.contiguous(memory_format=CL)
    return net, x


def paths_used(net: nn.Module, x: torch.Tensor) -> set[str]:
    used: set[str] = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, a: used.add(_paths.select_path(mod, a[0])))
        for m in net.modules()
        if isinstance(m, TiedConv2d)
    ]
    net(x)
    for h in hooks:
        h.remove()
    return used


CASES = [
    ("contiguous", "auto"),
    ("channels_last", "auto"),
    ("contiguous", "grouped"),
    ("channels_last", "grouped"),
    ("contiguous", "fold"),
    ("channels_last", "widen"),
    ("channels_last", "lift"),
    ("contiguous", "bmm"),
    ("nchw_in_channels_last", "auto"),
]


@pytest.mark.parametrize("layout,path", CASES)
def test_torch_export_dynamic_batch(layout, path):
    net, x = make(layout, path)
    used = paths_used(net, x)
    if (layout, path) == ("channels_last", "auto"):
        # c has stride 2 along W: no widen; eager runs it on tieify's kernel (grouped where
        # that is not built), an exported graph, which never holds the kernel, lifts it.
        strided = "kernel" if _kernel.kernel_available() else "grouped"
        assert used == {"gemm", "widen", strided}
    if (layout, path) == ("contiguous", "auto"):
        # Eager: the pointwise layer runs natively, the 3×3 ones (6,144-element inputs) fold;
        # traced graphs never take native (below).
        assert used == {"native", "fold"}
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    graph = str(ep.graph)
    assert "thnn_conv2d" not in graph and "slow_conv2d" not in graph
    # Weights stay compact: the exported parameters are the thin filter banks.
    params = dict(ep.named_parameters())
    assert params["b.weight"].shape == (16, 16, 3, 3)
    assert params["a.weight"].shape == (8, 4, 1, 1)
    mod = ep.module()
    for n in (1, 3, 7):
        xn = torch.randn(n, 16, 8, 8)
        if layout == "channels_last":
            xn = xn.contiguous(memory_format=CL)
        torch.testing.assert_close(mod(xn), net(xn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nchw_in_channels_last"])
def test_torch_compile_fullgraph_matches_eager(layout):
    net, x = make(layout)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    x5 = torch.randn(5, 16, 8, 8)
    x5 = x5.contiguous(memory_format=CL) if layout == "channels_last" else x5
    torch.testing.assert_close(compiled(x5), net(x5), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_channels_last():
    net, x = make("channels_last")
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)


def _onnx_initializer_shapes(path) -> list[tuple[int, ...]]:
    import onnx

    model = onnx.load(str(path))
    return [tuple(t.dims) for t in model.graph.initializer]


def _run_ort(path, x: torch.Tensor):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return torch.from_numpy(sess.run(None, {name: x.contiguous().numpy()})[0])


@pytest.mark.parametrize("layout,path", CASES)
def test_onnx_export_matches_onnxruntime(tmp_path, layout, path):
    pytest.importorskip("onnxruntime")
    net, x = make(layout, path)
    f = tmp_path / "net.onnx"
    torch.onnx.export(  # the TorchScript exporter (dynamo=False); dynamo=True below
        net,
        (x,),
        str(f),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    for n in (1, 3, 6):
        xn = torch.randn(n, 16, 8, 8)
        with torch.no_grad():
            ref = net(xn.contiguous(memory_format=CL) if layout == "channels_last" else xn)
        torch.testing.assert_close(_run_ort(f, xn), ref, rtol=1e-4, atol=1e-5)
    numels = {math.prod(s) for s in _onnx_initializer_shapes(f)}
    # Not expanded: the thin 3×3 weights (16·16·9 and 16·8·9 values) are stored, and no
    # repeated (32·16·9, 64·8·9) or block-diagonal (32·32·9, 64·32·9) weight is.
    assert {16 * 16 * 9, 16 * 8 * 9} <= numels
    assert not numels & {32 * 16 * 9, 64 * 8 * 9, 32 * 32 * 9, 64 * 32 * 9}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_onnx_dynamo_export_matches_onnxruntime(tmp_path, layout):
    pytest.importorskip("onnxscript")
    net, x = make(layout)
    f = tmp_path / "net_dynamo.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(net, (x,), str(f), dynamo=True, dynamic_shapes=({0: batch},))
    for n in (2, 5):
        xn = torch.randn(n, 16, 8, 8)
        with torch.no_grad():
            ref = net(xn.contiguous(memory_format=CL) if layout == "channels_last" else xn)
        torch.testing.assert_close(_run_ort(f, xn), ref, rtol=1e-4, atol=1e-5)
    assert 16 * 16 * 9 in {math.prod(s) for s in _onnx_initializer_shapes(f)}


def test_to_dense_exports_expanded_weights_only_when_asked(tmp_path):
    layer = TiedConv2d(16, 32, 3, padding=1, B=4).eval()
    x = torch.randn(2, 16, 6, 6)
    dense = layer.to_dense(expand=True).eval()
    f = tmp_path / "dense.onnx"
    torch.onnx.export(dense, (x,), str(f), dynamo=False)
    assert (32, 16, 3, 3) in _onnx_initializer_shapes(f)
    torch.testing.assert_close(_run_ort(f, x), layer(x).detach(), rtol=1e-4, atol=1e-5)
