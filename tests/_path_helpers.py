"""Shared by the path tests: layouts, tolerances and the check that every applicable path of
a tied conv equals the reference fold, forward and backward."""

from __future__ import annotations

import copy

import torch

from tieify.nn import TiedConv1d, TiedConv2d, TiedConv3d, _paths

CL = {1: None, 2: torch.channels_last, 3: torch.channels_last_3d}
TIED = {1: TiedConv1d, 2: TiedConv2d, 3: TiedConv3d}


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x.contiguous()
    nd = x.dim() - 2
    if CL[nd] is not None:
        return x.contiguous(memory_format=CL[nd])
    return x.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, C) memory


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 4e-2, "atol": 4e-2}


def assert_matches_reference(y: torch.Tensor, ref: torch.Tensor, inputs: list, tol=1e-4) -> None:
    """``y`` equals ``ref``, and so do their gradients for ``inputs`` (one random output
    gradient for both), within ``tol``."""
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    g = torch.randn_like(ref)
    got, want = torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def check_all_paths(layer, x: torch.Tensor) -> list[str]:
    """Every applicable path equals the reference fold, forward and backward."""
    x = x.detach().requires_grad_()
    ref = _paths.fold_forward(layer, x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    g_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *params], g_out)
    paths = _paths.applicable_paths(layer, x)
    assert paths[0] == "fold" and "grouped" in paths
    # Offered off the CPU only, but computed the same way on any device: checked here too.
    paths = (*paths, "expanded") if "expanded" not in paths else paths
    tol = tolerances(x.dtype)
    slack = _rounding_slack(layer, x, g_out)
    channels_last_in = _paths.is_channels_last(x) and not _paths.is_channels_first(x)
    for path in paths:
        y = _paths.run_path(layer, x, path)
        assert y.shape == ref.shape, path
        # A path never changes the memory format a channels-last network runs in.
        assert not channels_last_in or _paths.is_channels_last(y), path
        torch.testing.assert_close(y, ref, **tol, msg=lambda m, p=path: f"{p}: {m}")
        grads = torch.autograd.grad(y, [x, *params], g_out)
        for g, r, extra in zip(grads, ref_grads, slack, strict=True):
            g, r = g.float(), r.float()
            allowed = tol["atol"] * (float(r.abs().max()) + 1.0) + tol["rtol"] * r.abs() + extra
            excess = float(((g - r).abs() - allowed).max())
            assert excess <= 0, f"{path} backward: off by {excess:.3g} beyond the tolerance"
    # The layer itself (whatever it selects) equals the reference too.
    torch.testing.assert_close(layer(x), ref, **tol)
    return list(paths)


def _rounding_slack(layer, x: torch.Tensor, g_out: torch.Tensor) -> list[torch.Tensor | float]:
    """Extra tolerance per gradient element for a low-precision dtype. Each path rounds its
    partial sums differently, so the error of a gradient grows with the magnitudes it adds
    up, not with its value: a weight gradient of 0.53 summed from terms of total magnitude
    201 came out 0.11 off in the bfloat16 reference fold (the gemm path was 0.001 off). The
    magnitudes are the same gradients of |x|, |w| and |g_out| in float32; two bfloat16 units
    in the last place (2^-7 each) of that magnitude are allowed. Float32 gets none."""
    if x.dtype == torch.float32:
        return [0.0] * (2 if layer.bias is None else 3)
    mag = copy.deepcopy(layer).float()
    with torch.no_grad():
        mag.weight.abs_()
    xa = x.detach().float().abs().requires_grad_()
    params = [p for p in (mag.weight, mag.bias) if p is not None]
    out = _paths.fold_forward(mag, xa)
    return [2**-6 * m for m in torch.autograd.grad(out, [xa, *params], g_out.float().abs())]


def spy_kernel(monkeypatch, describe=None) -> list:
    """Record every call of the kernel library's entry points but the channels-first
    product, whatever Python reached them: ``describe(conv, args)`` of each (the ctypes
    arguments; ``conv`` for the convolution, direct or Winograd's; default: the rows of a
    pointwise product, ``None`` for a convolution). The library is wrapped for the test, so
    calls kept with the unwrapped library are prepared anew."""
    from tieify.nn import _kernel

    lib = _kernel._library()
    assert lib is not None
    calls: list = []
    describe = describe or (lambda conv, args: None if conv else args[3])

    def record(name: str):
        fn = getattr(lib, name)

        def call(*args):
            calls.append(describe(name != "tieify_pointwise", args))
            return fn(*args)

        return staticmethod(call)

    class Spy:
        tieify_pointwise = record("tieify_pointwise")
        tieify_conv = record("tieify_conv")
        tieify_winograd = record("tieify_winograd")

        def __getattr__(self, name):
            return getattr(lib, name)

    monkeypatch.setitem(_kernel._state, "lib", Spy())
    return calls
