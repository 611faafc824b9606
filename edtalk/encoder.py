"""Encoder E: image -> latent f^{*->r} (dimension D) plus the identity skip features f^id at every scale."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from edtalk.ops import ConvLayer, EqualConv2d, ResBlock


class Encoder(nn.Module):
    """StyleGAN2-discriminator-style trunk: a 1x1 conv, residual blur-downsample blocks S -> 4, a 4x4 conv to D.

    `channels[i]` is the width at resolution 4 * 2**i (so channels[0] is the 4x4 width, channels[-1] the SxS one).
    """

    def __init__(
        self,
        image_size: int,
        channels: Sequence[int],
        latent_dim: int,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        levels = int(math.log2(image_size)) - 1  # resolutions 4, 8, ..., S
        if len(channels) != levels:
            raise ValueError(
                f"Encoder: channels has {len(channels)} widths, image_size {image_size} needs {levels}"
            )
        self.image_size = image_size
        self.stem = ConvLayer(3, channels[-1], 1)
        self.blocks = nn.ModuleList(
            ResBlock(channels[i], channels[i - 1], blur_kernel) for i in range(levels - 1, 0, -1)
        )
        self.to_latent = EqualConv2d(channels[0], latent_dim, 4, bias=False)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """img (B,3,S,S) -> (latent (B,D), skip features [8x8, 16x16, ..., SxS], coarse to fine)."""
        h = self.stem(img)
        feats = [h]
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        latent = self.to_latent(h).flatten(1)
        # feats holds S, S/2, ..., 4; the generator consumes 8 .. S, coarse to fine.
        return latent, feats[-2::-1]
