"""Inference-only fast path (CPU first): the same functions as `EDTalk.render`, `encode_identity` and `extract`,
computed with fewer passes.

`FastRenderer(model)` (or `model.fast_renderer()`) snapshots the encoder, generator and EEM weights into inference
form:
- channels-last (NHWC) memory for every activation and the cached identity features: oneDNN's native layout;
- equalized-lr scales folded into the stored weights; the sqrt(2) leaky-ReLU gain folded into each layer's
  weight and bias (leaky ReLU is positively homogeneous); the demodulation norms sum(w^2) precomputed;
  all modulation linears of G evaluated as one GEMM per call;
- modulated 3x3 convolutions on weights prepacked once for oneDNN, bias and leaky ReLU fused as post-ops
  (lrelu(conv(x * s) * d + b) = d * lrelu(conv(x * s) + b / d) since d > 0); for one frame with a small weight
  and a large input, s and d go into a per-call copy of the weight instead of two passes over the input;
- the 3x3 convolutions with >= 128 channels at 16..128 px as Winograd F(4x4, 3x3) (Lavin & Gray 2015): 36 batched
  GEMMs instead of 9 taps per output, 4x fewer multiplies, the transforms themselves as GEMMs, in chunks of ~128
  tiles that stay in cache, with the layer's scale, bias, leaky ReLU (or the instance norm's moments) applied
  per chunk;
- the transposed-conv upsampling on a prepacked oneDNN weight, its FIR blur with the demodulation folded into the
  (per-channel) kernel, bias and leaky ReLU fused;
- the warp (bilinear grid_sample) as a sparse CSR x dense product over channels-last features; at the finest
  level the feature is projected to RGB before it is warped (both maps are linear), so no 64-channel 256 px map is
  warped at all;
- the flow head's blend as one lerp, and the mask applied after the (linear, per-pixel) ToRGB instead of before;
- the EEM's conv2 bias dropped (the instance norm that follows removes it), instance norm + AdaIN + residual as
  one per-channel affine, its identity-only half once per identity;
- on CPU the frames of a call split into as many equal groups as torch has threads (up to the frame count), run
  concurrently, each in a thread of its own on one share of the threads (the leftover frames after them, on all
  threads); within a group the coarse levels run as one batch, the fine ones frame by frame (cache-sized). Each
  core then keeps its own frame's maps in its cache, and the memory-bound passes no longer synchronise two cores
  per op;
- glibc malloc told to keep freed memory (`retain_freed_memory`), so the per-frame activations are not
  page-faulted in afresh every frame.

The reference-compatible variant (ModelConfig.preset("reference"), `edtalk import`) runs through the same path:
its ToRGB's 1x1 conv (linear, bias-free) stays fused with the warp and its FusedLeakyReLU + bias run plainly after
it; its warp samples with align_corners=False on a float64-built base grid; its EEM (the released one) is an
instance-normed conv of the identity feature, done once per identity, and a per-frame AdaIN affine.
tests/test_reference_fast.py checks it against the eager reference variant.

The training forward (edtalk/ops.py ...) is untouched; this path is for `torch.inference_mode` / `no_grad` only
and rebuilds itself when the model's weights change. tests/test_model_fast.py checks it against the eager model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
from torch.nn import functional as F

from edtalk.eem import ReferenceEEMBlock
from edtalk.ops import LRELU_GAIN, LRELU_SLOPE, ReferenceToRGB, fused_leaky_relu

# Winograd F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2, inf (Lavin & Gray, "Fast Algorithms for
# Convolutional Neural Networks", 2015): Y = A^T [(G g G^T) * (B^T d B)] A over 6x6 input tiles with stride 4.
_WINO_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_WINO_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_WINO_AT = (
    (1, 1, 1, 1, 1, 0),
    (0, 1, -1, 2, -2, 0),
    (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1),
)
_WINO_CACHE: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _wino_transforms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B^T kron B^T) (36, 36) and (A^T kron A^T) (16, 36): the 2-D tile transforms as single matrices."""
    key = (dtype, device)
    if key not in _WINO_CACHE:
        bt = torch.tensor(_WINO_BT, dtype=torch.float64)
        at = torch.tensor(_WINO_AT, dtype=torch.float64)
        _WINO_CACHE[key] = (
            torch.kron(bt, bt).to(device=device, dtype=dtype),
            torch.kron(at, at).to(device=device, dtype=dtype),
        )
    return _WINO_CACHE[key]


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """3x3 weight (O, I, 3, 3) -> its Winograd-domain form U = G w G^T as (36, I, O), computed in float64.

    Stored (36, I, O) contiguous, the right-hand operand of the tile GEMM as it is read: a transposed view of
    (36, O, I) made torch.bmm 2.2x slower at 1024 tiles x 128 channels (153 against 335 GFLOP/s)."""
    if weight.shape[2:] != (3, 3):
        raise ValueError(f"winograd_weight: needs a 3x3 kernel, got {tuple(weight.shape)}")
    g = torch.tensor(_WINO_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


_RETAINED: bool | None = None


def retain_freed_memory() -> bool:
    """Make glibc's malloc serve blocks up to 32 MiB from its heap and keep freed memory instead of returning it
    to the system (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD / M_TOP_PAD; process-wide, once). By default glibc
    maps every block above its threshold afresh and unmaps it when freed, so each frame's 8-17 MB activations are
    page-faulted in again on first touch: ~10% of a 256 px render on CPU (bench/model.py). The cost: the process
    keeps its peak heap. True if applied (glibc), False elsewhere."""
    global _RETAINED
    if _RETAINED is None:
        _RETAINED = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
            _RETAINED = bool(
                libc.mallopt(m_mmap_threshold, 32 << 20)
                and libc.mallopt(m_trim_threshold, 1 << 30)
                and libc.mallopt(m_top_pad, 64 << 20)
            )
        except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
            _RETAINED = False
    return _RETAINED


def _cl(x: torch.Tensor) -> torch.Tensor:
    """The same tensor in channels-last memory (N, H, W, C), the layout every op of this path runs in."""
    return x.contiguous(memory_format=torch.channels_last)


# Tiles per Winograd chunk: each chunk's transformed tiles (36 x tiles x channels) stay in this CPU's L2 through
# the three GEMMs instead of streaming 19-38 MB intermediates through memory (measured alone, docs/benchmarks.md
# "Model": 128@128 11.9 -> 9.6 ms, 512@32 x 8 frames 72 -> 45 ms; 64 or 256 tiles were no better).
WINO_CHUNK_TILES = 128


def _wino_spans(b: int, th: int, tw: int) -> list[tuple[int, int, int, int]]:
    """(first frame, end frame, first tile row, end tile row) of each chunk of about WINO_CHUNK_TILES tiles: rows of
    one frame where a frame has more tiles, else whole frames."""
    if th * tw >= WINO_CHUNK_TILES:
        rows = max(1, WINO_CHUNK_TILES // tw)
        return [(f, f + 1, t, min(th, t + rows)) for f in range(b) for t in range(0, th, rows)]
    frames = max(1, WINO_CHUNK_TILES // (th * tw))
    return [(f, min(b, f + frames), 0, th) for f in range(0, b, frames)]


def winograd_conv3x3(
    x: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    shift: torch.Tensor | None = None,
    in_lrelu: bool = False,
    out_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lrelu: bool = False,
    moments: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.conv2d(x * scale, w, padding=1) for a 3x3 weight w given as U = winograd_weight(w) (36, I, O), then
    optionally * out_scale (B, O), + bias (O,), leaky ReLU.

    The input may also be shifted, x * scale + shift (B, I), and pass a leaky ReLU (in_lrelu) before the (zero)
    padding, as the EEM's AdaIN -> leaky ReLU -> conv does; x may then be one frame broadcast over the B rows of
    scale and shift. moments=True also returns the per-(frame, channel) mean and mean square over H, W of the
    result, (B, O) each, summed per chunk while it is in cache (for the instance norm after the EEM's convs).

    x (B, I, H, W) in any layout; `scale` (B, I) multiplies the input channels on the way into the (zero-padded)
    tile buffer, so the modulation costs no extra pass. Works in channels-last memory, in chunks of about
    WINO_CHUNK_TILES tiles (of one frame or of several): per chunk one gather of the overlapping 6x6 tiles, the
    input transform, the 36 tile GEMMs, the output transform, the epilogue while the chunk is in cache, and the
    4x4 results written into place. The result comes back channels-last.
    """
    c, h, w = x.shape[1:]
    b = max([x.shape[0]] + [t.shape[0] for t in (scale, shift) if t is not None])
    o = u.shape[2]
    if u.shape != (36, c, o):
        raise ValueError(f"winograd_conv3x3: U {tuple(u.shape)} does not fit input channels {c}")
    bb, aa = _wino_transforms(x.dtype, x.device)
    th, tw = -(-h // 4), -(-w // 4)
    hp, wp = 4 * th + 2, 4 * tw + 2
    xp = x.new_empty(b, hp, wp, c)
    for border in (xp[:, :1], xp[:, h + 1 :], xp[:, :, :1], xp[:, :, w + 1 :]):
        border.zero_()
    inner = xp[:, 1 : h + 1, 1 : w + 1]
    xn = x.permute(0, 2, 3, 1)
    per_channel = [None if t is None else t.view(-1, 1, 1, c).to(x.dtype) for t in (scale, shift)]
    if scale is not None and shift is not None:
        torch.addcmul(per_channel[1], xn, per_channel[0], out=inner)
    elif scale is not None:
        torch.mul(xn, per_channel[0], out=inner)
    elif shift is not None:
        torch.add(xn, per_channel[1], out=inner)
    else:
        inner.copy_(xn)
    if in_lrelu:
        F.leaky_relu(inner, LRELU_SLOPE, inplace=True)
    osc = None if out_scale is None else out_scale.to(x.dtype)
    ob = None if bias is None else bias.to(x.dtype)
    out = x.new_empty(b, 4 * th, 4 * tw, o)
    if moments:
        if 4 * th != h or 4 * tw != w:
            raise ValueError(f"winograd_conv3x3: moments need H, W divisible by 4, got {h}x{w}")
        sums = x.new_zeros(2, b, o)
    for f0, f1, t0, t1 in _wino_spans(b, th, tw):
        nb, nt = f1 - f0, t1 - t0
        # The chunk's overlapping 6x6 tiles (stride 4) as a view; one gather copy lays them out as
        # (36, tiles * I).
        tiles = xp[f0, 4 * t0 :].as_strided(
            (6, 6, nb, nt, tw, c), (wp * c, c, hp * wp * c, 4 * wp * c, 4 * c, 1)
        )
        v = torch.mm(bb, tiles.reshape(36, -1)).view(36, nb * nt * tw, c)
        m = torch.bmm(v, u)  # (36, tiles, O): the 4x fewer multiplies
        y = torch.mm(aa, m.view(36, -1)).view(16, nb, nt * tw, o)
        if osc is not None:
            y.mul_(osc[f0:f1].view(1, nb, 1, o))
        if ob is not None:
            y.add_(ob)
        if lrelu:
            F.leaky_relu(y, LRELU_SLOPE, inplace=True)
        if moments:
            rows = y.transpose(0, 1).reshape(nb, -1, o)
            sums[0, f0:f1] += rows.sum(dim=1)
            sums[1, f0:f1] += torch.linalg.vecdot(rows, rows, dim=1)
        dst = out[f0:f1, 4 * t0 : 4 * t1].view(nb, nt, 4, tw, 4, o)
        dst.copy_(y.view(4, 4, nb, nt, tw, o).permute(2, 3, 0, 4, 1, 5))
    if 4 * th != h or 4 * tw != w:
        out = out[:, :h, :w].contiguous()
    if moments:
        sums /= h * w
        return out.permute(0, 3, 1, 2), sums[0], sums[1]
    return out.permute(0, 3, 1, 2)  # NCHW view of channels-last memory


def warp_bilinear(feat: torch.Tensor, grid: torch.Tensor, align_corners: bool = True) -> torch.Tensor:
    """F.grid_sample(feat, grid, align_corners=align_corners) (bilinear, zero padding), returned in channels-last
    memory.

    The warp is a linear map with four taps per output pixel shared by all channels, so it runs as one sparse
    (CSR) x dense product per frame: out (Ho*Wo, C) = S (Ho*Wo, H*W) @ feat (H*W, C), reading each source pixel's
    channels contiguously from channels-last features. grid_sample itself writes a channels-first result, which the
    channels-last ops after it would have to convert.
    """
    b, c, h, w = feat.shape
    ho, wo = grid.shape[1:3]
    outs = []
    for i in range(grid.shape[0]):
        gx, gy = grid[i, ..., 0].reshape(-1), grid[i, ..., 1].reshape(-1)
        if align_corners:  # -1 and 1 are the centres of the corner pixels
            ix, iy = (gx + 1.0) * ((w - 1) / 2), (gy + 1.0) * ((h - 1) / 2)
        else:  # -1 and 1 are the outer edges of the corner pixels (grid_sample's unnormalisation)
            ix, iy = ((gx + 1.0) * w - 1.0) / 2, ((gy + 1.0) * h - 1.0) / 2
        x0f, y0f = ix.floor(), iy.floor()
        wx1, wy1 = ix - x0f, iy - y0f
        x0, y0 = x0f.to(torch.int64), y0f.to(torch.int64)
        # A tap outside the source contributes zero (padding_mode="zeros"); its column is clamped to stay valid.
        wx0 = (1.0 - wx1) * ((x0 >= 0) & (x0 < w))
        wx1 = wx1 * ((x0 >= -1) & (x0 < w - 1))
        wy0 = (1.0 - wy1) * ((y0 >= 0) & (y0 < h))
        wy1 = wy1 * ((y0 >= -1) & (y0 < h - 1))
        cx0, cx1 = x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1)
        ry0, ry1 = y0.clamp(0, h - 1) * w, (y0 + 1).clamp(0, h - 1) * w
        cols = torch.stack([ry0 + cx0, ry0 + cx1, ry1 + cx0, ry1 + cx1], dim=1).reshape(-1)
        vals = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=1).reshape(-1)
        crow = torch.arange(0, 4 * ho * wo + 1, 4, device=feat.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all this uses
            warnings.simplefilter("ignore", UserWarning)
            sparse = torch.sparse_csr_tensor(
                crow, cols, vals.to(feat.dtype), (ho * wo, h * w), check_invariants=False
            )
        src = feat[i if b > 1 else 0].permute(1, 2, 0).reshape(h * w, c)  # a view for channels-last features
        out = src.new_empty(ho * wo, c)
        # Written in place (beta=0 ignores the uninitialised buffer): `sparse @ src` zero-fills a result and
        # copies it once more (2x slower).
        torch.addmm(out, sparse, src, beta=0, out=out)
        outs.append(out.view(1, ho, wo, c))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.permute(0, 3, 1, 2)


class _Conv:
    """A constant-weight convolution with bias and optional leaky ReLU fused, on a oneDNN weight prepacked per
    input shape (the layout the kernel wants, reordered once instead of every call); plain F.conv2d fallback."""

    def __init__(
        self, weight: torch.Tensor, padding: int, groups: int = 1, use_mkldnn: bool = True, stride: int = 1
    ) -> None:
        self.weight = weight.contiguous()
        self.padding = padding
        self.groups = groups
        self.stride = stride
        self.use_mkldnn = use_mkldnn and self.weight.device.type == "cpu" and _mkldnn_ok()
        self.packed: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, lrelu: bool) -> torch.Tensor:
        # oneDNN may hand back channels-last outputs (its transposed convs do): both layouts run prepacked.
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        p, st = [self.padding] * 2, [self.stride] * 2
        if self.use_mkldnn and x.dtype == torch.float32 and (cl or x.is_contiguous()):
            key = (*x.shape, cl)
            packed = self.packed.get(key)
            if packed is None:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.weight.to_mkldnn(), p, st, [1, 1], self.groups, list(x.shape)
                )
                self.packed[key] = packed
            return _onednn_conv(x, packed, bias, self.padding, self.stride, self.groups, lrelu)
        out = F.conv2d(
            x, self.weight.to(x.dtype), bias, stride=self.stride, padding=self.padding, groups=self.groups
        )
        return F.leaky_relu(out, LRELU_SLOPE) if lrelu else out


def _onednn_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    stride: int = 1,
    groups: int = 1,
    lrelu: bool = False,
) -> torch.Tensor:
    """oneDNN convolution (torch's private op) on a plain or prepacked weight, bias and leaky ReLU fused."""
    attr, scalars = ("leaky_relu", [LRELU_SLOPE]) if lrelu else ("none", [])
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, [padding] * 2, [stride] * 2, [1, 1], groups, attr, scalars, ""
    )


def _onednn_deconv2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """oneDNN transposed convolution, stride 2, no padding (the upsampling convs), on a plain or prepacked weight
    (I, O, k, k)."""
    return torch.ops.mkldnn._convolution_transpose_pointwise(
        x, weight, None, [0, 0], [0, 0], [2, 2], [1, 1], 1, "none", [], ""
    )


def _agrees(run) -> bool:
    """Whether `run()` (a private-op result and its reference) works on this torch build and agrees."""
    try:
        y, ref = run()
        return bool(torch.allclose(y, ref, atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _check_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 5, 5, generator=g), torch.randn(4, 4, 3, 3, generator=g)


@functools.cache
def _mkldnn_ok() -> bool:
    """Whether the oneDNN prepacked-conv ops of this torch build run and agree with F.conv2d."""

    def run():
        x, w = _check_inputs()
        b = torch.arange(4.0)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape)
        )
        ref = F.leaky_relu(F.conv2d(x, w, b, padding=1), LRELU_SLOPE)
        return _onednn_conv(x, packed, b, 1, lrelu=True), ref

    return _agrees(run)


@functools.cache
def _mkldnn_deconv_ok() -> bool:
    """Whether the oneDNN prepacked transposed-conv ops of this torch build run and agree with
    F.conv_transpose2d (stride 2, the only use here)."""

    def run():
        x, w = _check_inputs()
        packed = torch.ops.mkldnn._reorder_convolution_transpose_weight(
            w, [0, 0], [0, 0], [2, 2], [1, 1], 1, list(x.shape)
        )
        return _onednn_deconv2(x, packed), F.conv_transpose2d(x, w, stride=2)

    return _agrees(run)


# Fold the styles into a per-call weight copy when the weight has at most 1/FOLD_RATIO the elements of one frame.
FOLD_RATIO = 16


def _fold_styles_shape(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether scaling a copy of `weight` per call is cheaper than a pass over one frame of x (fp32 on CPU, the
    weight at most 1/16 of the frame's activations: the 64-channel convs at 256 px)."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.numel() * FOLD_RATIO <= x[0].numel()
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    )


def _fold_styles(conv: _Conv, x: torch.Tensor) -> bool:
    return conv.use_mkldnn and _fold_styles_shape(conv.weight, x)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[:, :, None, None]


class _ModConv3x3:
    """StyledConv (3x3, no upsampling): lrelu(conv(x * s) * d + b) * sqrt(2), gain folded into w and b."""

    def __init__(self, styled, use_winograd: bool, use_mkldnn: bool) -> None:
        conv = styled.conv
        w = conv.weight.detach() * conv.scale
        self.w2 = w.pow(2).sum(dim=(2, 3))  # (O, I), for d = rsqrt(s^2 @ w2^T)
        w = w * LRELU_GAIN
        self.bias = styled.activate.bias.detach() * LRELU_GAIN
        self.winograd = winograd_weight(w) if use_winograd else None
        self.conv = None if use_winograd else _Conv(w, padding=1, use_mkldnn=use_mkldnn)

    def __call__(self, x: torch.Tensor, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.winograd is not None:
            return winograd_conv3x3(x, self.winograd, s, out_scale=d, bias=self.bias, lrelu=True)
        if d.shape[0] == 1 and _fold_styles(self.conv, x):
            # One frame with a small weight and a large input: s (input channels) and d (output channels) go
            # into a per-call copy of the weight instead of two passes over the activations.
            w = self.conv.weight * (s[0].view(1, -1, 1, 1) * d[0].view(-1, 1, 1, 1))
            return _onednn_conv(x, w, self.bias, 1, lrelu=True)
        xs = x * _per_channel(s)
        if d.shape[0] == 1:
            # lrelu(y * d + b) = d * lrelu(y + b / d) for d > 0: bias and activation fused into the conv.
            out = self.conv(xs, (self.bias / d[0]).contiguous(), lrelu=True)
            return out.mul_(_per_channel(d))
        out = self.conv(xs, None, lrelu=False)
        out.mul_(_per_channel(d)).add_(self.bias.view(1, -1, 1, 1))
        return F.leaky_relu(out, LRELU_SLOPE, inplace=True)


class _ModUpConv:
    """StyledConv with upsampling: transposed conv (stride 2) -> FIR blur -> * d -> + b -> lrelu * sqrt(2); the
    blur, d, the bias and the activation run as one depthwise convolution (d folded into its kernel)."""

    def __init__(self, styled, polyphase_min_size: int = 64, use_mkldnn: bool = True) -> None:
        conv = styled.conv
        w = conv.weight.detach() * conv.scale
        self.w2 = w.pow(2).sum(dim=(2, 3))
        self.weight_t = (w * LRELU_GAIN).transpose(0, 1).contiguous()  # (I, O, k, k)
        self.bias = styled.activate.bias.detach() * LRELU_GAIN
        blur = conv.blur
        if blur.pad[0] != blur.pad[1]:
            raise ValueError(f"fast path: asymmetric blur padding {blur.pad} is not supported")
        self.pad = blur.pad[0]
        k = torch.flip(blur.kernel, [0, 1])  # upfirdn2d convolves: the depthwise conv gets the flipped taps
        self.kernel = k.view(1, 1, *k.shape)
        self.out_ch = w.shape[0]
        self.polyphase_min_size = polyphase_min_size
        self.use_mkldnn = use_mkldnn
        self.polyphase: _Conv | None = None
        self.packed: dict[tuple[int, ...], torch.Tensor] = {}

    def _polyphase(self, xs: torch.Tensor) -> torch.Tensor:
        """conv_transpose2d(xs, w, stride=2) as one stride-1 conv with the four 2x2 phase kernels stacked as
        4 * O output channels, then interleaved; the result has one extra (zero) row and column at the end."""
        if self.polyphase is None:
            w = self.weight_t.transpose(0, 1)  # (O, I, 3, 3)
            taps = (
                (2, 0),
                (None, 1),
            )  # output phase 0 takes w[2] (left) and w[0] (right); phase 1 takes w[1]
            phases = []
            for ta in taps:
                for tb in taps:
                    k = w.new_zeros(w.shape[0], w.shape[1], 2, 2)
                    for u, a in enumerate(ta):
                        for v, b in enumerate(tb):
                            if a is not None and b is not None:
                                k[:, :, u, v] = w[:, :, a, b]
                    phases.append(k)
            self.polyphase = _Conv(torch.cat(phases), padding=1, use_mkldnn=self.use_mkldnn)
        bsz, _, h, w_ = xs.shape
        y4 = self.polyphase(xs, None, lrelu=False)  # (B, 4 * O, H + 1, W + 1)
        o = self.out_ch
        return (
            y4.view(bsz, 2, 2, o, h + 1, w_ + 1)
            .permute(0, 3, 4, 1, 5, 2)
            .reshape(bsz, o, 2 * h + 2, 2 * w_ + 2)
        )

    def __call__(self, x: torch.Tensor, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        onednn = (
            self.use_mkldnn and x.dtype == torch.float32 and x.device.type == "cpu" and _mkldnn_deconv_ok()
        )
        if (
            onednn
            and s.shape[0] == 1
            and x.shape[2] < self.polyphase_min_size
            and _fold_styles_shape(self.weight_t, x)
        ):
            # s folded into a per-call copy of the (small) weight: no pass over the (large) input.
            y = _onednn_deconv2(x, self.weight_t * s[0].view(-1, 1, 1, 1))
        else:
            xs = x * _per_channel(s)
            if x.shape[2] >= self.polyphase_min_size and x.dtype == torch.float32:
                # 2H + 2 rows: the blur below then yields 2H + 1, the last one dropped
                y = self._polyphase(xs)
            elif onednn:
                # oneDNN's transposed conv on a weight reordered once per input shape (F.conv_transpose2d
                # reorders the whole weight on every call: 2x slower at 4..16 px, where the weight dominates).
                key = (*xs.shape, xs.is_contiguous())
                packed = self.packed.get(key)
                if packed is None:
                    packed = torch.ops.mkldnn._reorder_convolution_transpose_weight(
                        self.weight_t, [0, 0], [0, 0], [2, 2], [1, 1], 1, list(xs.shape)
                    )
                    self.packed[key] = packed
                y = _onednn_deconv2(xs, packed)
            else:
                y = F.conv_transpose2d(xs, self.weight_t.to(x.dtype), stride=2)
        out = self._blur(y, d)
        h = 2 * x.shape[2]
        return out if out.shape[2] == h else out[:, :, :h, : 2 * x.shape[3]]

    def _blur(self, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        b = y.shape[0]
        if b == 1:
            kernel = (self.kernel * d[0].view(-1, 1, 1, 1)).to(y.dtype)
            bias = self.bias.to(y.dtype)
            if _mkldnn_ok() and y.dtype == torch.float32 and y.device.type == "cpu":
                return _onednn_conv(y, kernel, bias, self.pad, groups=self.out_ch, lrelu=True)
            out = F.conv2d(y, kernel, bias, padding=self.pad, groups=self.out_ch)
            return F.leaky_relu(out, LRELU_SLOPE, inplace=True)
        kernel = self.kernel.expand(self.out_ch, 1, -1, -1).to(y.dtype)
        out = F.conv2d(y, kernel, padding=self.pad, groups=self.out_ch)
        out.mul_(_per_channel(d)).add_(self.bias.view(1, -1, 1, 1))
        return F.leaky_relu(out, LRELU_SLOPE, inplace=True)


class _Upsample3:
    """ops.Upsample (2x zero insertion + FIR, pad (2, 1)) of a few channels as one depthwise transposed conv."""

    def __init__(self, up, channels: int) -> None:
        if up.factor != 2 or up.kernel.shape != (4, 4) or up.pad != (2, 1):
            raise ValueError("fast path: only the 2x upsampling with 4 taps is supported")
        self.kernel = up.kernel.view(1, 1, 4, 4).expand(channels, 1, 4, 4).contiguous()
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.kernel.to(x.dtype), stride=2, padding=1, groups=self.channels)


def _modulation(mc) -> tuple[torch.Tensor, torch.Tensor]:
    lin = mc.modulation
    return lin.weight.detach() * lin.scale, lin.bias.detach() * lin.lr_mul


def _rgb_modulation(to_rgb, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToRGB's style linear; the reference ToRGB has no style: a zero weight and a bias of ones, so its style is
    exactly 1 and the levels keep one layout of styles."""
    if isinstance(to_rgb, ReferenceToRGB):
        bias = to_rgb.bias.detach()
        c = to_rgb.conv[0].weight.shape[1]
        return bias.new_zeros(c, latent_dim), bias.new_ones(c)
    return _modulation(to_rgb.conv)


class _FastGenerator:
    def __init__(
        self,
        gen,
        winograd_min_channels: int,
        winograd_sizes: tuple[int, int],
        use_mkldnn: bool,
        polyphase_min_size: int,
        sparse_warp_min_size: int,
    ):
        self.sparse_warp_min_size = sparse_warp_min_size
        # GeneratorConfig.warp: "reference" builds the base grid in float64 and samples with align_corners=False.
        self.align_corners = not gen.flows[0].reference_warp
        self.const = gen.input.input.detach()
        # the finest levels whose ToRGB sees the blend of warp and generated features (Generator.paint_scales)
        self.first_paint = len(gen.convs) - gen.paint_scales
        size = 4
        mods: list[tuple[torch.Tensor, torch.Tensor]] = []

        def conv3(styled, res):
            mods.append(_modulation(styled.conv))
            wino = (
                styled.conv.in_ch >= winograd_min_channels and winograd_sizes[0] <= res <= winograd_sizes[1]
            )
            conv = _ModConv3x3(styled, wino, use_mkldnn)
            w2s.append(conv.w2)
            return conv

        w2s: list[
            torch.Tensor | None
        ] = []  # per modulation: the demodulation norms, None where there is none
        self.conv1 = conv3(gen.conv1, size)
        self.levels = []
        for up_conv, conv, flow, to_rgb in zip(gen.up_convs, gen.convs, gen.flows, gen.to_rgbs, strict=True):
            size *= 2
            mods.append(_modulation(up_conv.conv))
            up = _ModUpConv(up_conv, polyphase_min_size, use_mkldnn)
            w2s.append(up.w2)
            c = conv3(conv, size)
            mods.append(_modulation(flow.conv))
            fw = flow.conv.weight.detach() * flow.conv.scale  # (3, C, 1, 1), no demodulation
            mods.append(_rgb_modulation(to_rgb, mods[0][0].shape[1]))
            rgb_conv = to_rgb.conv[0] if isinstance(to_rgb, ReferenceToRGB) else to_rgb.conv
            rw = rgb_conv.weight.detach() * rgb_conv.scale
            w2s += [None, None]
            self.levels.append(
                {
                    "up": up,
                    "conv": c,
                    "flow_w": fw,
                    "flow_b": flow.bias.detach().view(1, 3, 1, 1),
                    "flow_up": _Upsample3(flow.upsample, 3),
                    "rgb_w": rw,
                    "rgb_b": to_rgb.bias.detach().view(1, 3, 1, 1),
                    # the reference ToRGB's FusedLeakyReLU bias, applied before its activation (None: ours, linear)
                    "rgb_act": to_rgb.conv[1].bias.detach() if isinstance(to_rgb, ReferenceToRGB) else None,
                    "rgb_up": _Upsample3(to_rgb.upsample, 3),
                    "size": size,
                }
            )
        self.w2 = w2s
        self.mod_weight = torch.cat([w for w, _ in mods]).contiguous()
        self.mod_bias = torch.cat([b for _, b in mods])
        self.mod_sizes = [w.shape[0] for w, _ in mods]
        self.grids: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    def _grid(self, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
        key = (h, w, ref.dtype, ref.device)
        if key not in self.grids:
            lin = ref.dtype if self.align_corners else torch.float64  # the reference's float64 base grid
            ys = torch.linspace(-1.0, 1.0, h, device=ref.device, dtype=lin).to(ref.dtype)
            xs = torch.linspace(-1.0, 1.0, w, device=ref.device, dtype=lin).to(ref.dtype)
            self.grids[key] = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0)
        return self.grids[key]

    @staticmethod
    def _demod(s: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(s.pow(2) @ w2.t() + 1e-8)

    @staticmethod
    def _conv1x1(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return F.conv2d(x, (w * s.view(1, -1, 1, 1)).to(x.dtype))
        return F.conv2d(x * _per_channel(s).to(x.dtype), w.to(x.dtype))

    def styles(self, latent: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Every layer's (style s, demodulation d or None) for the frames of `latent`, as one GEMM."""
        styles = torch.split(F.linear(latent, self.mod_weight, self.mod_bias), self.mod_sizes, dim=1)
        return [
            (st, None if w2 is None else self._demod(st, w2)) for st, w2 in zip(styles, self.w2, strict=True)
        ]

    def start(self, styles) -> tuple[torch.Tensor, None, None]:
        """The 4x4 stage: (features, flow logits, image) before the first level."""
        s, d = styles[0]
        x = _cl(self.const.expand(s.shape[0], -1, -1, -1).to(s.dtype))
        return self.conv1(x, s, d), None, None

    def level(self, i: int, state, styles, feat, feature_rgb: torch.Tensor | None = None):
        """Level i (resolution 8 * 2**i) of the generator on `state` = (features, logits, image). At the last level
        `feature_rgb` may replace `feat` by its RGB projection for these frames (`project_feature`)."""
        out, logits, rgb = state
        lv = self.levels[i]
        (s_up, d_up), (s_c, d_c), (s_flow, _), (s_rgb, _) = styles[1 + 4 * i : 5 + 4 * i]
        b = out.shape[0]
        out = lv["conv"](lv["up"](out, s_up, d_up), s_c, d_c)
        # Flow head: logits -> grid and mask; warp the identity feature.
        new_logits = self._conv1x1(out, lv["flow_w"], s_flow) + lv["flow_b"].to(out.dtype)
        logits = new_logits if logits is None else new_logits + lv["flow_up"](logits)
        _, _, h, w = out.shape
        # tanh and sigmoid of all three (channels-last) logits, then sliced: on the strided 2- and 1-channel slices
        # they run unvectorized (1.1 against 0.12 ms at 256 px).
        grid = self._grid(h, w, out) + torch.tanh(logits).permute(0, 2, 3, 1)[..., 0:2]
        mask = torch.sigmoid(logits)[:, 2:3]
        if i == len(self.levels) - 1:
            return None, logits, self._last_rgb(i, out, mask, grid, s_rgb, feat, rgb, feature_rgb)
        if isinstance(feat, EEMParts):
            feat = feat.sum()
        if feat.shape[0] != b:
            feat = feat.expand(b, -1, -1, -1)
        if h >= self.sparse_warp_min_size and out.device.type == "cpu":
            raw = warp_bilinear(_cl(feat.to(out.dtype)), grid, self.align_corners)
        else:
            raw = F.grid_sample(feat.to(out.dtype), grid, align_corners=self.align_corners)
        if i >= self.first_paint:  # ToRGB of the blend mask * warped + (1 - mask) * gen
            out = torch.lerp(out, raw, mask)
            rgb_new = self._rgb_out(lv, self._conv1x1(out, lv["rgb_w"], s_rgb))
        else:
            # ToRGB's 1x1 conv is a per-pixel linear map over channels: conv(raw * mask) = mask * conv(raw).
            rgb_new = self._rgb_out(lv, self._conv1x1(raw, lv["rgb_w"], s_rgb), mask)
            out = torch.lerp(out, raw, mask)  # mask * warped + (1 - mask) * gen
        rgb = rgb_new if rgb is None else rgb_new + lv["rgb_up"](rgb)
        return out, logits, rgb

    @staticmethod
    def _rgb_out(lv: dict, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ToRGB's output from its 1x1 conv's output y (times `mask`, if given): ours + bias (linear); the
        reference's FusedLeakyReLU(b1) -> + b2, run plainly after the conv."""
        bias = lv["rgb_b"].to(y.dtype)
        if lv["rgb_act"] is None:
            return y + bias if mask is None else torch.addcmul(bias, mask, y)
        if mask is not None:
            y = y * mask
        return fused_leaky_relu(y, lv["rgb_act"].to(y.dtype)) + bias

    def _rgb_weight(self, i: int, s_rgb: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """(B, 3, C) per-frame ToRGB weight of level i."""
        b = s_rgb.shape[0]
        return self.levels[i]["rgb_w"].view(1, 3, -1).to(dt) * s_rgb.to(dt).view(b, 1, -1)

    def project_feature(self, styles, feat, identity_rgb: torch.Tensor | None = None) -> torch.Tensor:
        """The last level's ToRGB projection of its feature for the frames of `styles` (this generator's
        `styles(latent)`), (B, 3, H, W): a tensor (one identity's, for all frames in one pass, or one per frame),
        or EEMParts x + a * y + c projected piece by piece without being summed; `identity_rgb`, if given, is the
        projection of x already."""
        i = len(self.levels) - 1
        return self._project_rgb(styles[4 + 4 * i][0], feat, identity_rgb)

    def _project_rgb(
        self, s_rgb: torch.Tensor, feat, identity_rgb: torch.Tensor | None = None
    ) -> torch.Tensor:
        i = len(self.levels) - 1
        b = s_rgb.shape[0]
        parts = feat if isinstance(feat, EEMParts) else None
        x = parts.x if parts is not None else feat
        dt = parts.y.dtype if parts is not None else x.dtype
        ws = self._rgb_weight(i, s_rgb, dt)
        proj = self._project(x.to(dt), ws) if identity_rgb is None else identity_rgb
        if parts is not None:
            proj = proj + self._project(parts.y, ws * parts.a.view(b, 1, -1))
            proj = proj + (ws @ parts.c.view(b, -1, 1)).view(b, 3, 1, 1)
        return proj

    def _last_rgb(self, i: int, out, mask, grid, s_rgb, feat, rgb, feature_rgb=None) -> torch.Tensor:
        """The finest level's image. Its warped feature feeds only ToRGB, whose 1x1 conv is a per-pixel linear map
        to 3 channels (the reference's activation comes after it), and the warp is linear per channel: so the
        feature is projected to RGB first and the 3-channel image is warped, conv(warp(f)) = warp(conv(f)); with
        the EEM, f = x + a * y + c projects without being summed.
        That removes the passes over the 256 px maps that warping 64 channels (and summing the EEM) would take."""
        lv = self.levels[i]
        h = out.shape[2]
        dt = out.dtype
        if feature_rgb is None:
            feature_rgb = self._project_rgb(s_rgb, feat)
        proj = feature_rgb.to(dt)
        if h >= self.sparse_warp_min_size and out.device.type == "cpu":
            raw_rgb = warp_bilinear(proj, grid, self.align_corners)
        else:
            raw_rgb = F.grid_sample(proj, grid, align_corners=self.align_corners)
        if i >= self.first_paint:
            # conv(lerp(gen, warped, mask)) = lerp(conv(gen), conv(warped), mask): also per-pixel linear.
            rgb_new = self._rgb_out(lv, torch.lerp(self._conv1x1(out, lv["rgb_w"], s_rgb), raw_rgb, mask))
        else:
            rgb_new = self._rgb_out(lv, raw_rgb, mask)
        return rgb_new if rgb is None else rgb_new + lv["rgb_up"](rgb)

    @staticmethod
    def _project(x: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        """Per-pixel x (1 or B, C, H, W) @ ws[f]^T (B, 3, C) -> (B, 3, H, W) channels-last, as GEMMs over the
        (pixels, channels) view: one GEMM for all frames when x is one identity's feature."""
        b = ws.shape[0]
        n, c, h, w = x.shape
        rows = _cl(x).permute(0, 2, 3, 1).reshape(n, h * w, c)
        if n == 1:
            out = (rows[0] @ ws.reshape(b * 3, c).t()).view(h * w, b, 3).permute(1, 0, 2)  # (B, HW, 3)
        else:
            out = torch.bmm(rows, ws.transpose(1, 2))
        return out.reshape(b, h, w, 3).permute(0, 3, 1, 2)

    def __call__(self, latent: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.levels):
            raise ValueError(
                f"fast generator: got {len(feats)} identity features, expected {len(self.levels)}"
            )
        styles = self.styles(latent)
        state = self.start(styles)
        for i, feat in enumerate(feats):
            state = self.level(i, state, styles, _cl(feat))
        return state[2].contiguous()


def _var_mean(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(frame, channel) biased variance and mean over H, W of a channels-last y, as E[y^2] - E[y]^2.

    Reductions that run along the contiguous channels: torch.linalg.vector_norm over H, W of channels-last memory
    is ~8x slower. The sums of squares are a vecdot of the (pixels, channels) view with itself, as in
    winograd_conv3x3's moments (no squared copy; at 64 channels x 256^2 px 1.35 ms against 2.3 ms for the diagonal
    of a Gram GEMM, 2 threads). The shifted two-pass form is not needed: the relative error is ~1e-7 * E[y^2] /
    var, and an instance norm's input (a convolution output) is not dominated by its mean; tests compare against
    F.instance_norm."""
    b, c, h, w = y.shape
    mean = y.mean(dim=(2, 3))
    if y.is_contiguous(memory_format=torch.channels_last):
        rows = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
        sq = torch.linalg.vecdot(rows, rows, dim=1) / (h * w)
    else:
        sq = y.square().mean(dim=(2, 3))
    return (sq - mean.square()).clamp_(min=0.0), mean


class _FastEEMBlock:
    def __init__(self, block, use_winograd: bool, use_mkldnn: bool) -> None:
        w1 = block.conv1.weight.detach() * block.conv1.scale
        self.winograd1 = winograd_weight(w1) if use_winograd else None
        self.conv1 = None if use_winograd else _Conv(w1, padding=1, use_mkldnn=use_mkldnn)
        w2 = block.conv2.weight.detach() * block.conv2.scale
        # conv2's bias is dropped: the instance norm right after it subtracts every per-channel constant.
        self.winograd = winograd_weight(w2) if use_winograd else None
        self.conv2 = None if use_winograd else _Conv(w2, padding=1, use_mkldnn=use_mkldnn)
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.use_mkldnn = use_mkldnn and _mkldnn_ok()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """instance_norm(conv1(f^id)) (conv1's bias dropped: the norm removes it), channels-last."""
        y, var, mean = self._conv_norm_stats(_cl(x), self.winograd1, self.conv1)
        a = torch.rsqrt(var + 1e-5)  # instance_norm's eps
        return torch.addcmul(_per_channel(-mean * a), y, _per_channel(a))

    def _adain_lrelu(self, prepared: torch.Tensor, g1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        """leaky_relu(prepared * g1 + b1): for one frame a oneDNN depthwise 1x1 conv with bias and activation
        fused (one pass over the map instead of two: ~4 ms per frame at 256 px, where the maps are 16 MB)."""
        dt = prepared.dtype
        c = prepared.shape[1]
        if (
            prepared.shape[0] == 1
            and g1.shape[0] == 1
            and self.use_mkldnn
            and dt == torch.float32
            and prepared.device.type == "cpu"
        ):
            kernel = g1.to(dt).view(c, 1, 1, 1).contiguous()
            return _onednn_conv(prepared, kernel, b1[0].to(dt).contiguous(), 0, groups=c, lrelu=True)
        h = torch.addcmul(_per_channel(b1).to(dt), prepared, _per_channel(g1).to(dt))
        return F.leaky_relu(h, LRELU_SLOPE, inplace=True)

    def _conv_norm_stats(
        self,
        x: torch.Tensor,
        winograd: torch.Tensor | None,
        conv: _Conv | None,
        adain: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y = conv(x), biased variance, mean of y per frame and channel), with x first passed through
        leaky_relu(x * g + b) if `adain` = (g, b) is given. The Winograd conv applies the AdaIN as its tiles are
        laid out and sums the moments chunk by chunk in cache; the direct conv takes a pass over y afterwards."""
        if winograd is not None and x.shape[2] % 4 == 0 and x.shape[3] % 4 == 0:
            g, b = adain if adain is not None else (None, None)
            y, mean, sq = winograd_conv3x3(x, winograd, g, shift=b, in_lrelu=adain is not None, moments=True)
            return y, (sq - mean.square()).clamp_(min=0.0), mean
        if adain is not None:
            x = self._adain_lrelu(x, *adain)
        y = winograd_conv3x3(x, winograd) if winograd is not None else conv(x, None, False)
        return (y, *_var_mean(y))

    @staticmethod
    def _affine(norm, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = norm.shared(cond)
        return 1.0 + norm.gamma(h), norm.beta(h)

    def parts(self, x: torch.Tensor, cond: torch.Tensor, prepared: torch.Tensor) -> EEMParts:
        """The block's output x + a * y + c, not yet summed (a, c per frame and channel)."""
        g1, b1 = self._affine(self.norm1, cond)
        x, prepared = _cl(x), _cl(prepared)
        y, var, mean = self._conv_norm_stats(prepared, self.winograd, self.conv2, adain=(g1, b1))
        g2, b2 = self._affine(self.norm2, cond)
        a = g2.to(y.dtype) * torch.rsqrt(var + 1e-5)  # instance_norm's eps
        c = b2.to(y.dtype) - mean * a
        return EEMParts(x, y, a, c)

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return self.parts(x, cond, prepared).sum()


class _FastReferenceEEMBlock:
    """The EEM block as the reference releases it (eem.variant="reference"): out = x + AdaIN2(conv2(x), e). Its
    convolution and instance norm see the identity feature only, so they run plainly once per identity
    (`prepare`); per frame only the AdaIN's affine (1 + gamma, beta) remains, EEMParts(x, prepared, 1 + gamma,
    beta)."""

    def __init__(self, block: ReferenceEEMBlock) -> None:
        self.block = block

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return _cl(self.block.prepare(x))

    def parts(self, x: torch.Tensor, cond: torch.Tensor, prepared: torch.Tensor) -> EEMParts:
        norm = self.block.norm2
        h = norm.mlp_shared(cond)
        dt = prepared.dtype
        return EEMParts(_cl(x), prepared, 1.0 + norm.mlp_gamma(h).to(dt), norm.mlp_beta(h).to(dt))

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return self.parts(x, cond, prepared).sum()


class EEMParts(NamedTuple):
    """An EEM block's output f^id + a * y + c as its pieces: x (1 or B, C, H, W), y (B, C, H, W), a and c (B, C).
    The generator's last level only projects it to 3 channels, so it never needs the sum itself."""

    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor
    c: torch.Tensor

    def sum(self) -> torch.Tensor:
        return torch.addcmul(self.x, self.y, _per_channel(self.a)).add_(_per_channel(self.c))


class _FastEncoder:
    """Encoder E (edtalk/encoder.py) for inference: channels-last, equalized-lr scales and leaky-ReLU gains folded
    into the weights, bias + leaky ReLU fused into prepacked oneDNN convs, Winograd for the wide 3x3 convs
    (FastRenderer's thresholds). Per residual block: the skip's blur runs only where its stride-2 1x1 conv
    samples (a stride-2 depthwise conv, a quarter of the work), and the block's 1/sqrt(2) cancels the conv
    branch's sqrt(2) gain (leaky ReLU is positively homogeneous) and is folded into the skip's weight."""

    def __init__(self, enc, winograd_min_channels: int, winograd_sizes: tuple[int, int], use_mkldnn: bool):
        stem_conv, stem_act = enc.stem[0], enc.stem[1]
        self.stem = _Conv(stem_conv.weight.detach() * stem_conv.scale * LRELU_GAIN, 0, use_mkldnn=use_mkldnn)
        self.stem_bias = stem_act.bias.detach() * LRELU_GAIN
        self.blocks = []
        size = enc.image_size
        for block in enc.blocks:
            c1, a1 = block.conv1[0], block.conv1[1]
            blur, c2, a2 = block.conv2[0], block.conv2[1], block.conv2[2]
            sblur, sk = block.skip[0], block.skip[1]
            if blur.pad != (2, 2) or sblur.pad != (1, 1) or tuple(blur.kernel.shape) != (4, 4):
                raise ValueError("fast encoder: only the 4-tap blur of the default blur kernel is supported")
            ch = c1.weight.shape[1]
            w1 = c1.weight.detach() * c1.scale * LRELU_GAIN
            wino = ch >= winograd_min_channels and winograd_sizes[0] <= size <= winograd_sizes[1]
            k = torch.flip(blur.kernel, [0, 1]).view(1, 1, 4, 4).expand(ch, 1, 4, 4).contiguous()
            self.blocks.append(
                {
                    "conv1": None if wino else _Conv(w1, 1, use_mkldnn=use_mkldnn),
                    "wino1": winograd_weight(w1) if wino else None,
                    "bias1": a1.bias.detach() * LRELU_GAIN,
                    "blur": _Conv(k, 2, groups=ch, use_mkldnn=use_mkldnn),
                    "conv2": _Conv(c2.weight.detach() * c2.scale, 0, use_mkldnn=use_mkldnn, stride=2),
                    "bias2": a2.bias.detach(),
                    "skip_blur": _Conv(k, 1, groups=ch, use_mkldnn=use_mkldnn, stride=2),
                    "skip": _Conv(sk.weight.detach() * sk.scale / math.sqrt(2.0), 0, use_mkldnn=use_mkldnn),
                }
            )
            size //= 2
        tl = enc.to_latent
        self.to_latent = (
            (tl.weight.detach() * tl.scale).permute(0, 2, 3, 1).flatten(1).contiguous()
        )  # (D, 4*4*C)

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Same contract as Encoder.forward; the features come back channels-last."""
        dt = img.dtype
        h = self.stem(_cl(img), self.stem_bias.to(dt), lrelu=True)
        feats = [h]
        for blk in self.blocks:
            if blk["wino1"] is not None:
                y = winograd_conv3x3(h, blk["wino1"], bias=blk["bias1"], lrelu=True)
            else:
                y = blk["conv1"](h, blk["bias1"].to(dt), lrelu=True)
            out = blk["conv2"](blk["blur"](y, None, lrelu=False), blk["bias2"].to(dt), lrelu=True)
            out = out.add_(blk["skip"](blk["skip_blur"](h, None, lrelu=False), None, lrelu=False))
            h = out
            feats.append(h)
        # to_latent: a 4x4 conv over the 4x4 map (no padding) is one GEMM over the flattened map.
        latent = _cl(h).permute(0, 2, 3, 1).reshape(h.shape[0], -1) @ self.to_latent.to(dt).t()
        return latent, feats[-2::-1]


class FastRenderer:
    """`renderer.render(identity, weights)` == `model.render(identity, weights)` (within float rounding), faster;
    likewise `encode_identity(img)` and `extract(frames, spaces)`.

    Inference only: runs under torch.inference_mode. The weights are snapshotted at construction; a call after the
    model's encoder/generator/EEM parameters changed rebuilds the snapshot first.
    winograd_min_channels / winograd_sizes: which 3x3 convs take the Winograd path (input channels >= the first,
    resolution within the range); the defaults are where it beats oneDNN's direct conv on this kind of CPU
    (bench/model.py); `winograd=False` turns it off. polyphase_min_size: upsampling convs with an input at least
    this large run as one stride-1 conv of the four phase kernels (off by default: slower in the full render).
    batch_max_size: levels up to this resolution run all frames of a call as one batch, finer ones frame by frame
    (on CPU). sparse_warp_min_size: from this resolution the warp is a sparse product instead of grid_sample (CPU).
    retain_memory: call `retain_freed_memory()` (process-wide; see there). frame_groups: on CPU, how many groups
    of a call's frames run concurrently, each in its own thread with torch.get_num_threads() // frame_groups
    threads (None: one group per torch thread, at most one per frame; 1: all frames in the calling thread); the
    n % frame_groups frames left over run after them on all threads.
    """

    def __init__(
        self,
        model,
        winograd: bool = True,
        winograd_min_channels: int = 128,
        winograd_sizes: tuple[int, int] = (16, 128),
        use_mkldnn: bool = True,
        polyphase_min_size: int = 1 << 30,
        batch_max_size: int = 32,
        sparse_warp_min_size: int = 32,
        retain_memory: bool = True,
        frame_groups: int | None = None,
    ) -> None:
        self.model = model
        self._pool: tuple[int, ThreadPoolExecutor, int] | None = None
        if retain_memory:
            retain_freed_memory()
        self.options = {
            "batch_max_size": batch_max_size,
            "sparse_warp_min_size": sparse_warp_min_size,
            "winograd_min_channels": winograd_min_channels if winograd else 1 << 30,
            "winograd_sizes": tuple(winograd_sizes),
            "use_mkldnn": use_mkldnn,
            "polyphase_min_size": polyphase_min_size,
            "frame_groups": frame_groups,
        }
        self._build()

    def _current(self) -> None:
        """Rebuild the snapshot if the model's weights changed since it was taken."""
        if self._versions() != self.versions:
            self._build()

    def _versions(self) -> tuple[int, ...]:
        mods = [self.model.encoder, self.model.generator] + (
            [self.model.eem] if self.model.eem is not None else []
        )
        return tuple(p._version for m in mods for p in m.parameters()) + tuple(
            id(p) for m in mods for p in m.parameters()
        )

    def _build(self) -> None:
        with torch.inference_mode():
            o = self.options
            self.generator = _FastGenerator(
                self.model.generator,
                o["winograd_min_channels"],
                o["winograd_sizes"],
                o["use_mkldnn"],
                o["polyphase_min_size"],
                o["sparse_warp_min_size"],
            )
            self.encoder = _FastEncoder(
                self.model.encoder, o["winograd_min_channels"], o["winograd_sizes"], o["use_mkldnn"]
            )
            self.eem = None
            if self.model.eem is not None:
                size = 8
                blocks = []
                for block in self.model.eem.blocks:
                    ch = block.conv2.weight.shape[1]
                    wino = (
                        ch >= o["winograd_min_channels"]
                        and o["winograd_sizes"][0] <= size <= o["winograd_sizes"][1]
                    )
                    if isinstance(block, ReferenceEEMBlock):
                        blocks.append(_FastReferenceEEMBlock(block))
                    else:
                        blocks.append(_FastEEMBlock(block, wino, o["use_mkldnn"]))
                    size *= 2
                self.eem = blocks
        self.versions = self._versions()
        self.build_id = object()

    def _identity_parts(self, identity, dtype: torch.dtype) -> dict[str, Any]:
        """Per identity and snapshot, cached on the Identity: its features in channels-last memory and the EEM's
        identity-only halves."""
        cache: dict[str, Any] = identity.cache
        parts = cache.get("fast_parts")
        if parts is None or parts["key"] is not self.build_id or parts["dtype"] != dtype:
            feats = [_cl(f.to(dtype)) for f in identity.features]
            prepared = None
            if self.eem is not None:
                prepared = [blk.prepare(f) for blk, f in zip(self.eem, feats, strict=True)]
            parts = {"key": self.build_id, "dtype": dtype, "feats": feats, "prepared": prepared, "last": None}
            cache["fast_parts"] = parts
        return parts

    def encode_identity(self, img: torch.Tensor):
        """Same contract as EDTalk.encode_identity (the features come back channels-last)."""
        self.model._check_images(img, "identity image")
        with torch.inference_mode():
            self._current()
            return self.model.identity_from(*self.encoder(img))

    def extract(self, frames: torch.Tensor, spaces: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Same contract as EDTalk.extract: driving frames (B,3,S,S) -> {space: W^s}."""
        spaces = self.model.navigation.spaces if spaces is None else tuple(spaces)
        self.model.check_extract(frames, spaces)
        with torch.inference_mode():
            self._current()
            if frames.device.type != "cpu":
                latent, _ = self.encoder(frames)
            else:
                # On CPU the frames run in concurrent groups (`frame_groups`), each group frame by frame: one
                # frame's activations stay in cache.
                def latents(rows: slice) -> torch.Tensor:
                    return torch.cat(
                        [self.encoder(frames[j : j + 1])[0] for j in range(rows.start, rows.stop)]
                    )

                latent = self._in_groups(latents, frames.shape[0], True)
            return self.model.navigation.weights(latent, spaces)

    def prepare_identity(self, identity) -> None:
        """Do the identity-only work now (channels-last features, the EEM's identity-only halves) instead of in
        the first render call; it is cached on the Identity for every later call."""
        with torch.inference_mode():
            self._current()
            self._identity_parts(identity, identity.latent.dtype)

    def render(self, identity, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Same contract as EDTalk.render."""
        with torch.inference_mode():
            self._current()
            latent, motion = self.model.driving_latent(identity, weights)
            n = latent.shape[0]
            parts = self._identity_parts(identity, latent.dtype)
            feats, prepared = parts["feats"], parts["prepared"]
            f_e = motion.get("expression") if self.eem is not None else None
            constant = None
            if f_e is not None and identity.batch_size == 1 and bool((f_e == f_e[:1]).all()):
                # One expression for the whole call (a clip-level emotion): the EEM runs once, then is reused.
                last = parts["last"]
                if last is None or not torch.equal(last[0], f_e[:1]):
                    out = [blk(f, f_e[:1], p) for blk, f, p in zip(self.eem, feats, prepared, strict=True)]
                    parts["last"] = last = (f_e[:1].clone(), out)
                constant = last[1]

            def feature(i: int, rows: slice) -> torch.Tensor:
                f = feats[i] if feats[i].shape[0] == 1 else feats[i][rows]
                if f_e is None:
                    return f
                if constant is not None:
                    return constant[i]
                p = prepared[i] if prepared[i].shape[0] == 1 else prepared[i][rows]
                if i == len(feats) - 1:  # the last level projects the pieces to RGB without summing them
                    return self.eem[i].parts(f, f_e[rows], p)
                return self.eem[i](f, f_e[rows], p)

            gen = self.generator
            styles = gen.styles(latent)
            levels = len(gen.levels)
            cpu = latent.device.type == "cpu"
            # The last level's identity part (the feature, or the clip's constant EEM output) is projected to RGB
            # for a group's frames in one pass; each frame then projects only its own EEM piece, right after
            # computing it (while its 256 px map is still in cache).
            last_feat = constant[-1] if constant is not None else feats[-1]

            # Coarse levels batch a group's frames (their weights are read once for all); from the first level
            # above batch_max_size each frame runs alone, its activations staying in cache (CPU).
            big = [i for i, lv in enumerate(gen.levels) if lv["size"] > self.options["batch_max_size"]]
            first_alone = big[0] if big and cpu else levels

            def frames(rows: slice) -> torch.Tensor:
                sty = [(sv[rows], None if d is None else d[rows]) for sv, d in styles]
                state = gen.start(sty)
                split = first_alone if rows.stop - rows.start > 1 else levels
                for i in range(split):
                    state = gen.level(i, state, sty, feature(i, rows))
                if split == levels:
                    return state[2]
                identity_rgb = gen.project_feature(sty, last_feat) if last_feat.shape[0] == 1 else None
                outs = []
                for j in range(rows.stop - rows.start):
                    one = slice(j, j + 1)
                    st = tuple(None if t is None else t[one] for t in state)
                    sty1 = [(sv[one], None if d is None else d[one]) for sv, d in sty]
                    at = slice(rows.start + j, rows.start + j + 1)
                    for i in range(split, levels - 1):
                        st = gen.level(i, st, sty1, feature(i, at))
                    id_rgb = identity_rgb[one] if identity_rgb is not None else None
                    st = gen.level(
                        levels - 1, st, sty1, None, gen.project_feature(sty1, feature(levels - 1, at), id_rgb)
                    )
                    outs.append(st[2])
                return torch.cat(outs) if len(outs) > 1 else outs[0]

            return self._in_groups(frames, n, cpu).contiguous()

    def _executor(self, groups: int) -> ThreadPoolExecutor:
        """The renderer's thread pool for `groups` groups, kept across calls (self._pool = (groups, pool, pid))."""
        if self._pool is None or self._pool[0] != groups or self._pool[2] != os.getpid():
            if self._pool is not None and self._pool[2] == os.getpid():
                self._pool[1].shutdown()
            # (a forked child inherits the pool object but not its threads: it makes its own)
            self._pool = (groups, ThreadPoolExecutor(groups, thread_name_prefix="edtalk-render"), os.getpid())
        return self._pool[1]

    def _in_groups(self, fn, n: int, cpu: bool) -> torch.Tensor:
        """torch.cat of fn(rows) over contiguous rows of the n frames: on CPU `groups` equal groups run
        concurrently, each in a thread of its own with its share of torch's threads (see `frame_groups`); the
        frames left over (n % groups) run afterwards in the calling thread on all of them, so no group waits on a
        longer one (3 frames in 2 groups of 2 and 1 would take two frames' time at half the threads)."""
        groups = self.options["frame_groups"]
        threads = torch.get_num_threads()
        groups = min(n, threads if groups is None else groups) if cpu else 1
        if groups <= 1:
            return fn(slice(0, n))
        per, size = max(1, threads // groups), n // groups

        def run(k: int) -> torch.Tensor:
            torch.set_num_threads(per)  # this thread's OpenMP team only; the caller's stays as it is
            with torch.inference_mode():
                return fn(slice(k * size, (k + 1) * size))

        try:
            outs = list(self._executor(groups).map(run, range(groups)))
        finally:
            # torch.set_num_threads also stores the count that threads started later take (and pthreadpool's):
            # set it back to the caller's, or every new thread of the process would get one thread.
            torch.set_num_threads(threads)
        if groups * size < n:
            outs.append(fn(slice(groups * size, n)))
        return torch.cat(outs)


def prepared_conv_available() -> bool:
    """Whether the oneDNN prepacked convolution is used on this machine (else plain F.conv2d)."""
    return _mkldnn_ok()


__all__ = [
    "EEMParts",
    "FastRenderer",
    "prepared_conv_available",
    "retain_freed_memory",
    "warp_bilinear",
    "winograd_conv3x3",
    "winograd_weight",
]
