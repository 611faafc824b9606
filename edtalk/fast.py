"""Inference-only fast rendering path (CPU first): the same function as `EDTalk.render`, computed with fewer passes.

`FastRenderer(model)` (or `model.fast_renderer()`) snapshots the generator and EEM weights into inference form:
- equalized-lr scales folded into the stored weights; the sqrt(2) leaky-ReLU gain folded into each layer's
  weight and bias (leaky ReLU is positively homogeneous); the demodulation norms sum(w^2) precomputed;
  all modulation linears of G evaluated as one GEMM per call;
- modulated 3x3 convolutions as x * s -> conv (bias b/d, leaky ReLU fused as a oneDNN post-op on a weight
  prepacked once) -> * d. This equals lrelu(conv(x * s) * d + b) because d > 0;
- the 3x3 convolutions with many channels at 16..64 px as Winograd F(4x4, 3x3) (Lavin & Gray 2015): 36 batched
  GEMMs instead of 9 taps per output, 4x fewer multiplies, the transforms themselves as GEMMs;
- the transposed-conv upsampling's FIR blur with the demodulation folded into its (per-channel) kernel, bias and
  leaky ReLU fused; no zero-insertion or pad copies (padding is the convolution's own);
- the flow head's blend as one lerp, and the mask applied after the (linear, per-pixel) ToRGB instead of before;
- the EEM's conv2 bias dropped (the instance norm that follows removes it) and instance norm + AdaIN + residual
  as one per-channel affine.

The training forward (edtalk/ops.py ...) is untouched; this path is for `torch.inference_mode` / `no_grad` only
and rebuilds itself when the model's weights change. tests/test_model_fast.py checks it against `EDTalk.render`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from edtalk.ops import LRELU_GAIN, LRELU_SLOPE

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
    """3x3 weight (O, I, 3, 3) -> its Winograd-domain form U = G w G^T as (36, O, I), computed in float64."""
    if weight.shape[2:] != (3, 3):
        raise ValueError(f"winograd_weight: needs a 3x3 kernel, got {tuple(weight.shape)}")
    g = torch.tensor(_WINO_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->aboi", g, weight.double(), g)
    return u.reshape(36, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x * scale, w, padding=1) for a 3x3 weight w given as U = winograd_weight(w) (36, O, I).

    x (B, I, H, W); `scale` (B, I) multiplies the input channels on the way into the (zero-padded) tile buffer,
    so the modulation costs no extra pass. Frames of a batch run one after the other (the GEMMs are per frame).
    """
    b, c, h, w = x.shape
    o = u.shape[1]
    if u.shape != (36, o, c):
        raise ValueError(f"winograd_conv3x3: U {tuple(u.shape)} does not fit input channels {c}")
    bb, aa = _wino_transforms(x.dtype, x.device)
    th, tw = -(-h // 4), -(-w // 4)
    hp, wp = 4 * th + 2, 4 * tw + 2
    outs = []
    for i in range(b):
        xp = x.new_zeros(c, hp, wp)
        inner = xp[:, 1 : h + 1, 1 : w + 1]
        if scale is None:
            inner.copy_(x[i])
        else:
            torch.mul(x[i], scale[i].view(c, 1, 1), out=inner)
        # Overlapping 6x6 tiles (stride 4) as a view; one gather copy lays them out as (36, I * tiles).
        tiles = xp.as_strided((6, 6, c, th, tw), (wp, 1, hp * wp, 4 * wp, 4)).reshape(36, c * th * tw)
        v = torch.mm(bb, tiles).view(36, c, th * tw)
        m = torch.bmm(u, v)  # (36, O, tiles): the 4x fewer multiplies
        y = torch.mm(aa, m.view(36, -1)).view(4, 4, o, th, tw)
        out = y.permute(2, 3, 0, 4, 1).reshape(o, 4 * th, 4 * tw)
        outs.append(out[:, :h, :w])
    return torch.stack(outs) if b > 1 else outs[0].unsqueeze(0)


class _Conv:
    """A constant-weight convolution with bias and optional leaky ReLU fused, on a oneDNN weight prepacked per
    input shape (the layout the kernel wants, reordered once instead of every call); plain F.conv2d fallback."""

    def __init__(self, weight: torch.Tensor, padding: int, groups: int = 1, use_mkldnn: bool = True) -> None:
        self.weight = weight.contiguous()
        self.padding = padding
        self.groups = groups
        self.use_mkldnn = use_mkldnn and self.weight.device.type == "cpu" and _mkldnn_ok()
        self.packed: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, lrelu: bool) -> torch.Tensor:
        # oneDNN may hand back channels-last outputs (its transposed convs do): both layouts run prepacked.
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if self.use_mkldnn and x.dtype == torch.float32 and (cl or x.is_contiguous()):
            key = (*x.shape, cl)
            packed = self.packed.get(key)
            if packed is None:
                p = [self.padding] * 2
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.weight.to_mkldnn(), p, [1, 1], [1, 1], self.groups, list(x.shape)
                )
                self.packed[key] = packed
            p = [self.padding] * 2
            attr, scalars = ("leaky_relu", [LRELU_SLOPE]) if lrelu else ("none", [])
            return torch.ops.mkldnn._convolution_pointwise(
                x, packed, bias, p, [1, 1], [1, 1], self.groups, attr, scalars, ""
            )
        out = F.conv2d(x, self.weight.to(x.dtype), bias, padding=self.padding, groups=self.groups)
        return F.leaky_relu(out, LRELU_SLOPE) if lrelu else out


_MKLDNN_OK: bool | None = None


def _mkldnn_ok() -> bool:
    """Whether the oneDNN prepacked-conv ops of this torch build run and agree with F.conv2d."""
    global _MKLDNN_OK
    if _MKLDNN_OK is None:
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, 5, 5, generator=g)
            w = torch.randn(3, 4, 3, 3, generator=g)
            b = torch.randn(3, generator=g)
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape)
            )
            y = torch.ops.mkldnn._convolution_pointwise(
                x, packed, b, [1, 1], [1, 1], [1, 1], 1, "leaky_relu", [LRELU_SLOPE], ""
            )
            ref = F.leaky_relu(F.conv2d(x, w, b, padding=1), LRELU_SLOPE)
            _MKLDNN_OK = bool(torch.allclose(y, ref, atol=1e-5))
        except (RuntimeError, AttributeError, NotImplementedError):
            _MKLDNN_OK = False
    return _MKLDNN_OK


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
            out = winograd_conv3x3(x, self.winograd, s)
            out.mul_(_per_channel(d)).add_(_per_channel(self.bias.expand_as(d)))
            return F.leaky_relu(out, LRELU_SLOPE, inplace=True)
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
        xs = x * _per_channel(s)
        if x.shape[2] >= self.polyphase_min_size and x.dtype == torch.float32:
            y = self._polyphase(xs)  # 2H + 2: the blur below then yields 2H + 1 rows, the last one dropped
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
                p = [self.pad] * 2
                return torch.ops.mkldnn._convolution_pointwise(
                    y, kernel, bias, p, [1, 1], [1, 1], self.out_ch, "leaky_relu", [LRELU_SLOPE], ""
                )
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


class _FastGenerator:
    def __init__(
        self,
        gen,
        winograd_min_channels: int,
        winograd_sizes: tuple[int, int],
        use_mkldnn: bool,
        polyphase_min_size: int,
    ):
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
            return _ModConv3x3(styled, wino, use_mkldnn)

        self.conv1 = conv3(gen.conv1, size)
        self.levels = []
        for up_conv, conv, flow, to_rgb in zip(gen.up_convs, gen.convs, gen.flows, gen.to_rgbs, strict=True):
            size *= 2
            mods.append(_modulation(up_conv.conv))
            up = _ModUpConv(up_conv, polyphase_min_size, use_mkldnn)
            c = conv3(conv, size)
            mods.append(_modulation(flow.conv))
            fw = flow.conv.weight.detach() * flow.conv.scale  # (3, C, 1, 1), no demodulation
            mods.append(_modulation(to_rgb.conv))
            rw = to_rgb.conv.weight.detach() * to_rgb.conv.scale
            self.levels.append(
                {
                    "up": up,
                    "conv": c,
                    "flow_w": fw,
                    "flow_b": flow.bias.detach().view(1, 3, 1, 1),
                    "flow_up": _Upsample3(flow.upsample, 3),
                    "rgb_w": rw,
                    "rgb_b": to_rgb.bias.detach().view(1, 3, 1, 1),
                    "rgb_up": _Upsample3(to_rgb.upsample, 3),
                }
            )
        self.mod_weight = torch.cat([w for w, _ in mods]).contiguous()
        self.mod_bias = torch.cat([b for _, b in mods])
        self.mod_sizes = [w.shape[0] for w, _ in mods]
        self.grids: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    def _grid(self, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
        key = (h, w, ref.dtype, ref.device)
        if key not in self.grids:
            ys = torch.linspace(-1.0, 1.0, h, device=ref.device, dtype=ref.dtype)
            xs = torch.linspace(-1.0, 1.0, w, device=ref.device, dtype=ref.dtype)
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

    def __call__(self, latent: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.levels):
            raise ValueError(
                f"fast generator: got {len(feats)} identity features, expected {len(self.levels)}"
            )
        b = latent.shape[0]
        styles = iter(torch.split(F.linear(latent, self.mod_weight, self.mod_bias), self.mod_sizes, dim=1))
        s = next(styles)
        out = self.conv1(self.const.expand(b, -1, -1, -1).to(latent.dtype), s, self._demod(s, self.conv1.w2))
        rgb = logits = None
        last = len(self.levels) - 1
        for i, (lv, feat) in enumerate(zip(self.levels, feats, strict=True)):
            s = next(styles)
            out = lv["up"](out, s, self._demod(s, lv["up"].w2))
            s = next(styles)
            out = lv["conv"](out, s, self._demod(s, lv["conv"].w2))
            # Flow head: logits -> grid and mask; warp the identity feature.
            s_flow, s_rgb = next(styles), next(styles)
            new_logits = self._conv1x1(out, lv["flow_w"], s_flow) + lv["flow_b"].to(out.dtype)
            logits = new_logits if logits is None else new_logits + lv["flow_up"](logits)
            _, _, h, w = out.shape
            grid = self._grid(h, w, out) + torch.tanh(logits[:, 0:2]).permute(0, 2, 3, 1)
            mask = torch.sigmoid(logits[:, 2:3])
            if feat.shape[0] != b:
                feat = feat.expand(b, -1, -1, -1)
            raw = F.grid_sample(feat.to(out.dtype), grid, align_corners=True)
            if i >= self.first_paint:  # ToRGB of the blend mask * warped + (1 - mask) * gen
                out = torch.lerp(out, raw, mask)
                rgb_new = self._conv1x1(out, lv["rgb_w"], s_rgb) + lv["rgb_b"].to(out.dtype)
            else:
                # ToRGB is a per-pixel linear map over channels: ToRGB(raw * mask) = mask * ToRGB(raw).
                rgb_new = torch.addcmul(
                    lv["rgb_b"].to(out.dtype), mask, self._conv1x1(raw, lv["rgb_w"], s_rgb)
                )
                if i < last:
                    out = torch.lerp(out, raw, mask)  # mask * warped + (1 - mask) * gen
            rgb = rgb_new if rgb is None else rgb_new + lv["rgb_up"](rgb)
        return rgb


def _var_mean(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(frame, channel) biased variance and mean over H, W, two-pass (mean, then the norm of y - mean):
    several times faster than torch.var_mean over dims (2, 3) on CPU, and as accurate."""
    b, c, h, w = y.shape
    flat = y.reshape(b * c, h * w)
    mean = flat.mean(dim=1)
    sq = torch.linalg.vector_norm(flat - mean[:, None], dim=1).square_()
    return (sq / (h * w)).view(b, c), mean.view(b, c)


class _FastEEMBlock:
    def __init__(self, block, use_winograd: bool, use_mkldnn: bool) -> None:
        w1 = block.conv1.weight.detach() * block.conv1.scale
        self.conv1 = _Conv(w1, padding=1, use_mkldnn=use_mkldnn)
        self.bias1 = block.conv1.bias.detach()
        w2 = block.conv2.weight.detach() * block.conv2.scale
        # conv2's bias is dropped: the instance norm right after it subtracts every per-channel constant.
        self.winograd = winograd_weight(w2) if use_winograd else None
        self.conv2 = None if use_winograd else _Conv(w2, padding=1, use_mkldnn=use_mkldnn)
        self.norm1, self.norm2 = block.norm1, block.norm2

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(self.conv1(x.contiguous(), self.bias1.to(x.dtype), lrelu=False))

    @staticmethod
    def _affine(norm, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = norm.shared(cond)
        return 1.0 + norm.gamma(h), norm.beta(h)

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        g1, b1 = self._affine(self.norm1, cond)
        h = torch.addcmul(_per_channel(b1).to(x.dtype), prepared, _per_channel(g1).to(x.dtype))
        F.leaky_relu(h, LRELU_SLOPE, inplace=True)
        y = winograd_conv3x3(h, self.winograd) if self.winograd is not None else self.conv2(h, None, False)
        var, mean = _var_mean(y)
        g2, b2 = self._affine(self.norm2, cond)
        a = g2.to(y.dtype) * torch.rsqrt(var + 1e-5)  # instance_norm's eps
        c = b2.to(y.dtype) - mean * a
        return torch.addcmul(x, y, _per_channel(a)).add_(_per_channel(c))


class FastRenderer:
    """`renderer.render(identity, weights)` == `model.render(identity, weights)` (within float rounding), faster.

    Inference only: runs under torch.inference_mode. The weights are snapshotted at construction; a render call
    after the model's generator/EEM parameters changed rebuilds the snapshot first.
    winograd_min_channels / winograd_sizes: which 3x3 convs take the Winograd path (input channels >= the first,
    resolution within the range); the defaults are where it beats oneDNN's direct conv on this kind of CPU
    (bench/model.py); `winograd=False` turns it off. polyphase_min_size: upsampling convs with an input at least
    this large run as one stride-1 conv of the four phase kernels (off by default: faster alone in a
    microbenchmark at 64/128 px, 12 against 22 ms, but slower in the full render, 316 against 280 ms per frame).
    """

    def __init__(
        self,
        model,
        winograd: bool = True,
        winograd_min_channels: int = 256,
        winograd_sizes: tuple[int, int] = (16, 64),
        use_mkldnn: bool = True,
        polyphase_min_size: int = 1 << 30,
    ) -> None:
        self.model = model
        self.options = {
            "winograd_min_channels": winograd_min_channels if winograd else 1 << 30,
            "winograd_sizes": tuple(winograd_sizes),
            "use_mkldnn": use_mkldnn,
            "polyphase_min_size": polyphase_min_size,
        }
        self._build()

    def _versions(self) -> tuple[int, ...]:
        mods = [self.model.generator] + ([self.model.eem] if self.model.eem is not None else [])
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
                    blocks.append(_FastEEMBlock(block, wino, o["use_mkldnn"]))
                    size *= 2
                self.eem = blocks
        self.versions = self._versions()
        self.build_id = object()

    def _eem(self, identity, f_e: torch.Tensor) -> list[torch.Tensor]:
        feats = identity.features
        cache: dict[str, Any] = identity.cache
        if cache.get("fast_key") is not self.build_id or cache.get("fast_dtype") != f_e.dtype:
            for k in ("fast_prepared", "fast_last"):
                cache.pop(k, None)
            cache["fast_key"], cache["fast_dtype"] = self.build_id, f_e.dtype
            if identity.batch_size == 1:
                cache["fast_prepared"] = [blk.prepare(f) for blk, f in zip(self.eem, feats, strict=True)]
        prepared = cache.get("fast_prepared")
        if prepared is None:  # a batch of identities: nothing to reuse across frames
            prepared = [blk.prepare(f) for blk, f in zip(self.eem, feats, strict=True)]
        n = f_e.shape[0]
        constant = identity.batch_size == 1 and bool((f_e == f_e[:1]).all())
        if constant:
            last = cache.get("fast_last")
            if last is None or not torch.equal(last[0], f_e[:1]):
                out = [blk(f, f_e[:1], p) for blk, f, p in zip(self.eem, feats, prepared, strict=True)]
                last = (f_e[:1].clone(), out)
                cache["fast_last"] = last
            return [f.expand(n, -1, -1, -1) for f in last[1]]
        return [blk(f, f_e, p) for blk, f, p in zip(self.eem, feats, prepared, strict=True)]

    def render(self, identity, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Same contract as EDTalk.render."""
        with torch.inference_mode():
            if self._versions() != self.versions:
                self._build()
            latent, motion = self.model.driving_latent(identity, weights)
            n = latent.shape[0]
            feats = identity.features
            if self.eem is not None and "expression" in motion:
                feats = self._eem(identity, motion["expression"])
            if n > 1 and latent.device.type == "cpu":
                # Per-frame calls: at 256 px one frame's activations stay in cache (bench/model.py).
                return torch.cat([self.generator(latent[i : i + 1], _frame(feats, i)) for i in range(n)])
            return self.generator(latent, feats)


def _frame(feats: Sequence[torch.Tensor], i: int) -> list[torch.Tensor]:
    return [f[i : i + 1] if f.shape[0] > 1 else f for f in feats]


def prepared_conv_available() -> bool:
    """Whether the oneDNN prepacked convolution is used on this machine (else plain F.conv2d)."""
    return _mkldnn_ok()


__all__ = ["FastRenderer", "prepared_conv_available", "winograd_conv3x3", "winograd_weight"]
