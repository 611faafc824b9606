"""Generator G: StyleGAN2 synthesis driven by f^{i->d} that warps the identity features in at every scale."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from edtalk.ops import ConstantInput, ModulatedConv2d, ReferenceToRGB, StyledConv, ToRGB, Upsample

TO_RGB = {"modulated": ToRGB, "reference": ReferenceToRGB}


class FlowHead(nn.Module):
    """Per-scale warp: a modulated 1x1 conv predicts a sampling-grid offset (2 ch) and a blend mask (1 ch).

    The logits of the coarser scale are upsampled and added, so the flow is refined coarse to fine. The identity
    skip feature is warped by grid_sample and masked; the masked warp feeds the image (ToRGB) and, blended with the
    generated feature (mask * warped + (1-mask) * gen), the next scale's convolutions.
    """

    def __init__(
        self,
        channels: int,
        style_dim: int,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
        warp: str = "align_corners",
    ) -> None:
        super().__init__()
        self.reference_warp = warp == "reference"  # GeneratorConfig.warp
        self.conv = ModulatedConv2d(channels, 3, 1, style_dim, demodulate=False)
        # Start as the identity warp with a half mask: a random warp of random features is chaotic (float32
        # rounding grows ~10x per scale through grid_sample), and an untrained warp carries no information anyway.
        nn.init.zeros_(self.conv.weight)
        self.bias = nn.Parameter(torch.zeros(3))
        self.upsample = Upsample(blur_kernel)

    def forward(
        self,
        gen: torch.Tensor,
        style: torch.Tensor,
        identity_feat: torch.Tensor,
        prev_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (blended feature for the next scale, masked warped identity feature for ToRGB, flow logits)."""
        logits = self.conv(gen, style) + self.bias.view(1, 3, 1, 1).to(gen.dtype)
        if prev_logits is not None:
            logits = logits + self.upsample(prev_logits)
        b, _, h, w = gen.shape
        # The reference builds its base grid in float64 and casts it; ours builds it in the compute dtype.
        lin_dtype = torch.float64 if self.reference_warp else gen.dtype
        ys = torch.linspace(-1.0, 1.0, h, device=gen.device, dtype=lin_dtype).to(gen.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=gen.device, dtype=lin_dtype).to(gen.dtype)
        base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        grid = base.unsqueeze(0) + torch.tanh(logits[:, 0:2]).permute(0, 2, 3, 1)
        mask = torch.sigmoid(logits[:, 2:3])
        # align_corners=True: the linspace grid then samples pixel centres exactly (zero offset = identity warp);
        # the reference samples with align_corners=False (an identity flow then resamples slightly).
        warped = (
            F.grid_sample(identity_feat.to(gen.dtype), grid, align_corners=not self.reference_warp) * mask
        )
        return warped + gen * (1.0 - mask), warped, logits


class Generator(nn.Module):
    """f^{i->d} (B,D) + identity features [8..S] (optionally EEM-modulated) -> image (B,3,S,S).

    From a learned 4x4 constant, each scale 8..S runs an upsampling and a plain modulated conv, the flow head that
    warps the identity feature of that scale in, and a ToRGB of the masked warped identity feature whose output is
    accumulated across scales. The image is made of warped identity features only (as in LIA): the latent decides
    where each feature comes from and how much of it shows, so the cheapest way to lower the loss is to move the
    features with the driving motion, not to copy the source or paint from the latent. A generator that may also
    paint from its own features learned the driving motion more slowly on SynthTalk (docs/training.md).
    """

    def __init__(
        self,
        image_size: int,
        channels: Sequence[int],
        latent_dim: int,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
        paint_scales: int = 0,
        to_rgb: str = "modulated",
        warp: str = "align_corners",
    ) -> None:
        super().__init__()
        levels = int(math.log2(image_size)) - 1
        if len(channels) != levels:
            raise ValueError(
                f"Generator: channels has {len(channels)} widths, image_size {image_size} needs {levels}"
            )
        self.image_size = image_size
        self.channels = tuple(channels)
        self.paint_scales = int(paint_scales)  # finest scales whose ToRGB sees the blend (config docs)
        self.input = ConstantInput(channels[0])
        self.conv1 = StyledConv(channels[0], channels[0], 3, latent_dim, blur_kernel=blur_kernel)
        self.up_convs = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.flows = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for i in range(1, levels):
            self.up_convs.append(
                StyledConv(
                    channels[i - 1], channels[i], 3, latent_dim, upsample=True, blur_kernel=blur_kernel
                )
            )
            self.convs.append(StyledConv(channels[i], channels[i], 3, latent_dim, blur_kernel=blur_kernel))
            self.flows.append(FlowHead(channels[i], latent_dim, blur_kernel, warp))
            self.to_rgbs.append(TO_RGB[to_rgb](channels[i], latent_dim, blur_kernel))

    def forward(self, latent: torch.Tensor, identity_features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(identity_features) != len(self.convs):
            raise ValueError(
                f"Generator: got {len(identity_features)} identity features, expected {len(self.convs)} (8..S)"
            )
        b = latent.shape[0]
        out = self.conv1(self.input(b).to(latent.dtype), latent)
        rgb = logits = None
        first_paint = len(self.convs) - self.paint_scales
        for i, (up_conv, conv, flow, to_rgb, feat) in enumerate(
            zip(self.up_convs, self.convs, self.flows, self.to_rgbs, identity_features, strict=True)
        ):
            out = conv(up_conv(out, latent), latent)
            if feat.shape[0] != b:
                feat = feat.expand(b, -1, -1, -1)
            out, warped, logits = flow(out, latent, feat, logits)
            rgb = to_rgb(out if i >= first_paint else warped, latent, rgb)
        return rgb
