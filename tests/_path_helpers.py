"""Shared by the path tests: layouts, tolerances and the check that every applicable path of
a tied conv equals the reference fold, forward and backward."""

from __future__ import annotations

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


def check_all_paths(layer, x: torch.Tensor) -> list[str]:
    """Every applicable path equals the reference fold, forward and backward."""
    x = x.detach().requires_grad_()
    ref = _paths.fold_forward(layer, x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    g_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *params], g_out)
    paths = _paths.applicable_paths(layer, x)
    assert paths[0] == "fold" and "grouped" in paths
    tol = tolerances(x.dtype)
    channels_last_in = _paths.is_channels_last(x) and not _paths.is_channels_first(x)
    for path in paths:
        y = _paths.run_path(layer, x, path)
        assert y.shape == ref.shape, path
        # A path never changes the memory format a channels-last network runs in.
        assert not channels_last_in or _paths.is_channels_last(y), path
        torch.testing.assert_close(y, ref, **tol, msg=lambda m, p=path: f"{p}: {m}")
        grads = torch.autograd.grad(y, [x, *params], g_out)
        for g, r in zip(grads, ref_grads, strict=True):
            scale = float(r.detach().abs().max()) + 1.0
            torch.testing.assert_close(
                g.float(),
                r.float(),
                rtol=tol["rtol"],
                atol=tol["atol"] * scale,
                msg=lambda m, p=path: f"{p} backward: {m}",
            )
    # The layer itself (whatever it selects) equals the reference too.
    torch.testing.assert_close(layer(x), ref, **tol)
    return list(paths)
