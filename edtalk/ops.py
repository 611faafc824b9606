"""The low-level StyleGAN2 ops every network here is built from, one implementation each, pure PyTorch.

Equalized learning rate (weights stored at unit variance, scaled at run time), FIR blur / up- and downsampling
(`upfirdn2d` as depthwise convolutions: no custom CUDA), the fused bias + leaky ReLU written as plain ops,
modulated convolution with demodulation, and the layers composed from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps activations at unit variance through a leaky ReLU


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Bias (broadcast over the channel axis 1) + leaky ReLU, rescaled by sqrt(2)."""
    if bias is not None:
        shape = [1, -1] + [1] * (x.ndim - 2)
        x = x + bias.view(shape)
    return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN


class FusedLeakyReLU(nn.Module):
    """A learned per-channel bias followed by the scaled leaky ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


def make_blur_kernel(taps: Sequence[int]) -> torch.Tensor:
    """Separable FIR taps -> a normalised 2-D kernel (sums to 1)."""
    k = torch.tensor(list(taps), dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative pads crop), FIR-filter, then keep every `down`-th sample.

    The filter runs as one depthwise convolution over all channels, so it stays fast on CPU and in channels-last.
    """
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    if p0 < 0 or p1 < 0:
        x = x[:, :, max(-p0, 0) : x.shape[2] - max(-p1, 0), max(-p0, 0) : x.shape[3] - max(-p1, 0)]
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


class Blur(nn.Module):
    """FIR low-pass filter with explicit padding (scaled by up**2 after zero-insertion upsampling)."""

    def __init__(self, taps: Sequence[int], pad: tuple[int, int], upsample_factor: int = 1) -> None:
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(taps) * (upsample_factor**2), persistent=False)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling (for the RGB and flow skip paths)."""

    def __init__(self, taps: Sequence[int], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_blur_kernel(taps) * (factor**2), persistent=False)
        p = len(taps) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate; optional fused leaky ReLU."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activate: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activate:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, activate={self.activate}"


class EqualConv2d(nn.Module):
    """Conv2d with equalized learning rate."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, {k}, stride={self.stride}, padding={self.padding}"


class ConvLayer(nn.Sequential):
    """(blur ->) equalized conv (stride 2 when downsampling) (-> bias + leaky ReLU)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        downsample: bool = False,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
        bias: bool = True,
        activate: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(
            EqualConv2d(
                in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias and not activate
            )
        )
        if activate:
            layers.append(FusedLeakyReLU(out_ch) if bias else nn.LeakyReLU(LRELU_SLOPE))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """StyleGAN2 discriminator residual block: two 3x3 convs (the second downsamples) plus a 1x1 skip."""

    def __init__(self, in_ch: int, out_ch: int, blur_kernel: Sequence[int] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(
            in_ch, out_ch, 1, downsample=True, blur_kernel=blur_kernel, bias=False, activate=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2.0)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution, computed by scaling activations instead of per-sample weights.

    x * s, one shared convolution, then * d (demodulation) equals the grouped per-sample-weight form, but runs as an
    ordinary batched convolution: fast on CPU, batch-friendly and channels-last friendly.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size**2)
        self.modulation = EqualLinear(
            style_dim, in_ch, bias_init=1.0
        )  # styles start at 1: plain conv at init
        self.padding = kernel_size // 2
        if upsample:
            p = (len(blur_kernel) - 2) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.modulation(style)  # (B, in)
        weight = self.weight * self.scale
        x = x * s[:, :, None, None].to(x.dtype)
        if self.upsample:
            # Transposed conv takes (in, out, k, k); stride 2 doubles the size, the blur removes the aliasing.
            out = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2)
            out = self.blur(out)
        else:
            out = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
        if self.demodulate:
            w2 = weight.pow(2).sum(dim=(2, 3))  # (out, in)
            d = torch.rsqrt(s.pow(2) @ w2.t() + 1e-8)  # (B, out): 1/||w * s|| per output channel
            out = out * d[:, :, None, None].to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_ch}, {self.out_ch}, {self.kernel_size}, demodulate={self.demodulate}, "
            f"upsample={self.upsample}"
        )


class StyledConv(nn.Module):
    """Modulated conv followed by bias + leaky ReLU (no noise injection: the reference never feeds noise)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(
            in_ch, out_ch, kernel_size, style_dim, upsample=upsample, blur_kernel=blur_kernel
        )
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x, style))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB (no demodulation), added to the upsampled RGB of the coarser scale."""

    def __init__(self, in_ch: int, style_dim: int, blur_kernel: Sequence[int] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))
        self.upsample = Upsample(blur_kernel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias.view(1, 3, 1, 1).to(x.dtype)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ReferenceToRGB(nn.Module):
    """The EDTalk/LIA reference's ToRGB: a plain 1x1 EqualConv2d (no bias, no style) -> FusedLeakyReLU -> + bias,
    added to the FIR-upsampled RGB of the coarser scale. Same call signature as ToRGB (the style is unused)."""

    def __init__(self, in_ch: int, style_dim: int, blur_kernel: Sequence[int] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.conv = nn.Sequential(EqualConv2d(in_ch, 3, 1, bias=False), FusedLeakyReLU(3))
        self.bias = nn.Parameter(torch.zeros(3))
        self.upsample = Upsample(blur_kernel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) + self.bias.view(1, 3, 1, 1).to(x.dtype)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConstantInput(nn.Module):
    """The learned 4x4 constant the synthesis starts from."""

    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


def count_parameters(module: nn.Module | None) -> int:
    """Number of parameters of a module (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())
