"""Forward paths of the tied convolutions.

Every path computes exactly the reference forward (the authors'): fold the B channel blocks
into the batch, ``(N, C, *S) -> (N·B, C/B, *S)``, run the thin convolution, unfold. They
differ only in how the work is laid out for the kernels underneath:

- ``"fold"``: the reference, the fallback for every input.
- ``"gemm"``: 1×1 convolution on a channels-last input; the input *is* a
  ``(N·S·B, C_in/B)`` matrix (a zero-copy view), one matrix multiply with the thin
  ``(C_out/B, C_in/B)`` filter bank gives the channels-last output, again as a view.
- ``"bmm"``: 1×1 convolution on a contiguous (NCHW) input: ``(N·B, C_in/B, S)`` batched
  matrix multiply with the shared filter bank (zero-copy in and out).
- ``"lift"``: k×k convolution on a channels-last input: the ``(N, H, W, B, C/B)`` memory is a
  zero-copy channels-last ``(N, C/B, H, W, B)`` tensor of one more dimension, and a
  convolution with kernel 1 along the new B axis applies the shared filter bank to every
  block (Conv1d → conv2d, Conv2d → conv3d).
- ``"widen"``: any convolution on a channels-last input whose stride along the innermost
  spatial axis is 1 (or whose kernel there is 1, unpadded): the ``(N, *S, B, C/B)`` memory is
  a zero-copy channels-last ``(N, C/B, *S[:-1], S[-1]·B)`` tensor in which the B blocks of a
  pixel sit side by side along the innermost axis; the thin convolution runs on it with the
  innermost dilation and padding multiplied by B, so each tap reaches the same block of the
  neighbouring pixel (and the zero padding) and never another block. One ordinary
  convolution, no copy in or out: on CPU the fastest path for most k×k shapes in
  ``benchmarks/results/``, and for large pointwise ones.
- ``"grouped"``: the compact dense form, a ``groups·B``-group convolution with the filter
  bank repeated B times (part of the graph while autograd records and under tracing; kept
  and reused between eager no-grad calls; parameters stay compact).
- ``"expanded"``: the layer as the convolution it was tied from: ``groups`` groups (the
  dense layer's), the filter bank on the B diagonal blocks of each group, zeros elsewhere
  (kept between eager no-grad calls like ``grouped``'s bank). B times the multiply-adds of
  the other paths, at the dense layer's speed: a floor for the timed choice where the
  device's kernels run thin or narrow-grouped convolutions slower than the dense one (an
  H200, bfloat16, batch 64: ResNeXt-50's 128→128 3×3 conv of 32 groups tied at B = 2, two
  channels per thin group, took 0.85-1.44 ms on every other path against the dense conv's
  0.094 ms, ``benchmarks/results/h200/expanded.md``). Offered on accelerators only
  (on CPU the thin paths' B-fold saving wins), in eager calls and ``torch.compile``
  graphs, never to ``torch.export``/ONNX (which keep the weights compact) nor to
  ``tieify.count`` (which counts the tied arithmetic); only ``tieify.optimize`` or a pinned
  ``layer.path`` takes it.
- ``"kernel"``: 1×1 convolution on a channels-last float32 CPU input: the same matrix
  product as ``gemm``, run by tieify's own compiled kernel (:mod:`tieify.nn._kernel`, built
  on first use with the machine's C++ compiler), written for its shape (millions of rows,
  a thin bank of 8-512 columns), on which BLAS libraries run far below their speed; and 2-D
  k×k convolution (one group, zero padding, any stride and dilation) on such an input, the
  same product with one stretch of input rows per filter tap, read in place of an im2col
  from a zero-padded copy of the rows under the filter. Offered only where the kernel could
  be built; in eager calls and in ``torch.compile`` graphs (as the ``tieify::pointwise`` and
  ``tieify::conv2d`` operators), not in ``torch.export``/ONNX graphs, which must run
  without it. On an NCHW input, a pointwise layer without a stride (eager calls only):
  for each image and block the (C_out/B, C_in/B)·(C_in/B, H·W) product on the input's
  memory as it is, register tiles of 6 output channels × 16 pixels, the output NCHW; while
  autograd records, the same product as ``bmm``.
- ``"native"``: the reference fold on a contiguous (NCHW) 2-D input, run by PyTorch's native
  CPU convolution (``thnn_conv2d``: per sample, an im2col that 1×1 layers skip and one
  single-threaded GEMM, the samples spread over the threads) instead of oneDNN, which is
  what ``conv2d`` picks for any batch above 1. oneDNN reorders NCHW tensors to its blocked
  layout and pays tens of µs per call before any arithmetic: on the folded (N·B)-sample
  batch that is slower than the native kernel for every pointwise layer measured, and for
  k×k layers on small inputs (``benchmarks/README.md``). Eager CPU only (the kernel has no
  decomposition for ``torch.export``/ONNX, so traced graphs keep the other paths).

Which path runs is decided from static properties (layer attributes, dtype, device, shapes
other than the batch, the strides of the non-batch dimensions), so ``torch.compile``
(``fullgraph=True``) and ``torch.export`` with a dynamic batch see one branch. The
exceptions count the batch too, where sizes are concrete: whether an NCHW k×k layer's input
is small enough for ``native`` (:data:`NATIVE_MAX_NUMEL`) and whether a pointwise layer's
input has enough pixels for ``kernel`` or ``widen`` (:data:`KERNEL_MIN_PIXELS`,
:data:`WIDEN_POINTWISE_MIN_PIXELS`; a graph traced with symbolic sizes keeps ``gemm`` unless
the sizes prove the count, so it never guards on the batch). Traced graphs never take
``native``, and only ``torch.compile`` ones take ``kernel``.
``layer.path`` is ``"auto"`` (the cheap rule in :func:`default_path`) or a pinned path name
(set by :func:`tieify.optimize` after timing); a pinned path that does not apply to an input
falls back to the rule.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _kernel, _transfer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._conv import _TiedConvNd

PATHS = ("fold", "gemm", "bmm", "lift", "grouped", "widen", "native", "kernel", "expanded")

#: Largest input (elements, batch included) on which an NCHW k×k layer takes ``native`` by
#: default: above it oneDNN's per-call cost is paid off and its kernels win. 3×3 layers at
#: B = 2 and 4 on 1 and 2 threads: native was faster in all 24 cases up to 4,096 elements,
#: in 12 of 20 at 8,192 and in 14 of 52 at 16,384-32,768.
NATIVE_MAX_NUMEL = 4096

#: Fewest pixels (N · spatial size) at which a pointwise layer on a channels-last CPU input
#: runs ``widen`` rather than ``gemm`` by default, on CPUs without AVX-512. Measured side by
#: side (``benchmarks/pointwise_paths.py``: ResNet-50's pointwise shapes and the 64→64 1×1 at
#: 56×56, B ∈ {2, 4, 8}, 2 threads) on an AVX2 EPYC, widen was 1.10-4.0× faster at batch 8
#: on 28×28 and 56×56 maps (6,272 and 25,088 pixels); gemm was as fast or faster on 7×7 maps
#: at batch 8, on 28×28 and smaller at batch 1, and 1.4-4.3× faster on pooled (1×1) SE inputs.
#: An earlier AVX2 host agreed (widen up to 6.1× at batch 8). On an AVX-512 Xeon gemm was as
#: fast or faster (widen / gemm time 0.87-1.3) at every size, so there it keeps gemm, but where
#: the BLAS runs behind oneDNN (:data:`_BLAS_BEHIND_ONEDNN`: gemm 1.65-5.6× widen's time
#: there at batch 8).
WIDEN_POINTWISE_MIN_PIXELS = 4096

#: Fewest pixels (N · spatial size) at which a pointwise layer on a channels-last CPU input
#: runs tieify's ``kernel`` by default (where it is built, where :data:`_KERNEL_WINS_ALONE`
#: or for a layer :func:`tieify.fuse` fused, and the bank has at most :data:`KERNEL_MAX_BANK`
#: entries). Measured side by side (``benchmarks/pointwise_paths.py``: ResNet-50's pointwise
#: shapes and the 64→64 1×1 at 56×56, B ∈ {2, 4, 8}, 2 threads, AVX2 EPYC, 2026-12-02 01:28,
#: with the eager call kept per input layout), among the layers with such a bank the kernel
#: was the fastest path in 9 of 9 cases at 3,136 pixels (56×56, batch 1) and 6 of 6 at 784
#: (28×28, batch 1: gemm / kernel 1.17-1.31; 1.01-1.32 in the run at 01:53,
#: ``benchmarks/results/epyc_avx2``), and even with gemm at 196 (14×14, batch 1: kernel /
#: gemm 0.93-1.06) and at 392 (7×7, batch 8: 0.84-1.04). Before the call was kept (60-120 µs
#: more a call, ``benchmarks/call_overhead.py``) it was slower than gemm in 5 of 6 cases at
#: 784 pixels. Where the BLAS runs behind oneDNN (:data:`_BLAS_BEHIND_ONEDNN`) or the kernel
#: outruns it (:data:`_KERNEL_OUTRUNS_BLAS`) neither this nor :data:`KERNEL_MAX_BANK` holds on
#: channels-last inputs: on the Zen 5 EPYC
#: (``benchmarks/pointwise_paths.py``, 2 threads, 2026-12-05 14:38 and 14:47, the last
#: committed as ``results/epyc_zen5/pointwise_paths.md``) the kernel took 0.45-0.52× gemm's
#: time on ResNet-50's 14×14 and 7×7 layers at batch 1 (196 and 49 pixels; 0.52-0.82×
#: widen's), 0.42-0.46× on its 7×7 layers at batch 8 (392 pixels; at B = 2 banks of 256×1024
#: and 1024×256) and 0.56-1.00× on MobileNetV3's pooled SE inputs at batch 8.
KERNEL_MIN_PIXELS = 784
#: Largest thin bank (C_in/B · C_out/B entries) the ``kernel`` takes by default: its tiles
#: read the whole (packed) bank for every six rows. With banks of 128×512 and 512×128
#: entries (256 KiB; ResNet-50's 14×14 layers at B = 2, batch 8) the kernel took 0.93-1.12×
#: widen's time in ``pointwise_paths.py`` (2026-12-01, 19:38-19:39, noisy host) and
#: 0.91-0.99× in two interleaved repeats; the larger banks of the 7×7 layers (at B = 2) lost
#: to gemm at batch 8 (1.15-1.17×). Before the bank was packed, 128×512 already lost.
KERNEL_MAX_BANK = 65536
#: Fewest input channels a block (C_in/B) on which a pointwise layer on an NCHW input runs
#: the ``kernel`` (its channels-first product) by default, where :data:`KERNEL_MIN_PIXELS`
#: and :data:`KERNEL_MAX_BANK` hold too; else ``native``. ``benchmarks/nchw_paths.py``
#: (2026-12-02 07:54, 2 threads, AVX2 EPYC; ResNet-50's and MobileNetV3-Large's 1×1 shapes,
#: B ∈ {2, 4, 8}, batch 1 and 8): kernel / native 0.24-1.80, below 1 in 48 of the 51 cases
#: of 784 pixels or more; the three losses, all at batch 8: 16→64 at 112×112, B = 8 (2
#: channels a block, the only case under 4: 1.80), 480→80 at 14×14, B = 4 (1.05) and
#: 1024→256 at 14×14, B = 2 (1.02).
PLANAR_MIN_CHANNELS = 4
#: The fold's oneDNN convolution against tieify's channels-first product and PyTorch's
#: native kernel on NCHW pointwise layers with small maps and wide blocks:
#: ``benchmarks/nchw_paths.py`` on three hosts (2 threads; AVX2 EPYC 2026-12-02 08:10,
#: AVX-512 Zen 4 EPYC 2026-12-03 17:30, Zen 5 EPYC 2026-12-05 11:55, the
#: ``results/*/nchw_paths.md`` of each), ResNet-50's 512→2048 and 2048→512 at 7×7, batch 8:
#: at B = 2 and 4 (128-1024 channels a block, where the rule ran ``native``: 392 pixels are
#: fewer than :data:`KERNEL_MIN_PIXELS`, and at B = 2 the bank is past
#: :data:`KERNEL_MAX_BANK`) fold / native 0.82-0.87, 0.76-0.86 and 0.39-0.41, and kernel /
#: native 0.85-1.07, 0.87-1.02 and 0.84-0.87. With fewer channels a block (B = 8: 64), at
#: batch 1 and on 14×14 maps the fold lost on one host or more (up to 2.3× the kernel's
#: time: 256→1024 at 14×14, batch 1, B = 8, AVX2). So an unstrided NCHW pointwise layer
#: (not a pooled input, which is channels-last too) with an output of at most
#: this many pixels an image, at least :data:`FOLD_POINTWISE_MIN_PIXELS` pixels in all and
#: at least :data:`FOLD_POINTWISE_MIN_CHANNELS` channels a block on both sides runs the fold
#: by default (:func:`_fold_pointwise`).
FOLD_POINTWISE_MAX_IMAGE_PIXELS = 7 * 7
#: The fewest output pixels, batch included, of :data:`FOLD_POINTWISE_MAX_IMAGE_PIXELS`.
FOLD_POINTWISE_MIN_PIXELS = 8 * 7 * 7
#: The fewest channels a block, in and out, of :data:`FOLD_POINTWISE_MAX_IMAGE_PIXELS`.
FOLD_POINTWISE_MIN_CHANNELS = 128
#: Where PyTorch's BLAS runs behind oneDNN (:data:`_BLAS_BEHIND_ONEDNN`), the fold (oneDNN's
#: convolution) against the rule's other NCHW pointwise paths, tieify's channels-first
#: product (``kernel``) and PyTorch's native kernel (on the BLAS): ``benchmarks/nchw_paths.py``
#: on the Zen 5 EPYC (2 threads; 2026-12-05 11:55, 14:40 and 14:47, the last committed as
#: ``results/epyc_zen5/nchw_paths.md``), ResNet-50's 1×1 shapes at batch 8 with 64 channels
#: a block or more on both sides: on 28×28 and 14×14 maps fold / native 0.50-0.72, kernel /
#: native 0.74-0.89 (the rule ran the kernel there); on 7×7 maps at B = 8 (64 and 256
#: channels a block) 0.47-0.50 against 0.80-0.82. With 32 channels a block on a side the
#: fold won 7 of the 12 cases and lost the other 5 by up to 1.41× the kernel's time; with one
#: 28×28 image (64-256 channels a block) fold / kernel was 0.87-1.18. Layers of whole models
#: on NCHW input, batch 8 (``/tmp`` probes, 14:25-14:35, ten calls each): ResNeXt-50's at
#: B = 2 on 28×28 and 14×14 maps took 0.46-0.89 of the rule's path's time folded (its
#: strided downsampling layers 0.46-0.60), the all-B = 4 ResNet-50's with 64 channels a
#: block or more 0.45-0.99; on a 56×56 map the kernel was faster (fold 1.38× its time,
#: 256→512, stride 2, B = 4). So there an NCHW pointwise layer, with a stride or without, of
#: at most this many input pixels an image, a batch of more than one, at least
#: :data:`FOLD_POINTWISE_MIN_PIXELS` pixels in all and
#: :data:`FOLD_POINTWISE_BLAS_BEHIND_MIN_CHANNELS` channels a block on both sides folds.
FOLD_POINTWISE_BLAS_BEHIND_MAX_IMAGE_PIXELS = 28 * 28
#: The fewest channels a block, in and out, of :data:`FOLD_POINTWISE_BLAS_BEHIND_MAX_IMAGE_PIXELS`.
FOLD_POINTWISE_BLAS_BEHIND_MIN_CHANNELS = 64

#: Narrowest output (its last spatial size) on which a 2-D k×k layer on a channels-last CPU
#: input of a batch above one, followed by a batch norm that :func:`tieify.fuse` fused, runs
#: tieify's ``kernel`` by default, the batch norm, add and ReLU in its epilogue (where it is
#: built); narrower ones, and unfused layers, run ``widen``. At a batch of one every such
#: k×k layer runs the kernel, fused or not (fused only where not
#: :data:`_KERNEL_WINS_ALONE`). Measured side by side (``benchmarks/conv_paths.py`` and
#: ``fuse.py``, ResNet-50's 3×3 shapes, B ∈ {2, 4, 8}, 2 threads, AVX2 EPYC): unfused,
#: kernel / widen time was 0.70-1.01 at batch 1 (the kernel the fastest path in 11 of 12;
#: 0.66-1.15 in the session before, with the bank unpacked) but 0.90-1.07 at batch 8 on 56-
#: to 14-wide maps and 0.99-1.34 on 7-wide ones, where a row of the output fills its
#: register tiles badly (2026-12-01, 19:55); fused, the kernel with the batch norm and ReLU
#: in its epilogue took 0.80-0.94 of widen and the separate modules in three runs (64→64 at
#: 56×56, 128→128 at 28×28, B = 4, batch 8). With the kernel's K loop unrolled (2026-12-02),
#: unfused kernel / widen at batch 8 was 0.77-1.00 on 56- and 28-wide maps (three runs of
#: ``conv_paths.py``), yet pinning the kernel on those layers inside ResNet-50 (3×3 at
#: B = 2, all at B = 4; channels-last, batch 8, a probe timing both models interleaved) changed
#: the model's time by 1.00× and 1.02×: unfused layers keep widen.
KERNEL_CONV_MIN_WIDTH = 28
#: The narrowest output a k×k layer that the kernel runs by Winograd's F(2×2, 3×3) takes the
#: ``kernel`` path at by default (:func:`_kernel_conv_by_default`). On ResNet-50's 3×3 shapes
#: at batch 8 (channels-last, 2 threads, AVX-512 Xeon, medians of 7 rounds of 15 calls,
#: 2026-12-02 14:46 UTC), Winograd / direct kernel / ``widen`` in ms, by channels a block:
#: 32 at 56×56 2.09 / 2.35 / 2.49; 64 and 32 at 28×28 1.86 / 2.63 / 2.44 and 1.08 / 1.19 /
#: 1.29; 128, 64 and 32 at 14×14 1.50 / 3.00 / 2.34, 0.90 / 1.27 / 1.22 and 0.50 / 0.59 /
#: 0.66; at 7×7, where the 2×2 tiles compute 64 outputs for 49, 256, 128 and 64 2.73 / 4.16 /
#: 2.40, 1.01 / 1.48 / 1.15 and 0.61 / 0.64 / 0.59 (widen the fastest twice). Since a run's
#: last product rows take 4-row tiles (no longer a recomputing 12-row one), the 7×7 layers
#: too: Winograd / ``widen`` 2.53-2.71 / 2.79-2.86, 1.08-1.17 / 1.29-1.35 and 0.56-0.60 /
#: 0.64-0.68 ms in four runs of ``benchmarks/conv_paths.py`` (2026-12-02 17:53-17:55 UTC),
#: where the kernel was the fastest path in 12 of 12 cases at batch 8 each time. Without
#: AVX-512 (256-bit vectors) the 7×7 layers were measured again on the Zen 1 EPYC (family
#: 23, model 1, AVX2; ``benchmarks/conv_paths.py``, 2 threads, 2026-12-05 17:27 and 17:30
#: UTC): at batch 8, 512 channels at 7×7, B = 2, 4 and 8, the kernel took 9.38 / 4.35 /
#: 2.64 ms and 8.55 / 4.37 / 2.63, ``widen`` (the rule's choice there while the threshold
#: was 14, as measured before the 4-row tiles) 13.47 / 6.18 / 3.12 and 13.02 / 6.02 / 3.16
#: (17:34, the rule taking the kernel: ``benchmarks/results/epyc_zen1/conv_paths.md``);
#: whole ResNet-50s, channels-last, batch 8, tied / dense with 7 against 14 in the same
#: interleaved rounds (a probe on ``benchmarks/models.py``'s ``rule_setting_rows``, 17:28):
#: 3×3-B2 0.754 against 0.771, all-B = 4 0.340 against 0.351.
KERNEL_WINOGRAD_MIN_WIDTH = 7

_CONV_FN: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: PyTorch's native (non-oneDNN) CPU 2-D convolution, with autograd; see ``"native"`` above.
_THNN_CONV2D: Callable[..., torch.Tensor] = torch._C._nn.thnn_conv2d  # type: ignore[attr-defined]


# -- layout helpers (static: they never look at the batch size or the batch stride) --------

#: The channels-last memory format of a tensor of this many dims (batch, channels, spatial).
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether the non-batch dims of ``x`` are laid out (*S, C) with C innermost, dense.

    Dims of size 1 are ignored (their stride is meaningless), and the batch dim is never
    looked at, so the answer is the same for every batch size.
    """
    shape = x.shape[1:]
    strides = x.stride()[1:]
    order = [*range(1, len(shape)), 0]  # spatial dims outer to inner, then channels
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and strides[d] != expected:
            return False
        expected *= shape[d]
    return True


def is_channels_first(x: torch.Tensor) -> bool:
    """Whether the non-batch dims of ``x`` are dense in (C, *S) order (NCHW-contiguous)."""
    shape = x.shape[1:]
    strides = x.stride()[1:]
    expected = 1
    for d in reversed(range(len(shape))):
        if shape[d] != 1 and strides[d] != expected:
            return False
        expected *= shape[d]
    return True


def layout_of(x: torch.Tensor) -> str:
    """``"channels_last"``, ``"contiguous"`` or ``"strided"`` (both when ambiguous: last)."""
    if is_channels_last(x) and not is_channels_first(x):
        return "channels_last"
    if is_channels_first(x):
        return "contiguous"
    return "strided"


def channels_inner(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, *S) -> (N, *S, C)``: a view, dense when ``t`` is channels-last."""
    return t.permute(0, *range(2, t.dim()), 1)


def channels_second(t: torch.Tensor) -> torch.Tensor:
    """``(N, *S, C) -> (N, C, *S)``: the inverse of :func:`channels_inner` (a view)."""
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


# -- the paths --------------------------------------------------------------------------------


def keep_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` laid out like the input ``x`` when ``x`` is channels-last (a copy if it is not).

    A dense convolution returns its input's memory format; so does every path, or one layer's
    choice would turn the rest of a channels-last network into NCHW (and every later
    ``tieify.optimize`` decision with it).
    """
    if is_channels_last(x) and not is_channels_first(x) and not is_channels_last(y):
        return channels_second(channels_inner(y).contiguous())
    return y


def fold_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """Reference path: channels folded into the batch around the thin convolution."""
    n = x.shape[0]
    B = layer.B
    y = layer.thin_conv(x.reshape(n * B, layer.in_channels // B, *x.shape[2:]))
    return keep_layout(y.reshape(n, layer.out_channels, *y.shape[2:]), x)


def _is_pointwise(layer: _TiedConvNd) -> bool:
    """1×1 (all dims), no padding, one group: the convolution is a matrix multiply."""
    pad = layer.padding
    no_pad = pad in ("valid", "same") if isinstance(pad, str) else all(p == 0 for p in pad)
    return (
        all(k == 1 for k in layer.kernel_size)
        and no_pad
        and layer.groups == 1
        and all(d == 1 for d in layer.dilation)
    )


def _subsample_index(layer: _TiedConvNd) -> tuple[slice, ...] | None:
    """The index that keeps the pixels a strided pointwise layer reads (None: stride 1)."""
    if all(s == 1 for s in layer.stride):
        return None
    return (slice(None), slice(None), *(slice(None, None, s) for s in layer.stride))


def _subsample(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    index = _subsample_index(layer)
    return x if index is None else x[index]


def gemm_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """1×1 tied conv on a channels-last input as one ``(N·S·B, C/B) @ (C/B, O/B)`` GEMM."""
    x = _subsample(layer, x)
    B = layer.B
    o, c = layer.out_channels // B, layer.in_channels // B
    spatial = x.shape[2:]
    xl = channels_inner(x)  # (N, *S, C): a view for channels-last input
    y = F.linear(xl.reshape(-1, c), layer.weight.reshape(o, c), layer.bias)
    y = y.reshape(x.shape[0], *spatial, layer.out_channels)
    return channels_second(y)


def bmm_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """1×1 tied conv on a contiguous input as ``W' @ (N·B, C/B, S)`` (batched GEMM)."""
    x = _subsample(layer, x)
    B = layer.B
    o, c = layer.out_channels // B, layer.in_channels // B
    n, spatial = x.shape[0], x.shape[2:]
    xs = x.reshape(n * B, c, math.prod(spatial))
    y = torch.matmul(layer.weight.reshape(o, c), xs)
    if layer.bias is not None:
        y = y + layer.bias.reshape(o, 1)
    return y.reshape(n, layer.out_channels, *spatial)


def lift_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """k×k tied conv on a channels-last input as a conv of one more dim (kernel 1 along B)."""
    B, nd = layer.B, layer._ndim
    c = layer.in_channels // B
    n, spatial = x.shape[0], x.shape[2:]
    xl = channels_inner(x).reshape(n, *spatial, B, c)
    xl = channels_second(xl)  # (N, C/B, *S, B), channels-last_{nd+1}
    pad = layer.padding if isinstance(layer.padding, str) else (*layer.padding, 0)
    y = _CONV_FN[nd + 1](
        xl,
        layer.weight.unsqueeze(-1),
        layer.bias,
        (*layer.stride, 1),
        pad,
        (*layer.dilation, 1),
        layer.groups,
    )
    # y: (N, O/B, *S', B) -> memory (N, *S', B, O/B) -> (N, O, *S') channels-last
    out_spatial = y.shape[2:-1]
    # Dense (N, *S', O) memory even when the conv returned NCHW and B = 1 (where a reshape
    # would be a no-op view); a no-op for a channels-last result.
    y = channels_inner(y).contiguous().view(n, *out_spatial, layer.out_channels)
    return channels_second(y)


def _numeric_padding(layer: _TiedConvNd) -> tuple[int, ...] | None:
    """The layer's padding as numbers per dim, or None where it is asymmetric ('same' with an
    odd total), which a dilated convolution (``widen``) cannot express."""
    pad = layer.padding
    if pad == "valid":
        return (0,) * layer._ndim
    if pad == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            return None
        return tuple(t // 2 for t in totals)
    if isinstance(pad, str):  # no other padding strings exist
        return None
    return tuple(pad)


def _widen_applies(layer: _TiedConvNd, x: torch.Tensor) -> bool:
    if not is_channels_last(x) or layer.padding_mode != "zeros":
        return False
    pad = _numeric_padding(layer)
    if pad is None:
        return False
    # A stride along the widened axis would step across blocks; a 1-wide, unpadded kernel
    # there is subsampled first instead.
    return layer.stride[-1] == 1 or (layer.kernel_size[-1] == 1 and pad[-1] == 0)


def _unit_strides_first(
    layer: _TiedConvNd, x: torch.Tensor, padding: Sequence[int]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` with every axis that has a stride, a 1-wide kernel and no ``padding`` subsampled
    by its stride (a view), and the strides left for the convolution (1 on those axes). Besides
    skipping the pixels the convolution would not read, this avoids a wrong weight gradient:
    PyTorch's CPU backward of a strided 1×1 convolution on a channels-last input of 2 or 4
    channels (torch 2.14.1) gave wrong values in up to 10 of 10 random draws: through
    ``widen`` (the widened input of a layer of one channel a block) on every host, through
    ``expanded`` (the dense block-diagonal convolution of a layer of 2 or 4 channels) on the
    Zen 1 EPYC (family 23, model 1, AVX2; 2026-12-05)."""
    skip = [
        s != 1 and k == 1 and p == 0
        for s, k, p in zip(layer.stride, layer.kernel_size, padding, strict=True)
    ]
    if not any(skip):
        return x, tuple(layer.stride)
    steps = [slice(None, None, s if q else 1) for s, q in zip(layer.stride, skip, strict=True)]
    stride = tuple(1 if q else s for s, q in zip(layer.stride, skip, strict=True))
    return x[(slice(None), slice(None), *steps)], stride


def widen_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """Tied conv on a channels-last input as one conv over ``(N, C/B, *S[:-1], S[-1]·B)``,
    dilation and padding along the innermost axis multiplied by B (see the module doc)."""
    B, nd = layer.B, layer._ndim
    c = layer.in_channels // B
    pad = _numeric_padding(layer)
    assert pad is not None  # guaranteed by _widen_applies
    # The innermost axis must be subsampled first when strided: a stride there would step
    # across blocks (_widen_applies lets only a 1-wide, unpadded kernel through).
    x, stride = _unit_strides_first(layer, x, pad)
    n, spatial = x.shape[0], x.shape[2:]
    xl = channels_inner(x).reshape(n, *spatial[:-1], spatial[-1] * B, c)
    xl = channels_second(xl)  # (N, C/B, *S[:-1], S[-1]·B), channels-last
    y = _CONV_FN[nd](
        xl,
        layer.weight,
        layer.bias,
        (*stride[:-1], 1),
        (*pad[:-1], pad[-1] * B),
        (*layer.dilation[:-1], layer.dilation[-1] * B),
        layer.groups,
    )
    # y: (N, O/B, *S'[:-1], S'[-1]·B) -> memory (N, *S', B, O/B) -> (N, O, *S') channels-last
    out_spatial = (*y.shape[2:-1], y.shape[-1] // B)
    y = channels_inner(y).contiguous().view(n, *out_spatial, layer.out_channels)  # as in lift
    return channels_second(y)


def _traced() -> bool:
    """Inside ``torch.compile``/``torch.export``/``torch.jit.trace`` tracing, or under a
    dispatch mode (``torch.utils.flop_counter``, which ``tieify.count`` uses and which cannot
    count ``thnn_conv2d``): no ``native`` path, and no memo of an eager call's choice."""
    return (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()  # torch.jit.is_tracing() outside TorchScript
        or torch._C._len_torch_dispatch_stack() > 0  # a dispatch mode is active
    )


def _plain_eager(x: torch.Tensor) -> bool:
    """A plain eager call: ``x`` is a real tensor (not a tracer's fake one) and no trace or
    dispatch mode is active — what the eager-only paths, ``native`` and ``kernel``, need."""
    return type(x) in (torch.Tensor, torch.nn.Parameter) and not _traced()


def _native_applies(layer: _TiedConvNd, x: torch.Tensor) -> bool:
    """2-D, one group, no dilation, zero padding expressible as numbers, a dense NCHW float
    input on the CPU, and a plain eager call (no trace or dispatch mode, see the module doc)."""
    return (
        layer._ndim == 2
        and layer.groups == 1
        and all(d == 1 for d in layer.dilation)
        and layer.padding_mode == "zeros"
        and _numeric_padding(layer) is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64, torch.bfloat16)
        and is_channels_first(x)
        and _plain_eager(x)
    )


def native_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """The fold on PyTorch's native CPU convolution (``thnn_conv2d``) instead of oneDNN."""
    n, B = x.shape[0], layer.B
    pad = _numeric_padding(layer)
    assert pad is not None  # guaranteed by _native_applies
    xf = x.reshape(n * B, layer.in_channels // B, *x.shape[2:])
    y = _THNN_CONV2D(xf, layer.weight, layer.kernel_size, layer.bias, layer.stride, pad)
    return y.reshape(n, layer.out_channels, *y.shape[2:])


def _compiling() -> bool:
    """Inside ``torch.compile``, not ``torch.export``: the graphs that may call tieify's kernel
    as the ``tieify::pointwise`` operator. An exported program must run without it
    (``torch.export.load``, ONNX)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


@torch.compiler.assume_constant_result
def _kernel_ready() -> bool:
    """Whether the kernel is built (building it on first use), a constant to a compiled graph;
    where it cannot be built, one warning per process says why."""
    if _kernel.kernel_available():
        return True
    _kernel.warn_unavailable()
    return False


def _kernel_conv(layer: _TiedConvNd) -> bool:
    """A layer tieify's convolution kernel computes: 2-D, one group, zero padding given as
    numbers per side (or 'same' where it is symmetric)."""
    return (
        layer._ndim == 2
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and _numeric_padding(layer) is not None
    )


def _kernel_applies(layer: _TiedConvNd, x: torch.Tensor) -> bool:
    """A float32 CPU input and bank, a kernel that could be built on this machine, and either
    a channels-last input of a pointwise layer or of a 2-D convolution the kernel computes
    (:func:`_kernel_conv`), in a plain eager call (as for ``native``) or a ``torch.compile``
    graph (:func:`_compiling`), or, in a plain eager call, a channels-first input of a
    pointwise layer (:func:`_planar_applies`) or of a 2-D convolution the kernel computes
    (:func:`_transposed_applies`)."""
    params = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    ):
        return False
    if is_channels_last(x):
        shape = _is_pointwise(layer) or _kernel_conv(layer)
        return shape and (_plain_eager(x) or _compiling()) and _kernel_ready()
    if not _plain_eager(x):
        return False
    return (_planar_applies(layer, x) or _transposed_applies(layer, x)) and _kernel_ready()


def _planar_applies(layer: _TiedConvNd, x: torch.Tensor) -> bool:
    """A pointwise layer on a channels-first (NCHW) input whose output has at least
    :data:`tieify.nn._kernel.PLANAR_MIN_PIXELS` pixels an image: the kernel's channels-first
    product, of the input's kept pixels copied out where the layer strides (a static test:
    the batch is not looked at)."""
    return (
        _is_pointwise(layer)
        and is_channels_first(x)
        and math.prod(output_size(layer, x)) >= _kernel.PLANAR_MIN_PIXELS
    )


def _transposed_applies(layer: _TiedConvNd, x: torch.Tensor) -> bool:
    """A k×k layer the convolution kernel computes (:func:`_kernel_conv`) on a channels-first
    (NCHW) input: the kernel runs on a channels-last copy of the input, and its output is
    copied back to NCHW (:func:`to_channels_last`, :func:`to_channels_first`)."""
    return not _is_pointwise(layer) and _kernel_conv(layer) and is_channels_first(x)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A channels-last copy of the 4-D or 5-D ``x`` (e.g. a 2-D kernel conv's NCHW input): by
    the kernel's transposing copy of a dense NCHW float32 tensor in a plain eager call that
    records no gradient (:func:`_relayouts`), else by PyTorch's."""
    if _relayouts(x) and x.is_contiguous():
        return _kernel.relayout(x, channels_last=True)
    return x.contiguous(memory_format=CHANNELS_LAST[x.dim()])


def relays(layer: _TiedConvNd, x: torch.Tensor) -> bool:
    """Whether ``layer`` copies the batched ``x`` to channels-last before computing: it runs
    in channels-last (``layer.channels_last``, a 2-D or 3-D layer) and ``x`` is laid out
    otherwise."""
    return layer.channels_last and x.dim() == layer._ndim + 2 and not is_channels_last(x)


def run_layout(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``layer`` computes on it: its channels-last copy where :func:`relays`, else
    ``x`` itself."""
    return to_channels_last(x) if relays(layer, x) else x


def to_channels_first(y: torch.Tensor) -> torch.Tensor:
    """An NCHW copy of the channels-last ``y`` (the kernel conv's output, for an NCHW input),
    as :func:`to_channels_last` makes its copy."""
    if _relayouts(y) and y.is_contiguous(memory_format=torch.channels_last):
        return _kernel.relayout(y, channels_last=False)
    return y.contiguous()


def _relayouts(x: torch.Tensor) -> bool:
    """Whether the kernel's transposing copy (:func:`tieify.nn._kernel.relayout`) may copy
    ``x`` between NCHW and channels-last: a 4-D float32 CPU tensor in a plain eager call
    that records no gradient, the kernel built."""
    return (
        x.dim() == 4
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and _plain_eager(x)
        and not _records((x,))
        and _kernel.kernel_available()
    )


#: What values made from tensors check before each use: each tensor's stamp (:func:`_stamp`),
#: None for None (:func:`_stamps`, :func:`_all_hold`).
_Stamps = tuple[tuple[Any, ...] | None, ...]


class _OperatorCalls:
    """The kernel's calls made ready (:class:`tieify.nn._kernel.Prepared`: the bank packed,
    the operands checked) for the ``tieify::`` operators, kept across calls. A compiled graph
    calls an operator with the same parameters every time, and making the call ready again
    costs more than a small layer's arithmetic (packing the bank: a pad, a transpose and a
    copy). A call is reused while its tensors (a layer's weight and bias) are the same
    parameters, at the same storages, offsets, shapes and strides, unchanged (their versions,
    or for parameters made under ``torch.inference_mode``, which have no version counter,
    their values: :func:`_stamp`), the input's layout is the same, and the loaded library is
    the one it calls. An in-place update (an optimizer's step, ``load_state_dict``) makes the
    call again. Only ``nn.Parameter`` s are kept, each its own tensor: an alias a compiled
    graph makes of one (inductor's ``reinterpret_tensor``) does not share its version
    counter, so an update would go unseen; any other tensor's call is made every time. The
    parameters are held weakly and a call holds copies of the bank and bias, so a dead
    model's calls go at the next insertion; at most :attr:`LIMIT` calls are kept."""

    LIMIT = 1024

    def __init__(self) -> None:
        # key -> (the library, the tensors' stamps (:func:`_stamp`), the call)
        self._calls: dict[Any, tuple[Any, _Stamps, Any]] = {}

    def get(
        self,
        tensors: tuple[torch.Tensor | None, ...],
        layout: tuple[Any, ...],
        make: Callable[[], _kernel.Prepared],
    ) -> _kernel.Prepared:
        """The call kept for ``tensors`` and an input ``layout`` (everything else the call
        depends on: shapes, geometry), or ``make()``'s, kept."""
        real = tuple(t for t in tensors if t is not None)
        if any(type(t) is not nn.Parameter for t in real):
            return make()
        key = (
            layout,
            tuple(t is None for t in tensors),
            tuple(
                (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
                for t in real
            ),
        )
        lib = _kernel._state.get("lib")
        kept = self._calls.get(key)
        if kept is not None and kept[0] is lib and _all_hold(kept[1], real):
            return kept[2]  # type: ignore[no-any-return]
        with torch.no_grad():
            call = make()
        if key not in self._calls and len(self._calls) >= self.LIMIT:
            self._prune()
        self._calls[key] = (lib, _stamps(real), call)
        return call

    def _prune(self) -> None:
        """Drop the calls of dead parameters, then, while still full, the oldest half."""
        live = {
            k: v
            for k, v in self._calls.items()
            if all(s is None or s[0]() is not None for s in v[1])
        }
        if len(live) >= self.LIMIT:
            live = dict(list(live.items())[len(live) // 2 :])
        self._calls = live

    def clear(self) -> None:
        self._calls.clear()

    def __len__(self) -> int:
        return len(self._calls)


_OPERATOR_CALLS = _OperatorCalls()


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


@torch.library.custom_op("tieify::pointwise", mutates_args=(), device_types="cpu")
def pointwise_op(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ weight.reshape(N, K).T + bias`` by tieify's kernel, as an operator: autograd (the
    backward is three ordinary matrix products) and ``torch.compile`` (which calls it from
    the compiled graph as an external kernel) see it like any ATen op. ``a`` (R, K),
    ``weight`` (N, K, 1, ...) a pointwise layer's bank as it is, ``bias`` (N,) or None,
    float32 on the CPU; the output is a new dense (R, N) tensor. The kernel reads the bank
    packed (:func:`tieify.nn._kernel.pack`); the weight is taken whole, not as a view of it,
    so that a compiled graph hands the operator the parameter itself, whose version counter
    says when the packed copy is stale (:class:`_OperatorCalls`)."""
    a = a.contiguous()
    out = a.new_empty(a.shape[0], weight.shape[0])

    def prepare() -> _kernel.Prepared:
        bank = _packed_bank(weight, None, 1)[0].clone()
        return _kernel.prepare_pointwise(a, bank, _copy(bias), out)

    return _OPERATOR_CALLS.get((weight, bias), ("pointwise", a.shape), prepare).run(a, out)


@pointwise_op.register_fake
def _pointwise_shape(
    a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return a.new_empty(a.shape[0], weight.shape[0])


def _pointwise_save(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    a, weight, bias = inputs
    ctx.save_for_backward(a, weight)
    ctx.has_bias = bias is not None


def _pointwise_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    a, weight = ctx.saved_tensors
    w = weight.reshape(weight.shape[0], -1)  # (N, K)
    need_a, need_weight, need_bias = ctx.needs_input_grad
    grad_a = grad @ w if need_a else None
    grad_weight = (grad.t() @ a).reshape(weight.shape) if need_weight else None
    grad_bias = grad.sum(0) if ctx.has_bias and need_bias else None
    return grad_a, grad_weight, grad_bias


pointwise_op.register_autograd(_pointwise_backward, setup_context=_pointwise_save)


@torch.library.custom_op("tieify::conv2d", mutates_args=(), device_types="cpu")
def conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """The 2-D tied conv of ``x`` (N, C, H, W) by tieify's kernel, as an operator (see
    :func:`pointwise_op`); the output is channels-last, as the input is."""
    geometry: dict[str, Any] = {
        "kernel_size": tuple(weight.shape[2:]),
        "stride": tuple(stride),
        "padding": tuple(padding),
        "dilation": tuple(dilation),
    }

    def prepare(rows: torch.Tensor, out: torch.Tensor) -> _kernel.Prepared:
        def make() -> _kernel.Prepared:
            kind, make_bank = _conv_form(weight, blocks, geometry, None)
            bank, winograd = make_bank(weight, None, blocks)[0].clone(), kind == "winograd"
            return _kernel.prepare_conv2d(
                rows, bank, _copy(bias), out, blocks=blocks, **geometry, winograd=winograd
            )

        layout = ("conv2d", rows.shape, blocks, *geometry.values())
        return _OPERATOR_CALLS.get((weight, bias), layout, make)

    return _run_conv_kernel(x, weight.shape[0] * blocks, geometry, prepare)


def _conv_output(
    x: torch.Tensor,
    out_channels: int,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> torch.Tensor:
    """An empty channels-last output of the conv of ``x``, shaped (N, O, Ho, Wo): a tensor
    of its own, not a permuted view of an (N, Ho, Wo, O) one, which autograd would treat as
    a view made inside the ``tieify::conv2d`` operator and refuse to modify in place (a
    ``ReLU(inplace=True)`` after a tied conv in training)."""
    size = [
        _kernel.conv_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d])
        for d in range(2)
    ]
    return torch.empty(
        (x.shape[0], out_channels, *size),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )


@conv2d_op.register_fake
def _conv2d_shape(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    o = weight.shape[0] * blocks
    return _conv_output(x, o, weight.shape[2:], stride, padding, dilation)


def _conv2d_save(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, blocks, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (bias is not None, blocks, stride, padding, dilation)


def _conv2d_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The reference's gradients: the fold's convolution backward."""
    x, weight = ctx.saved_tensors
    has_bias, B, stride, padding, dilation = ctx.conv
    n, o = x.shape[0], weight.shape[0]
    xf = x.reshape(n * B, x.shape[1] // B, *x.shape[2:])
    gf = grad.reshape(n * B, o, *grad.shape[2:])
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        gf, xf, weight, [o] if has_bias else None, stride, padding, dilation, False, [0, 0], 1,
        mask,
    )  # fmt: skip
    gx = None if gx is None else gx.reshape(x.shape)
    return gx, gw, gb, None, None, None, None


conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_save)


def _run_conv_kernel(
    x: torch.Tensor,
    out_channels: int,
    geometry: dict[str, Any],
    prepare: Callable[[torch.Tensor, torch.Tensor], _kernel.Prepared],
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel's conv of the channels-last ``x`` (N, C, H, W): a new channels-last
    (N, O, Ho, Wo) output, computed by ``prepare(rows, out)``'s call on the channels-inner
    views of both (:func:`tieify.nn._kernel.prepare_conv2d`), with ``residual`` (as the
    call was prepared)."""
    out = _conv_output(x, out_channels, **geometry)
    rows, out_rows = channels_inner(x).contiguous(), channels_inner(out)  # views where dense
    prepare(rows, out_rows).run(rows, out_rows, residual)
    return out


def kernel_conv_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """A 2-D k×k tied conv on a channels-last input by tieify's kernel (:func:`_kernel_conv`
    layers): eager calls that record no gradient call it directly
    (:func:`kernel_conv_call`); the others go through the ``tieify::conv2d`` operator."""
    if _traced() or _records((x, layer.weight, layer.bias)):
        geometry = _conv_geometry(layer)
        args = [list(geometry[k]) for k in ("stride", "padding", "dilation")]
        return conv2d_op(x, layer.weight, layer.bias, layer.B, *args)
    return kernel_conv_call(layer, x, layer.bias)


def _conv_geometry(layer: _TiedConvNd) -> dict[str, Any]:
    """A :func:`_kernel_conv` layer's kernel size, stride, numeric padding and dilation, as
    the convolution kernel takes them."""
    pad = _numeric_padding(layer)
    assert pad is not None  # guaranteed by _kernel_conv
    return {
        "kernel_size": tuple(layer.kernel_size),
        "stride": tuple(layer.stride),
        "padding": tuple(pad),
        "dilation": tuple(layer.dilation),
    }


def kernel_conv_call(
    layer: _TiedConvNd, x: torch.Tensor, bias: torch.Tensor | None, **epilogue: Any
) -> torch.Tensor:
    """The kernel's conv of ``x`` by ``layer`` with its kept bank (:func:`_conv_bank`: its taps,
    or Winograd's transformed banks), in an eager call that records no gradient: ``bias``
    the layer's, or None where the epilogue's shift holds it
    (:func:`tieify.nn._fused.conv_bn_act`, which gives the epilogue)."""
    geometry = _conv_geometry(layer)
    bank, winograd = _conv_bank(layer, geometry, epilogue.get("scale"))

    def prepare(rows: torch.Tensor, out: torch.Tensor) -> _kernel.Prepared:
        return _kernel.prepare_conv2d(
            rows, bank, bias, out, blocks=layer.B, **geometry, **epilogue, winograd=winograd
        )

    return _run_conv_kernel(x, layer.out_channels, geometry, prepare, epilogue.get("residual"))


#: The ``extra`` key of the calls kept by :func:`kernel_forward` run as a named path.
_NAMED = "named path"


def kernel_forward(layer: _TiedConvNd, x: torch.Tensor, key: Any = _NAMED) -> torch.Tensor:
    """A tied conv on a channels-last input by tieify's compiled kernel (see the module doc).
    A pointwise layer is the ``gemm`` path's zero-copy ``(N·S·B, C/B)`` view, another matrix
    multiply; others are convolutions (:func:`kernel_conv_forward`). On a channels-first
    input (eager calls only) a pointwise layer runs the kernel's channels-first product and a
    k×k one the convolution on a channels-last copy, its output copied back to NCHW
    (:func:`_transposed_applies`). An eager call that records no gradient calls the kernel
    directly (the operator's dispatch costs a few µs, as much as a small layer's product)
    with the layer's kept packed bank; the others go through the ``tieify::pointwise``
    operator. Eager no-grad calls keep their prepared call
    (:func:`kernel_call`) under ``key``: :data:`_NAMED` run as a named path (:func:`run_path`:
    timing the candidates), None from the layer's forward, whose calls stand for the path
    the layer selects (:func:`tied_conv_forward`)."""
    weight, bias = layer.weight, layer.bias
    call = kernel_call(layer, x, (weight, bias), key) or prepare_kernel_call(
        layer, x, (weight, bias), key, bias
    )
    if call is not None:
        return call(x)
    if not is_channels_last(x):  # eager calls only
        if not _is_pointwise(layer):  # k×k: the conv on a channels-last copy
            return to_channels_first(kernel_conv_forward(layer, to_channels_last(x)))
        if _records((x, weight, bias)):  # pointwise: the channels-first product
            return bmm_forward(layer, x)  # the same product, differentiable
        xc = _subsample(layer, x).contiguous()
        out = x.new_empty(x.shape[0], layer.out_channels, *xc.shape[2:])
        return _prepare_planar(layer, xc, bias, out).run(xc, out)
    if not _is_pointwise(layer):
        return kernel_conv_forward(layer, x)
    a, unfold = kernel_rows(layer, x)
    if _traced() or _records((a, weight, bias)):
        y = pointwise_op(a, weight, bias)
    else:
        y = kernel_pointwise_call(layer, a, bias)
    return unfold(y)


def kernel_pointwise_call(
    layer: _TiedConvNd, a: torch.Tensor, bias: torch.Tensor | None, **epilogue: Any
) -> torch.Tensor:
    """The kernel's product of a pointwise layer's rows ``a`` (:func:`kernel_rows`) with its
    kept packed bank, in an eager call that records no gradient: a new (rows, C_out/B)
    tensor; ``bias`` as for :func:`kernel_conv_call`, ``epilogue`` with its ``residual`` as
    (rows, C_out/B)."""
    bank, _ = _cached(layer, "packed", _packed_bank)
    out = a.new_empty(a.shape[0], layer.out_channels // layer.B)
    return _kernel.pointwise(a, bank, bias, out, **epilogue)


def kernel_rows(
    layer: _TiedConvNd, x: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A pointwise layer's input as the kernel reads it, the ``(N·S·B, C_in/B)`` rows of
    ``x`` (subsampled by the stride; a view for dense channels-last input), and the function
    that lays the kernel's ``(N·S·B, C_out/B)`` result out as the channels-last output."""
    x = _subsample(layer, x)
    n, spatial = x.shape[0], x.shape[2:]
    a = _rows(x, layer.in_channels // layer.B).contiguous()
    return a, lambda y: channels_second(y.view(n, *spatial, layer.out_channels))


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``(pixels·B, k)`` rows of channels-last ``x``: a view where they are dense."""
    return channels_inner(x).reshape(-1, k)


def _cached(
    layer: _TiedConvNd,
    kind: str,
    make: Callable[[torch.Tensor, torch.Tensor | None, int], _Bank],
) -> _Bank:
    """``make(weight, bias, B)``: a form of the filter bank (and bias) that a path runs on,
    made from the layer's parameters (``"repeated"``: B times along the output channels, for
    ``grouped``; ``"packed"`` and ``"taps"``: the (C_in/B, C_out/B) matrix and the conv's
    taps, packed for ``kernel``).

    In an eager call that records no gradient for them (``torch.no_grad``/``inference_mode``
    or frozen parameters), the form is kept for the layer and reused while its parameters
    are the same tensors, with the same storage, at the same version (an in-place update,
    ``load_state_dict``, ``.to()``, ``.half()`` or a new ``Parameter`` makes a new one). The
    repeat costs B times the bank's memory, what a ``G = B`` group conv's weights take, and
    saves a copy per call. Under tracing, or while autograd records, it is part of the graph.
    Parameters created under ``torch.inference_mode`` have no version counter, so an in-place
    update could not be seen by it: for them the form is kept with a copy of their values,
    compared on each call (:func:`_stamp`).
    The cache lives beside the layer (a weak-keyed map), never in its state, so pickling and
    ``deepcopy`` do not carry it.
    """
    B, weight, bias = layer.B, layer.weight, layer.bias
    params = (weight,) if bias is None else (weight, bias)
    return kept(layer, kind, params, lambda: make(weight, bias, B))


_Form = TypeVar("_Form")


def kept(
    owner: nn.Module, kind: Any, tensors: tuple[torch.Tensor, ...], make: Callable[[], _Form]
) -> _Form:
    """``make()``, a value computed from ``tensors`` (parameters or buffers of ``owner``),
    kept for ``owner`` under ``kind`` and reused while ``tensors`` are the same tensors, at
    the same version and address, or, made under ``torch.inference_mode``, with the same
    values (:func:`_stamp`, the test of a kept kernel call too: a new dtype, device or
    shape comes with new storage), in eager calls that record no gradient for them; made on
    every call otherwise. The lookup costs ~2 µs for six tensors (~5 µs for six of 64 values
    made under inference_mode; 6 µs when it also compared each one's dtype, device and
    shape): a folded dense chain of :func:`tieify.fuse` pays it on every call."""
    if _traced() or _records(tensors):
        return make()
    forms = _FORMS.get(owner)
    if forms is None:
        forms = _FORMS[owner] = {}
    hit = forms.get(kind)
    if hit is not None and _all_hold(hit[0], tensors):
        return hit[1]  # type: ignore[no-any-return]
    with torch.no_grad():
        form = make()
    forms[kind] = (_stamps(tensors), form)
    return form


_Bank = tuple[torch.Tensor, "torch.Tensor | None"]
_FORMS: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[_Stamps, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _repeat_bank(weight: torch.Tensor, bias: torch.Tensor | None, B: int) -> _Bank:
    return _transfer.expand_weight(weight, B), _transfer.expand_bias(bias, B)


def _planar_bank(weight: torch.Tensor, bias: torch.Tensor | None, B: int) -> _Bank:
    """A pointwise bank as the channels-first product reads it (tiles of output channels)."""
    return _kernel.pack_planar(weight), bias


def _prepare_planar(
    layer: _TiedConvNd, x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> _kernel.Prepared:
    """The channels-first product of a pointwise layer on dense NCHW ``x`` into ``out``,
    made ready with the layer's kept bank."""
    bank, _ = _cached(layer, "planar", _planar_bank)
    return _kernel.prepare_pointwise_planar(x, bank, bias, out, layer.B)


def _packed_bank(weight: torch.Tensor, bias: torch.Tensor | None, B: int) -> _Bank:
    """A pointwise bank as the kernel reads it: the (C_in/B, C_out/B) matrix, packed."""
    return _kernel.pack(weight.reshape(weight.shape[0], -1).t()), bias


def _tap_bank(weight: torch.Tensor, bias: torch.Tensor | None, B: int) -> _Bank:
    """The bank as the convolution kernel reads it: (kh·kw·C/B, O/B), taps outermost,
    packed."""
    return _kernel.pack(weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])), bias


def _winograd_bank(weight: torch.Tensor, bias: torch.Tensor | None, B: int) -> _Bank:
    """The 3×3 bank as the Winograd convolution reads it
    (:func:`tieify.nn._kernel.winograd_bank`)."""
    return _kernel.winograd_bank(weight), bias


def _winograd(
    weight: torch.Tensor, B: int, geometry: dict[str, Any], scale: torch.Tensor | None = None
) -> bool:
    """Whether the convolution kernel runs this bank by Winograd's F(2×2, 3×3)
    (:func:`tieify.nn._kernel.winograd_applies`; ``scale``: an epilogue's, (blocks, N))."""
    return _kernel.winograd_applies(
        weight.shape[1], weight.shape[0], B, geometry["kernel_size"], geometry["stride"],
        geometry["dilation"], 0 if scale is None else scale.shape[0],
    )  # fmt: skip


def _conv_form(
    weight: torch.Tensor, B: int, geometry: dict[str, Any], scale: torch.Tensor | None
) -> tuple[str, Callable[[torch.Tensor, torch.Tensor | None, int], _Bank]]:
    """The form of the bank the convolution kernel runs ``weight`` with, and what makes it:
    ``"winograd"`` (:func:`_winograd`: the transformed banks), else ``"taps"``."""
    if _winograd(weight, B, geometry, scale):
        return "winograd", _winograd_bank
    return "taps", _tap_bank


def _conv_bank(
    layer: _TiedConvNd, geometry: dict[str, Any], scale: torch.Tensor | None
) -> tuple[torch.Tensor, bool]:
    """The kept bank the convolution kernel runs ``layer`` with (:func:`_conv_form`), and
    whether by Winograd's F(2×2, 3×3)."""
    kind, make = _conv_form(layer.weight, layer.B, geometry, scale)
    return _cached(layer, kind, make)[0], kind == "winograd"


def _dense_conv(
    layer: _TiedConvNd,
    x: torch.Tensor,
    bank: _Bank,
    groups: int,
) -> torch.Tensor:
    """The standard ``groups``-group convolution of ``x`` with ``bank`` (weight, bias) and
    the layer's stride, padding (and padding mode) and dilation, laid out like ``x``."""
    weight, bias = bank
    conv = _CONV_FN[layer._ndim]
    if layer.padding_mode != "zeros":
        xp = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return keep_layout(conv(xp, weight, bias, layer.stride, 0, layer.dilation, groups), x)
    pad = _numeric_padding(layer)  # None: an asymmetric 'same', which admits no stride
    xs, stride = (x, layer.stride) if pad is None else _unit_strides_first(layer, x, pad)
    y = conv(xs, weight, bias, stride, layer.padding, layer.dilation, groups)
    return keep_layout(y, x)


def grouped_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """The compact dense form: a ``groups·B``-group conv with the filter bank repeated B times
    (kept between eager no-grad calls, see :func:`_cached`)."""
    return _dense_conv(layer, x, _cached(layer, "repeated", _repeat_bank), layer.groups * layer.B)


def _expanded_bank(groups: int) -> Callable[[torch.Tensor, torch.Tensor | None, int], _Bank]:
    """What makes the ``groups``-group bank of ``expanded``: the filter bank on the B
    diagonal blocks of each group (:func:`tieify.nn._transfer.block_diagonal_weight`)."""

    def make(weight: torch.Tensor, bias: torch.Tensor | None, B: int) -> _Bank:
        return _transfer.block_diagonal_weight(weight, B, groups), _transfer.expand_bias(bias, B)

    return make


def _expanded_applies(x: torch.Tensor) -> bool:
    """An input off the CPU, in a plain eager call or a ``torch.compile`` graph (not an
    export, a trace or a count: see ``"expanded"`` in the module doc)."""
    return x.device.type != "cpu" and (_plain_eager(x) or _compiling())


def expanded_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """The layer as the ``groups``-group convolution it was tied from, its bank on the
    diagonal blocks of each group (kept between eager no-grad calls, see :func:`_cached`)."""
    bank = _cached(layer, "expanded", _expanded_bank(layer.groups))
    return _dense_conv(layer, x, bank, layer.groups)


_FORWARD: dict[str, Callable[[_TiedConvNd, torch.Tensor], torch.Tensor]] = {
    "fold": fold_forward,
    "gemm": gemm_forward,
    "bmm": bmm_forward,
    "lift": lift_forward,
    "grouped": grouped_forward,
    "widen": widen_forward,
    "native": native_forward,
    "kernel": kernel_forward,
    "expanded": expanded_forward,
}


# -- selection --------------------------------------------------------------------------------


def applicable_paths(layer: _TiedConvNd, x: torch.Tensor) -> tuple[str, ...]:
    """The paths that compute ``layer`` on an input laid out like ``x`` (static test)."""
    paths = ["fold", "grouped"]
    channels_last = is_channels_last(x)
    if _is_pointwise(layer):
        if channels_last:
            paths.append("gemm")
        if is_channels_first(x):
            paths.append("bmm")
    elif channels_last and layer._ndim in (1, 2) and layer.padding_mode == "zeros":
        paths.append("lift")
    if _widen_applies(layer, x):
        paths.append("widen")
    if _native_applies(layer, x):
        paths.append("native")
    if _kernel_applies(layer, x):
        paths.append("kernel")
    if _expanded_applies(x):
        paths.append("expanded")
    return tuple(p for p in PATHS if p in paths)


#: Read once at import: ``torch.compile`` cannot trace the query.
_CPU_HAS_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _cpu_id(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, int | None, int | None]:
    """The CPU's vendor (``vendor_id``), family and model numbers as Linux lists them for its
    first processor (:func:`tieify.nn._kernel.cpuinfo_fields`); "" and None for what cannot
    be read."""
    fields = _kernel.cpuinfo_fields(cpuinfo)
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    return (
        fields.get("vendor_id", ""),
        int(family) if family.isdigit() else None,
        int(model) if model.isdigit() else None,
    )


#: :func:`_cpu_id` of this machine, read once at import (both machine flags below use it).
_CPU_ID = _cpu_id()


def blas_behind_onednn(vendor: str, family: int | None, avx512: bool, mkl: bool) -> bool:
    """Whether PyTorch's BLAS runs float32 products at well under oneDNN's rate on a CPU:
    PyTorch built on MKL (``mkl``), on an AMD CPU (``vendor`` ``AuthenticAMD``) that runs
    AVX-512 (``avx512``) at full width, family 26 (Zen 5) on. MKL runs its AVX-512 code on
    Intel's CPUs only and its AVX2 code on AMD's; oneDNN, behind PyTorch's convolutions, runs
    AVX-512 on both. Where the 512-bit multiply-adds run at half width (Zen 4, family 25)
    the two codes reach about the same rate, and the rule's measurements there agree with
    the other hosts'. On the Zen 5 EPYC (2 threads; ``benchmarks/blas_rule.py``, 2026-12-05
    15:03, ``results/epyc_zen5/blas_rule.md``): a 2048² ``torch.mm`` at 211 GFLOP/s, a 1×1
    convolution of 1024 channels at 14×14, batch 8, channels-last, at 469;
    ``benchmarks/pointwise_paths.py`` (14:38 and 14:47) had ``gemm`` (MKL) at
    1.65-5.6× ``widen``'s (oneDNN's) time on every channels-last pointwise layer with
    spatial extent at batch 8, and 0.84-2.65× at batch 1 (slower in 26 of 27 in each run)."""
    return mkl and avx512 and vendor == "AuthenticAMD" and family is not None and family >= 26


#: :func:`blas_behind_onednn` of this machine, read once at import. Where it holds, the rule
#: keeps pointwise layers off the BLAS: tieify's ``kernel`` takes channels-last inputs of any
#: bank and size (:func:`_kernel_by_default`), ``widen`` takes them where the kernel is not
#: built (:func:`_widen_pointwise`), and NCHW inputs with wide blocks on maps of up to 28×28
#: fold (:func:`_fold_pointwise`).
_BLAS_BEHIND_ONEDNN = blas_behind_onednn(
    *_CPU_ID[:2], _CPU_HAS_AVX512, torch.backends.mkl.is_available()
)


def kernel_outruns_blas(vendor: str, family: int | None, model: int | None) -> bool:
    """Whether tieify's kernel outruns PyTorch's BLAS on pointwise products of every bank
    and size, though the BLAS keeps up with oneDNN: AMD's Zen and Zen+ cores (family 23,
    models below 0x30), whose multiply-add units are 128 bits wide (a 256-bit AVX2
    operation runs as two halves). Zen 2 (family 23 from model 0x30) runs them at full
    width and has not been measured; there, as on Zen 3 (family 25), the kernel lost to the
    BLAS on the largest banks. On the Zen 1 EPYC (family 23, model 1, 2 threads, 2026-12-05):
    a 2048² ``torch.mm`` at 70 GFLOP/s, a 1×1 convolution of 1024 channels at 14×14, batch
    8, channels-last, at 74 (``benchmarks/blas_rule.py``, 17:22). In two runs of
    ``benchmarks/pointwise_paths.py`` (17:21 and 17:30) ``gemm`` took 1.01-1.33× the
    kernel's time on the 18 channels-last layers where the bounded rule took it (ResNet-50's
    14×14 and 7×7 layers at batch 1, its 7×7 layers at batch 8) but one even case (2048→512
    at B = 2, batch 8: 0.99 and 1.02), and 1.0-1.3× on MobileNetV3's pooled SE inputs at
    batch 8 (0.05-0.1 ms layers): the rule missed the fastest path in 23 and 24 of 66 cases,
    by up to 1.30× and 1.33×; unbounded (17:33, ``results/epyc_zen1/pointwise_paths.md``)
    in 4, by up to 1.08×. Whole models channels-last, tied / dense as ``tieify.tieify``
    returns them, batch 1 / 8, unbounded against bounded in the same rounds
    (``blas_rule.py``, 17:35, ``results/epyc_zen1/blas_rule.md``): ResNeXt-50 B2 0.591 /
    0.614 against 0.613 / 0.629, all-B = 4 ResNet-50 0.316 / 0.343 against 0.335 / 0.349,
    MobileNetV3-Large B2 0.853 / 0.801 against 0.883 / 0.814 (at 17:22: 0.599 / 0.621
    against 0.623 / 0.637, 0.328 / 0.340 against 0.354 / 0.343, 0.853 / 0.780 against
    0.910 / 0.797); each within 0.02 of ``tieify.optimize``'s, or faster."""
    return vendor == "AuthenticAMD" and family == 23 and model is not None and model < 0x30


#: :func:`kernel_outruns_blas` of this machine, read once at import. Where it holds, or
#: :data:`_BLAS_BEHIND_ONEDNN` does, tieify's ``kernel`` takes channels-last pointwise
#: layers of any bank and size (:func:`_kernel_by_default`); NCHW ones keep the rule's
#: bounds, and fold no more than elsewhere.
_KERNEL_OUTRUNS_BLAS = kernel_outruns_blas(*_CPU_ID)
#: Whether the kernel is the default of an unfused layer (where the rule's other conditions
#: hold; a layer :func:`tieify.fuse` fused takes it either way). True on every host measured,
#: with the kernel's stores as :func:`tieify.nn._kernel.stream_min_bytes` sets them; False
#: gives unfused layers oneDNN's paths (``gemm``, ``widen``), which
#: ``benchmarks/kernel_alone.py`` times against it. Whole models, channels-last, tied /
#: dense, batch 1 / 8, the kernel alone against oneDNN's paths:
#:
#: - 2-vCPU AMD EPYC with AVX-512 (family 25, model 17; 32 MB of L3, outputs streamed from
#:   1 MiB; 2026-12-03 04:14-04:16 UTC, ``benchmarks/results/epyc_avx512/kernel_alone.md``):
#:   all-B = 4 ResNet-50 0.316 / 0.350 against 0.367 / 0.481, ResNet-50 3×3-B2 0.778 /
#:   0.780 against 0.824 / 0.829, ResNeXt-50 B2 0.572 / 0.701 against 0.602 / 0.872,
#:   MobileNetV3-Large B2 0.878 / 0.796 against 0.947 / 0.967: faster in all eight (and in
#:   all eight at 03:41, and with outputs streamed from 16 MiB, 2026-12-02 22:51-22:57).
#: - AVX-512 Xeon (480 MB of L3, outputs streamed from 240 MiB; 2026-12-02,
#:   ``benchmarks/results/kernel_alone.md``): 0.369 / 0.476 against 0.416 / 0.482, 0.840 /
#:   0.852 against 0.854 / 0.858, 0.596 / 0.713 against 0.599 / 0.710, MobileNetV3-Large
#:   0.888 / 0.910 against 0.899 / 0.886 (its one loss, 2.5%; 1% in an earlier run). The
#:   run at 17:55 UTC (the results file): 0.370 / 0.447 against 0.419 / 0.463, 0.812 / 0.819
#:   against 0.861 / 0.840, 0.598 / 0.682 against 0.612 / 0.694, 0.882 / 0.879 against
#:   0.882 / 0.870.
#: - Zen 1 EPYC with AVX2 (family 23, model 1; 8 MB of L3, outputs streamed from 1 MiB;
#:   2026-12-05 18:04-18:08 UTC, ``benchmarks/results/epyc_zen1/kernel_alone.md``): 0.323 /
#:   0.334 against 0.430 / 0.402, 0.769 / 0.751 against 0.838 / 0.824, 0.615 / 0.616
#:   against 0.680 / 0.654, 0.833 / 0.789 against 0.911 / 0.873: faster in all eight.
#: - AVX2 EPYC (Zen 3): the kernel was the fastest path of most layers measured alone
#:   (:data:`KERNEL_MIN_PIXELS`, :data:`KERNEL_WINOGRAD_MIN_WIDTH`).
#:
#: The one configuration that lost was that Xeon with outputs streamed from 1 MiB, past a
#: cache that would have kept them for the next layer (which the stores no longer do there):
#: oneDNN's paths ran most of ResNet-50's conv shapes at least as fast as the kernel alone
#: (2-thread Xeon, batch 8, 2026-12-02: ``benchmarks/kernels.py`` had ``tieify.optimize``
#: take the kernel on 5 of 36 cases), and the all-B = 4 ResNet-50 unfused by the rule took
#: 0.488 and 0.509 of the dense channels-last time at batch 8.
_KERNEL_WINS_ALONE = True
#: Where a forward trains (:func:`_trains`), the rule chooses by the time of forward and
#: backward together. One layer at a time, 2 threads, Zen 5 EPYC, interleaved medians
#: (``python benchmarks/training.py --layers``, 2026-12-05 09:45 UTC,
#: ``benchmarks/results/epyc_zen5/training.md``). NCHW pointwise layers: ``native`` took
#: 0.86-0.93 of ``fold``'s time at 56×56 (batch 8) and 0.47-0.70 on the strided 8×8 and
#: 4×4 inputs of 65,536 and 32,768 elements (batch 64; 0.95 and 1.23 on 50,176 and 25,088
#: at batch 1), but 1.10-2.23× between (28×28 to 7×7 at batch 8, 8×8 at batch 128).
#: Channels-last pointwise layers: ``widen`` took 0.49-0.97 of ``gemm``'s time on outputs
#: of 100,352 to 6.4 million elements on their wider side and 1.11× on 524,288 (8×8 at
#: batch 128), but 1.44-1.73× on 32,768 and 16,384 (the strided ones above). Strided k×k
#: layers on channels-last input, which ``widen`` cannot run: ``grouped`` took at most
#: 1.34× the fastest path's time, ``lift`` up to 1.70× (seven layers, 3×3 to 5×5, 14 to
#: 112 wide, B ∈ {2, 4, 8}).
#: The pixels an image from which a pointwise layer that trains on an NCHW input runs
#: ``native`` by default (:func:`_native_trains`).
NATIVE_TRAINING_MIN_PIXELS = 56 * 56
#: The input elements up to which a pointwise layer that trains on an NCHW input runs
#: ``native`` by default (:func:`_native_trains`).
TRAINING_NATIVE_MAX_NUMEL = 65536
#: The output elements on its wider side (batch × output pixels × the larger channel
#: count) from which a pointwise layer that trains on a channels-last input runs ``widen``
#: by default (:func:`_widen_pointwise`).
TRAINING_WIDEN_MIN_NUMEL = 65536
#: Whether a forward that trains (:func:`_trains`) takes the training rule: tieify's kernel
#: left to the layers :func:`tieify.fuse` fused (the kernel's backward is the fold's
#: convolution backward on a copy of the input laid out for it), ``widen`` for large
#: pointwise layers on channels-last input, ``fold`` for mid-sized ones on NCHW input and
#: ``grouped`` for strided k×k layers on channels-last input. False only to time the rule
#: for inference under training (``benchmarks/training.py``).
_TRAINING_RULE = True


def _trains(layer: _TiedConvNd, x: torch.Tensor) -> bool:
    """Whether this forward trains: the layer in training mode, and autograd recording it
    (grad mode on, and the input or a parameter requiring its gradient), so that a backward
    follows; there the rule is the training rule (:data:`_TRAINING_RULE`). A model in eval
    mode, or under ``no_grad`` / ``inference_mode``, takes the rule for inference.

    A training step (forward, cross-entropy, backward) under the rule for inference against
    under the training rule, 2 threads, Zen 5 EPYC, interleaved medians (``python
    benchmarks/training.py``, 2026-12-05 09:45 UTC): the all-B = 4 ResNet-50 at batch 8
    took 1.39× the time on NCHW input and 1.34× channels-last, ResNet-50 with its 3×3 convs
    at B = 2 1.01× and 1.09×, the default search's model (``cifar_resnet``, depth 8, width
    16, on the digits' 8×8 images, batch 64) at B = 2 1.06× and 1.16×, at B = 4 1.00× and
    1.29×. Layer by layer the rule for inference took up to 2.23× the training rule's time
    (NCHW, 2048→512 at 7×7: ``native``; its kernel up to 1.89×, 1024→256 at 14×14), and the
    training rule's path was the fastest or within 1.34× of it on all 46 layers timed."""
    if not (_TRAINING_RULE and layer.training and torch.is_grad_enabled()):
        return False
    params = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)
    return x.requires_grad or any(p.requires_grad for p in params)


def _pixels(x: torch.Tensor) -> int:
    """Batch × spatial size of ``x``: how many rows a pointwise layer's matrix product has."""
    return x.shape[0] * math.prod(x.shape[2:])


def _small_pointwise(layer: _TiedConvNd, pixels: int) -> bool:
    """Whether a pointwise layer on ``pixels`` pixels (batch × spatial size) has at most
    :data:`NATIVE_MAX_NUMEL` elements on its larger side (input or output): where an input
    is both channels-last and NCHW (pooled to 1×1, as in squeeze-excitation), ``native`` has
    the least per-call cost (the caller knows the layer is pointwise: ``gemm`` applies).
    Measured side by side on 1×1 inputs (SE shapes 72↔24, 120↔32, 480↔120, 960↔240 at B = 2
    and 4, batch 1, 8 and 32: 48 cases, 2 threads, AVX2 EPYC, two runs): at batch 1 native
    was faster than gemm in 16 and 14 of 16 cases (18-53 µs against 26-67); over all 48 the
    paths this rule picks took 1,855 µs in all, gemm everywhere 2,107, the fastest path of
    each case 1,784."""
    return pixels * max(layer.in_channels, layer.out_channels) <= NATIVE_MAX_NUMEL


def _at_least_pixels(x: torch.Tensor, n: int) -> bool:
    """At least ``n`` pixels (batch × spatial size) in ``x``, for certain: a graph traced with
    symbolic sizes (``torch.compile(dynamic=True)``, ``torch.export`` with a dynamic batch)
    gets False where the sizes do not prove it, rather than a guard on the batch size, and so
    does ``torch.jit.trace`` (ONNX's TorchScript exporter), whose sizes are tensors."""
    if not all(isinstance(s, (int, torch.SymInt)) for s in (x.shape[0], *x.shape[2:])):
        return False
    return statically_known_true(_pixels(x) >= n)


def _widen_pointwise(layer: _TiedConvNd, x: torch.Tensor, trains: bool = False) -> bool:
    """Whether a pointwise layer's channels-last input is large enough for ``widen`` by
    default: float32 (what was measured) on CPU, and on a CPU without AVX-512 (or whose BLAS
    runs behind oneDNN: :data:`_BLAS_BEHIND_ONEDNN`) at least
    :data:`WIDEN_POINTWISE_MIN_PIXELS` pixels (:func:`_at_least_pixels`), or, where the
    forward ``trains`` (:func:`_trains`), an output of at least
    :data:`TRAINING_WIDEN_MIN_NUMEL` elements on its wider side (batch × output pixels ×
    the larger channel count)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if (not _CPU_HAS_AVX512 or _BLAS_BEHIND_ONEDNN) and _at_least_pixels(
        x, WIDEN_POINTWISE_MIN_PIXELS
    ):
        return True
    if not trains or not isinstance(x.shape[0], (int, torch.SymInt)):
        return False
    rows = x.shape[0] * math.prod(output_size(layer, x))
    wide = max(layer.in_channels, layer.out_channels)
    return statically_known_true(rows * wide >= TRAINING_WIDEN_MIN_NUMEL)


def _native_trains(x: torch.Tensor) -> bool:
    """Whether a pointwise layer that trains (:func:`_trains`) on an NCHW input runs
    ``native`` by default rather than ``fold``: an input of at most
    :data:`TRAINING_NATIVE_MAX_NUMEL` elements, or of at least
    :data:`NATIVE_TRAINING_MIN_PIXELS` pixels an image (eager calls only, as ``native``)."""
    return x.numel() <= TRAINING_NATIVE_MAX_NUMEL or (
        math.prod(x.shape[2:]) >= NATIVE_TRAINING_MIN_PIXELS
    )


def _kernel_by_default(
    layer: _TiedConvNd, x: torch.Tensor, fused: bool = False, trains: bool = False
) -> bool:
    """Whether a pointwise layer whose input the ``kernel`` takes runs it by default:
    :data:`_KERNEL_WINS_ALONE` in a forward that does not train (``trains``, :func:`_trains`)
    or ``fused``, a bank of at most :data:`KERNEL_MAX_BANK` entries and at least
    :data:`KERNEL_MIN_PIXELS` pixels (:func:`_at_least_pixels`; on a channels-last input
    any bank and size where :data:`_BLAS_BEHIND_ONEDNN` or :data:`_KERNEL_OUTRUNS_BLAS`),
    and on an NCHW input at least :data:`PLANAR_MIN_CHANNELS` input channels a block."""
    k = layer.in_channels // layer.B
    bank = k * (layer.out_channels // layer.B)
    channels_last = is_channels_last(x)
    # The other paths run on the BLAS, which runs behind oneDNN or the kernel there.
    unbounded = (_BLAS_BEHIND_ONEDNN or _KERNEL_OUTRUNS_BLAS) and channels_last
    return (
        (fused or (_KERNEL_WINS_ALONE and not trains))
        and (unbounded or bank <= KERNEL_MAX_BANK)
        and (k >= PLANAR_MIN_CHANNELS or channels_last)
        and (unbounded or _at_least_pixels(x, KERNEL_MIN_PIXELS))
    )


def _fold_pointwise(layer: _TiedConvNd, x: torch.Tensor) -> bool:
    """Whether a pointwise layer on an NCHW CPU input (the caller knows it is one: ``native``
    applies) runs the fold by default in a forward that does not train: small maps, a batch
    that brings them to :data:`FOLD_POINTWISE_MIN_PIXELS` pixels and wide blocks. Unstrided
    layers of at most 7×7 pixels an image and 128 channels a block
    (:data:`FOLD_POINTWISE_MAX_IMAGE_PIXELS`, where the measurements are); where the BLAS
    runs behind oneDNN (:data:`_BLAS_BEHIND_ONEDNN`), strided ones too, of at most 28×28
    input pixels an image, 64 channels a block and more than one image
    (:data:`FOLD_POINTWISE_BLAS_BEHIND_MAX_IMAGE_PIXELS`)."""
    narrowest = min(layer.in_channels, layer.out_channels) // layer.B
    if _BLAS_BEHIND_ONEDNN:  # strided too, larger maps, narrower blocks: measured there
        return (
            narrowest >= FOLD_POINTWISE_BLAS_BEHIND_MIN_CHANNELS
            and math.prod(x.shape[2:]) <= FOLD_POINTWISE_BLAS_BEHIND_MAX_IMAGE_PIXELS
            and _at_least_pixels(x, FOLD_POINTWISE_MIN_PIXELS)
            and x.shape[0] != 1  # one 28×28 image: the fold was as often slower as faster
        )
    return (
        all(s == 1 for s in layer.stride)
        and narrowest >= FOLD_POINTWISE_MIN_CHANNELS
        and math.prod(x.shape[2:]) <= FOLD_POINTWISE_MAX_IMAGE_PIXELS
        and _at_least_pixels(x, FOLD_POINTWISE_MIN_PIXELS)
    )


def output_size(layer: _TiedConvNd, x: torch.Tensor) -> tuple[int, ...]:
    """The spatial size of ``layer``'s output on ``x`` (numeric padding; 'same' keeps it,
    'valid' is none)."""
    if layer.padding == "same":
        return tuple(x.shape[2:])
    pad = _numeric_padding(layer)
    assert pad is not None  # None only for an asymmetric 'same'
    return tuple(
        _kernel.conv_size(size, k, s, p, d)
        for size, k, s, p, d in zip(
            x.shape[2:], layer.kernel_size, layer.stride, pad, layer.dilation, strict=True
        )
    )


def _kernel_conv_by_default(
    layer: _TiedConvNd, x: torch.Tensor, fused: bool, trains: bool = False
) -> bool:
    """Whether a k×k layer whose input the ``kernel`` takes runs it by default, where
    :data:`_KERNEL_WINS_ALONE` in a forward that does not train (``trains``, :func:`_trains`)
    or ``fused``: by Winograd's F(2×2, 3×3) (:func:`_winograd`) with an output at least
    :data:`KERNEL_WINOGRAD_MIN_WIDTH` wide, at a batch of one, on a channels-last input where
    ``widen`` does not apply (a stride along the width), or, ``fused``, with an output at
    least :data:`KERNEL_CONV_MIN_WIDTH` wide. Static tests: a symbolic batch (a
    dynamic-batch compile or export) is not taken for one.

    A strided k×k layer on a channels-last input cannot be widened (a stride along the
    widened axis would step across blocks); ``lift``, the rule's choice there before, is
    slower than the kernel almost everywhere. ``python benchmarks/conv_paths.py``, its
    strided tables (B ∈ {2, 4, 8}, channels-last, 2 threads, Zen 5 EPYC with AVX-512, two
    runs, 2026-12-05 08:52 and 08:55 UTC, ``benchmarks/results/epyc_zen5/conv_paths.md``):
    at batch 8, ResNet-50's three strided 3×3 convs took 0.82-1.93× the kernel's time under
    ``lift`` (median 1.20 and 1.19; faster than the kernel in 2 and 4 of 9, by at most 18%,
    at 512 channels, 7 wide out, B = 4 and 8, and 256 at B = 4 and 8) and 0.72-1.46× under
    ``grouped`` (median 1.06 and 0.93); fifteen other strided layers (3×3, 5×5 and 7×7, 6 to
    112 wide) 1.41-4.56× under ``lift`` and 0.78-4.55× under ``grouped`` (medians 1.54 and
    1.11); at batch 1, where the rule took the kernel already, it was the fastest path in 24
    and 22 of 24 cases.

    At a batch of one an NCHW input takes it too (the kernel's copy to channels-last and
    back included). 3×3 layers of 16-128 channels at 4×4 to 56×56, B ∈ {2, 4, 8}, batch 1
    (42 cases a thread count, interleaved medians of 9 rounds; AVX-512 EPYC, 2026-12-03):
    where the rule ran ``fold`` (23 cases: inputs above :data:`NATIVE_MAX_NUMEL` elements,
    no Winograd) it took 1.02-2.36× the kernel's time on one thread (median 1.92) and
    1.15-2.70× on two (1.92); where it ran ``native`` (11 cases, inputs up to 4,096
    elements) 0.97-1.54× (median 1.23) on one thread and 0.91-1.30× (1.00) on two. The
    kernel was the fastest path in 39 and 35 of the 42."""
    if not (fused or (_KERNEL_WINS_ALONE and not trains)):
        return False
    width = output_size(layer, x)[-1]
    winograd = _winograd(layer.weight, layer.B, _conv_geometry(layer))
    if winograd and statically_known_true(width >= KERNEL_WINOGRAD_MIN_WIDTH):
        return True
    batch = x.shape[0]
    if isinstance(batch, (int, torch.SymInt)) and statically_known_true(batch == 1):
        return True  # in either layout (NCHW: on the kernel's copies, see the doc above)
    if not is_channels_last(x):  # NCHW: the copies to channels-last and back pay off only
        return False  # against Winograd's 2.25x fewer multiply-adds (or at a batch of one)
    if not _widen_applies(layer, x):
        return True  # a stride along the width: the other choice is lift, slower everywhere
    return fused and statically_known_true(width >= KERNEL_CONV_MIN_WIDTH)


def default_path(layer: _TiedConvNd, x: torch.Tensor, fused: bool = False) -> str:
    """The cheap rule: the zero-copy path for the input's layout, else the reference fold.

    Pointwise layers on an input that is channels-last and NCHW at once (pooled to 1×1) run
    ``native`` while the layer's larger side is small (:func:`_small_pointwise`). Pointwise
    layers on a channels-last input run tieify's ``kernel`` (only ``fused`` where not
    :data:`_KERNEL_WINS_ALONE`) when it is built, the bank is small and the input large
    enough, or at any size where the BLAS runs behind oneDNN or the kernel outruns it
    (:func:`_kernel_by_default`, :data:`_BLAS_BEHIND_ONEDNN`, :data:`_KERNEL_OUTRUNS_BLAS`);
    else as a GEMM (a matrix multiply has the least
    per-call overhead, which decides small and pooled inputs), or widened on a CPU without
    AVX-512 (or whose BLAS runs behind oneDNN) once a float32 input has
    :data:`WIDEN_POINTWISE_MIN_PIXELS` pixels. k×k layers on a channels-last input run
    tieify's ``kernel`` where it applies by Winograd's F(2×2, 3×3) with an output at least
    :data:`KERNEL_WINOGRAD_MIN_WIDTH` wide, at a batch of one or where a stride along the
    width rules ``widen`` out (only ``fused`` where not
    :data:`_KERNEL_WINS_ALONE`), and with ``fused`` (a layer whose batch norm, add and ReLU
    :func:`tieify.fuse` would apply in the kernel's epilogue) also where the output is at
    least :data:`KERNEL_CONV_MIN_WIDTH` wide
    (:func:`_kernel_conv_by_default`); else widened on CPU where that applies, else, on CPU,
    a strided layer (one the kernel does not run: grouped, another dtype, no compiler) in
    an eager call as a ``grouped`` convolution (below), else lifted (1-D/2-D). On an NCHW
    input (eager calls only) pointwise layers run tieify's ``kernel`` (its channels-first
    product; a strided one on the kept pixels, copied out) by the same rule
    (:func:`_kernel_by_default`), else (CPU, 2-D) ``native``, but the fold where their maps
    are small and their blocks wide (:func:`_fold_pointwise`; where the BLAS runs behind
    oneDNN, maps of up to 28×28 and strided layers too); k×k layers run the
    ``kernel`` on a channels-last copy where Winograd applies, from the same width, or at a
    batch of one, only where :data:`_KERNEL_WINS_ALONE` (:func:`_kernel_conv_by_default`),
    else ``native`` while the input has at most :data:`NATIVE_MAX_NUMEL` elements;
    everything else folds (the batched GEMM is slower than the fold on CPU). Measured in
    ``benchmarks/``; ``tieify.optimize`` times the candidates on the real input instead.

    ``grouped`` against ``lift`` for strided layers: ``python benchmarks/conv_paths.py``
    (2 threads, Zen 5 EPYC, 2026-12-05; four runs, 08:55 committed as
    ``benchmarks/results/epyc_zen5/conv_paths.md``, 12:19, 12:19 and 12:20, the last
    committed as ``conv_paths_grouped.md``): on the strided layers of one group (48 cases:
    3×3, 5×5 and 7×7, B ∈ {2, 4, 8}, batch 1 and 8) ``lift`` took a median 1.36-1.40×
    ``grouped``'s time (0.44-5.23×, faster in 10-12 of the 48); on ResNeXt-50's three
    strided grouped 3×3 convs (32 groups, B ∈ {2, 4, 8}, the last three runs) the nine at
    batch 8 took 1.38-1.47× ``grouped``'s total time under ``lift`` (at batch 1
    1.03-1.27×), though ``lift`` was faster on 7 or 8 of the 18 (28×28 and 14×14 inputs at
    B = 4 and 8, by up to 2.1×). Traced graphs keep ``lift`` (no repeated bank in an
    exported program).

    That is the rule for inference. Where the forward trains (:func:`_trains`: training
    mode, autograd recording), the rule chooses by forward and backward together: tieify's
    kernel only for a fused layer, pointwise layers on channels-last input ``widen`` from
    :data:`TRAINING_WIDEN_MIN_NUMEL` output elements, on NCHW input ``fold`` between
    :data:`TRAINING_NATIVE_MAX_NUMEL` input elements and :data:`NATIVE_TRAINING_MIN_PIXELS`
    pixels an image (else ``native``), and strided k×k layers on channels-last input
    ``grouped``.
    """
    paths = applicable_paths(layer, x)
    if "native" in paths and "gemm" in paths and _small_pointwise(layer, _pixels(x)):
        return "native"  # an input both layouts describe (pooled, 1×1): least overhead
    pointwise = _is_pointwise(layer)
    trains = _trains(layer, x)
    nchw_pointwise = pointwise and "native" in paths and "gemm" not in paths  # not pooled
    if nchw_pointwise and not (trains or fused) and _fold_pointwise(layer, x):
        return "fold"  # small maps, wide blocks: oneDNN's convolution (measured above)
    if "kernel" in paths and pointwise and _kernel_by_default(layer, x, fused, trains):
        return "kernel"
    if "gemm" in paths:
        return "widen" if "widen" in paths and _widen_pointwise(layer, x, trains) else "gemm"
    if "kernel" in paths and not pointwise and _kernel_conv_by_default(layer, x, fused, trains):
        return "kernel"
    if "widen" in paths and x.device.type == "cpu":
        return "widen"
    strided = any(s > 1 for s in layer.stride) and _plain_eager(x)  # traces keep lift
    if (trains or strided) and "lift" in paths and "grouped" in paths and x.device.type == "cpu":
        return "grouped"  # where widen cannot run, training or strided: measured (docstring)
    if "lift" in paths:
        return "lift"
    if "native" in paths and (pointwise or x.numel() <= NATIVE_MAX_NUMEL):
        return "fold" if pointwise and trains and not _native_trains(x) else "native"
    return "fold"


_MEMO_SIZE = 64  # distinct (path, input layout) pairs remembered per layer


def select_path(layer: _TiedConvNd, x: torch.Tensor, fused: bool = False) -> str:
    """The path ``layer`` runs on ``x``: its pinned ``path`` when that applies, else the rule
    (:func:`default_path`; ``fused`` for a layer whose epilogue :func:`tieify.fuse` fuses).

    The answer depends only on the layer's hyper-parameters, its ``path``, the input's
    per-sample shape, strides, dtype and device, and on which side of the size thresholds of
    ``native``, ``widen``, ``kernel`` and the fold the whole input falls
    (:data:`NATIVE_MAX_NUMEL`, :data:`WIDEN_POINTWISE_MIN_PIXELS`, :data:`KERNEL_MIN_PIXELS`,
    :data:`FOLD_POINTWISE_MIN_PIXELS`, :func:`_small_pointwise`)
    and whether it is a batch of one (:func:`_kernel_conv_by_default`), and, where the
    forward trains (:func:`_trains`: the layer's mode, grad mode and ``requires_grad``), on
    the batch size, so eager calls remember it per layer (the checks cost ~50 µs a call in
    Python, more than a small convolution's kernel; the memo's key, ~3 µs). Inside
    ``torch.compile``/``torch.export``/``torch.jit.trace`` tracing and under a dispatch mode
    the checks run every time (shapes may be symbolic there, the trace keeps only the chosen
    path, and ``native`` is not taken there).
    """
    path = getattr(layer, "path", "auto")
    if _traced():
        return _select(layer, x, path, fused)
    n = _pixels(x)
    sizes = (
        x.numel() <= NATIVE_MAX_NUMEL,
        n >= WIDEN_POINTWISE_MIN_PIXELS,
        n >= KERNEL_MIN_PIXELS,
        n >= FOLD_POINTWISE_MIN_PIXELS,
        _small_pointwise(layer, n),
        x.shape[0] == 1,
        x.shape[0] if _trains(layer, x) else None,  # the training rule's sizes: the batch's
    )
    key = (path, x.shape[1:], x.stride()[1:], x.dtype, x.device.type, sizes, fused)
    memo = layer.__dict__.setdefault("_path_memo", {})
    hit = memo.get(key)
    if hit is None:
        hit = _select(layer, x, path, fused)
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        memo[key] = hit
    return hit


def _select(layer: _TiedConvNd, x: torch.Tensor, path: str, fused: bool = False) -> str:
    if path != "auto" and path not in _FORWARD:
        raise ValueError(
            f"{type(layer).__name__}.path must be 'auto' or one of {PATHS}, but got {path!r}; "
            "set layer.path = 'auto' or run tieify.optimize(model, example_inputs)."
        )
    if path != "auto" and path in applicable_paths(layer, x):
        return path
    return default_path(layer, x, fused)


def run_path(layer: _TiedConvNd, x: torch.Tensor, path: str) -> torch.Tensor:
    """Run one named path (the caller checks that it applies; see :func:`applicable_paths`)."""
    return _FORWARD[path](layer, x)


def tied_conv_forward(layer: _TiedConvNd, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` on ``x`` (already validated, batched) with the path it selects, by the
    path's function (the layer's forward runs an eager inference call of the ``kernel`` path
    kept for the input's layout first: :func:`kernel_call`)."""
    path = select_path(layer, x)
    return kernel_forward(layer, x, None) if path == "kernel" else _FORWARD[path](layer, x)


# -- eager kernel calls, prepared once per input layout -----------------------------------------


def _stamp(t: torch.Tensor) -> tuple[Any, ...]:
    """What a value made from ``t`` (a kept call, :class:`_KernelCall`; an operator's kept
    call, :class:`_OperatorCalls`; a kept form, :func:`kept`) checks before each use
    (:func:`_holds`): ``t`` itself (held weakly), its address and its version, or, for a
    tensor made under ``torch.inference_mode`` (which has no version counter, so an
    in-place change would go unseen), a copy of its values. Such parameters come from
    converting or copying a model under ``inference_mode`` (``.to(memory_format=...)``,
    ``deepcopy``): their calls were made anew on every run, a model's tied convolutions
    2.4x slower (ResNet-50 with every bottleneck conv at B = 4, channels-last, batch 1:
    15.6 against 6.6 ms; Zen 5 EPYC, 2 threads, 2026-12-04). The comparison costs ~1 µs
    for 4 KB of values, 7.6 µs for 64 KB."""
    if t.is_inference():
        return (weakref.ref(t), t.data_ptr(), None, t.detach().clone())
    return (weakref.ref(t), t.data_ptr(), t._version, None)


def _holds(stamp: tuple[Any, ...], t: torch.Tensor) -> bool:
    """Whether ``t`` is the tensor of ``stamp`` (:func:`_stamp`), unchanged."""
    ref, address, version, values = stamp
    if ref() is not t or t.data_ptr() != address:
        return False
    if values is None:
        return bool(t._version == version)
    return torch.equal(t, values)


def _stamps(tensors: tuple[torch.Tensor | None, ...]) -> _Stamps:
    """Each tensor's :func:`_stamp` (None for None)."""
    return tuple(None if t is None else _stamp(t) for t in tensors)


def _all_hold(stamps: _Stamps, tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether ``tensors`` are those ``stamps`` were made from (:func:`_stamps`), each
    unchanged (:func:`_holds`), None where it was None."""
    if len(stamps) != len(tensors):
        return False
    for s, t in zip(stamps, tensors, strict=True):  # a loop: each eager kernel call runs it
        if s is None:
            if t is not None:
                return False
        elif t is None or not _holds(s, t):
            return False
    return True


class _KernelCall:
    """A layer's ``kernel`` path for one input layout in eager inference, every check and
    operand made once (:func:`prepare_kernel_call`): per call, an output allocated and the
    kernel run on the input's memory. Choosing the path, checking the layouts and the
    operands and finding the kept bank on every call cost more than a small layer's
    arithmetic: ``benchmarks/call_overhead.py`` (2-vCPU AVX2 EPYC, 2026-12-02 02:08 UTC) on
    a 1×16×2×2 input, 45 µs a call kept against 113 µs made anew for a 1×1 layer (54 against
    177 for a 3×3; the dense conv 26 and 44); at batch 8 on ResNet-50's 1×1 layers, 1.09-1.21×
    the bare kernel's time kept against 1.11-1.24×."""

    __slots__ = (
        "lib", "tokens", "run", "out_shape", "index", "K", "planar", "transposed", "layout"
    )  # fmt: skip

    def __init__(
        self,
        run: _kernel.Prepared,
        tensors: tuple[torch.Tensor | None, ...],
        out_shape: tuple[int, ...],
        index: tuple[slice, ...] | None,
        K: int,
        planar: bool = False,
        transposed: bool = False,
    ) -> None:
        self.lib = _kernel._state.get("lib")
        self.tokens = _stamps(tensors)
        self.run, self.index, self.K = run, index, K
        self.planar = planar  # the channels-first product: its output is NCHW as it is
        self.transposed = transposed  # an NCHW k×k layer: the conv on channels-last copies
        # The kernel writes (N, *S, C) rows: for a 2-D or 3-D layer the output is allocated
        # as the (N, C, *S) tensor in channels-last memory, which lays them out so (one op:
        # the permuted view of a new (N, *S, C) tensor is two, and each call's Python
        # counts); a 1-D layer's is that view.
        self.layout = None if planar else CHANNELS_LAST.get(len(out_shape))
        if self.layout is not None:
            out_shape = (out_shape[0], out_shape[-1], *out_shape[1:-1])
        self.out_shape = out_shape

    def fresh(self, tensors: tuple[torch.Tensor | None, ...]) -> bool:
        """Whether ``tensors`` (the parameters and statistics the call was prepared with) are
        the same tensors, at the same address and version (or, made under
        ``torch.inference_mode``, with the same values: :func:`_stamp`), and the library the
        same."""
        return self.lib is _kernel._state.get("lib") and _all_hold(self.tokens, tensors)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.transposed:  # an NCHW input: its channels-last copy, by the kernel (the call
            a = _kernel.relayout(x, channels_last=True)  # is eager, dense float32: checked)
        elif self.index is None:  # the input's own memory: a view for any layout it was made for
            a = x
        elif self.planar:  # a strided pointwise layer on NCHW input: the kept pixels, copied
            a = x[self.index].contiguous()
        else:  # a strided pointwise layer: the subsampled pixels, copied into rows
            a = _rows(x[self.index], self.K).contiguous()
        if self.layout is None:
            out = x.new_empty(self.out_shape)
        else:
            out = torch.empty(self.out_shape, dtype=x.dtype, memory_format=self.layout)
        self.run(a.data_ptr(), out.data_ptr(), None if residual is None else residual.data_ptr())
        if self.planar:
            return out
        if self.layout is None:
            out = channels_second(out)
        return _kernel.relayout(out, channels_last=False) if self.transposed else out


#: The kept calls of each layer, by input layout (outside the layer's state: pickling and
#: ``deepcopy`` do not carry them, and they hold the library's functions).
_CALLS: weakref.WeakKeyDictionary[nn.Module, dict[Any, _KernelCall]] = weakref.WeakKeyDictionary()


def _call_key(layer: _TiedConvNd, x: torch.Tensor, extra: Any) -> tuple[Any, ...]:
    return (x.shape, x.stride(), x.dtype, x.device.type, getattr(layer, "path", "auto"), extra)


def _records(tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether autograd records a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def kernel_call(
    layer: _TiedConvNd,
    x: torch.Tensor,
    tensors: tuple[torch.Tensor | None, ...],
    extra: Any = None,
    residual: torch.Tensor | None = None,
) -> _KernelCall | None:
    """The call kept for ``layer`` on an input laid out like ``x`` (``extra``: what else it
    was prepared for, e.g. a fused batch norm and its residual's layout), where it still
    holds: a plain eager call that records no gradient (for ``x``, ``residual`` and
    ``tensors``), ``tensors`` unchanged (:meth:`_KernelCall.fresh`). Its key
    holds the input's whole shape and strides, its dtype and device and ``layer.path``, so
    the path the call stands for is the one :func:`select_path` would give."""
    if torch.compiler.is_compiling():  # before the lookup, which a compile would guard on
        return None
    calls = _CALLS.get(layer)
    if calls is None:
        return None
    call = calls.get(_call_key(layer, x, extra))
    if call is None or type(x) is not torch.Tensor or _traced():
        return None
    if _records((x, residual, *tensors)) or not call.fresh(tensors):
        return None
    return call


def prepare_kernel_call(
    layer: _TiedConvNd,
    x: torch.Tensor,
    tensors: tuple[torch.Tensor | None, ...],
    extra: Any,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    **epilogue: Any,
) -> _KernelCall | None:
    """Prepare and keep the ``kernel`` path's call of ``layer`` on inputs laid out like ``x``
    (the caller has selected that path for ``x``), with ``bias`` and the ``epilogue``
    (scale, shift, relu, and a ``residual`` laid out like this one, channels-last), made
    from ``tensors``; None where it cannot be kept: autograd records, or an input or
    residual would need a copy the call does not make. Parameters made under
    ``torch.inference_mode`` (no version counter) are kept with a copy of their values,
    compared before each run (:func:`_stamp`)."""
    if type(x) is not torch.Tensor or _traced() or _records((x, *tensors, residual)):
        return None
    res = None if residual is None else channels_inner(residual)
    if res is not None and not (res.is_contiguous() and type(residual) is torch.Tensor):
        return None
    B = layer.B
    K, N = layer.in_channels // B, layer.out_channels // B
    index = None
    channels_first = not is_channels_last(x)
    if channels_first and (epilogue or residual is not None or not x.is_contiguous()):
        return None  # NCHW calls have no epilogue
    transposed = channels_first and not _is_pointwise(layer)  # the conv on a channels-last copy
    if channels_first and not transposed:  # the channels-first product
        index = _subsample_index(layer)
        sub = x if index is None else x[index].contiguous()
        out = x.new_empty(x.shape[0], layer.out_channels, *sub.shape[2:])
        run = _prepare_planar(layer, sub, bias, out)
        call = _KernelCall(run, tensors, out.shape, index, K, planar=True)
        return _keep_call(layer, x, extra, call)
    if _is_pointwise(layer):
        index = _subsample_index(layer)
        sub = x if index is None else x[index]
        rows = _rows(sub, K)
        if index is None and not (rows.is_contiguous() and rows.data_ptr() == x.data_ptr()):
            return None
        out = x.new_empty(*rows.shape[:1], N)
        res_rows = None if res is None else res.reshape(-1, N)
        bank, _ = _cached(layer, "packed", _packed_bank)
        run = _kernel.prepare_pointwise(
            rows.contiguous(), bank, bias, out, residual=res_rows, **epilogue
        )
        out_shape = (x.shape[0], *sub.shape[2:], layer.out_channels)
    else:
        # An NCHW input's call is made for the layout of its copy (the data comes per call).
        like = torch.empty_like(x, memory_format=torch.channels_last) if transposed else x
        xi = channels_inner(like)
        if not xi.is_contiguous():
            return None
        geometry = _conv_geometry(layer)
        bank, winograd = _conv_bank(layer, geometry, epilogue.get("scale"))
        out = channels_inner(_conv_output(x, layer.out_channels, **geometry))
        run = _kernel.prepare_conv2d(
            xi, bank, bias, out, blocks=B, **geometry, residual=res, **epilogue, winograd=winograd
        )
        out_shape = tuple(out.shape)
    call = _KernelCall(run, tensors, out_shape, index, K, transposed=transposed)
    return _keep_call(layer, x, extra, call)


def _keep_call(layer: _TiedConvNd, x: torch.Tensor, extra: Any, call: _KernelCall) -> _KernelCall:
    """Keep ``call`` for ``layer`` on inputs laid out like ``x`` (and ``extra``)."""
    calls = _CALLS.get(layer)
    if calls is None:
        calls = _CALLS[layer] = {}
    if len(calls) >= _MEMO_SIZE:
        calls.clear()
    calls[_call_key(layer, x, extra)] = call
    return call


def forget_calls(layer: _TiedConvNd) -> None:
    """Drop ``layer``'s kept eager calls (they are made again on the next calls)."""
    _CALLS.pop(layer, None)
