"""Discriminator D: StyleGAN2-style residual trunk with a minibatch standard-deviation feature.

The non-saturating adversarial loss lives in edtalk/losses.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from edtalk.ops import ConvLayer, EqualLinear, ResBlock


class Discriminator(nn.Module):
    """image (B,3,S,S) -> realness logit (B,1)."""

    def __init__(
        self,
        image_size: int,
        channels: Sequence[int],
        stddev_group: int = 4,
        blur_kernel: Sequence[int] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        levels = int(math.log2(image_size)) - 1
        if len(channels) != levels:
            raise ValueError(
                f"Discriminator: channels has {len(channels)} widths, image_size {image_size} needs {levels}"
            )
        self.stddev_group = stddev_group
        self.stem = ConvLayer(3, channels[-1], 1)
        self.blocks = nn.Sequential(
            *(ResBlock(channels[i], channels[i - 1], blur_kernel) for i in range(levels - 1, 0, -1))
        )
        self.final_conv = ConvLayer(channels[0] + 1, channels[0], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(channels[0] * 16, channels[0], activate=True), EqualLinear(channels[0], 1)
        )

    def minibatch_stddev(self, x: torch.Tensor) -> torch.Tensor:
        """Append the mean standard deviation over a group of samples as one extra channel (fights collapse)."""
        b, c, h, w = x.shape
        group = min(b, self.stddev_group)
        while b % group:  # the largest group size <= stddev_group dividing the batch
            group -= 1
        y = x.reshape(group, b // group, c, h, w)
        y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))  # (b//group,)
        y = y.view(1, b // group, 1, 1, 1).expand(group, -1, 1, h, w).reshape(b, 1, h, w)
        return torch.cat([x, y], dim=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(img))
        h = self.final_conv(self.minibatch_stddev(h))
        return self.final_linear(h.flatten(1))
