"""EEM, the Emotion Enhancement Module (Eq. 8): per-scale AdaIN residual blocks on the identity features f^id,
conditioned on the expression feature f^{r->e}.

Each block is a full residual block, out = f^id + AdaIN2(conv2(act(AdaIN1(conv1(f^id), e))), e): both AdaIN-
modulated convolutions and the identity path reach the output (the reference computes the first branch and then
overwrites it, so its conv1/AdaIN1 never act).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from edtalk.ops import LRELU_SLOPE, EqualConv2d, EqualLinear


class AdaIN(nn.Module):
    """Instance norm, then a scale (1 + f_s) and shift f_b predicted from the condition."""

    def __init__(self, channels: int, cond_dim: int, hidden: int) -> None:
        super().__init__()
        self.shared = EqualLinear(cond_dim, hidden, activate=True)
        self.gamma = EqualLinear(hidden, channels)
        self.beta = EqualLinear(hidden, channels)

    def modulate(self, normalized: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Scale and shift already instance-normalised features (broadcasts a batch-1 input over cond's batch)."""
        h = self.shared(cond)
        gamma = self.gamma(h)[:, :, None, None].to(normalized.dtype)
        beta = self.beta(h)[:, :, None, None].to(normalized.dtype)
        return normalized * (1.0 + gamma) + beta

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.modulate(F.instance_norm(x), cond)


class EEMBlock(nn.Module):
    """One scale of the EEM: conv -> AdaIN -> leaky ReLU -> conv -> AdaIN, added to the input."""

    def __init__(self, channels: int, cond_dim: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = EqualConv2d(channels, channels, 3, padding=1)
        self.norm1 = AdaIN(channels, cond_dim, hidden)
        self.conv2 = EqualConv2d(channels, channels, 3, padding=1)
        self.norm2 = AdaIN(channels, cond_dim, hidden)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The part that depends on the identity only: instance_norm(conv1(f^id)). Computed once per identity
        (batch 1 broadcasts over the frames), not once per frame."""
        return F.instance_norm(self.conv1(x))

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, prepared: torch.Tensor | None = None
    ) -> torch.Tensor:
        normalized = self.prepare(x) if prepared is None else prepared
        h = F.leaky_relu(self.norm1.modulate(normalized, cond), LRELU_SLOPE)
        return x + self.norm2(self.conv2(h), cond)


class ReferenceAdaIN(nn.Module):
    """The EDTalk reference's AdaIN: instance norm (eps 1e-5, no affine) * (1 + gamma) + beta, with
    h = ReLU(Linear(e)), gamma = Linear(h), beta = Linear(h) (plain nn.Linear; key names as the reference's)."""

    def __init__(self, channels: int, cond_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Linear(cond_dim, hidden), nn.ReLU())
        self.mlp_gamma = nn.Linear(hidden, channels)
        self.mlp_beta = nn.Linear(hidden, channels)

    def modulate(self, normalized: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.mlp_shared(cond)
        gamma = self.mlp_gamma(h)[:, :, None, None].to(normalized.dtype)
        beta = self.mlp_beta(h)[:, :, None, None].to(normalized.dtype)
        return normalized * (1.0 + gamma) + beta


class ReferenceEEMBlock(nn.Module):
    """One scale of the EEM as the EDTalk reference releases it: out = x + AdaIN2(conv2(x), e). Its conv1/norm1
    branch is computed and then overwritten (no effect on any output), so it is not built here."""

    def __init__(self, channels: int, cond_dim: int, hidden: int) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = ReferenceAdaIN(channels, cond_dim, hidden)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The identity-only part, instance_norm(conv2(f^id)): here all of the convolution work."""
        return F.instance_norm(self.conv2(x))

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, prepared: torch.Tensor | None = None
    ) -> torch.Tensor:
        normalized = self.prepare(x) if prepared is None else prepared
        return x + self.norm2.modulate(normalized, cond)


EEM_BLOCKS = {"full": EEMBlock, "reference": ReferenceEEMBlock}


class EEM(nn.Module):
    """Identity features [8..S] + f^{r->e} (B,D) -> emotion-conditioned identity features f^id_e, same shapes."""

    def __init__(self, channels: Sequence[int], cond_dim: int, hidden: int, variant: str = "full") -> None:
        super().__init__()
        block = EEM_BLOCKS[variant]
        self.blocks = nn.ModuleList(block(c, cond_dim, hidden) for c in channels)

    def prepare(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale identity-only parts (see EEMBlock.prepare), to reuse across render calls."""
        return [block.prepare(f) for block, f in zip(self.blocks, features, strict=True)]

    def forward(
        self,
        features: Sequence[torch.Tensor],
        expression: torch.Tensor,
        prepared: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        if len(features) != len(self.blocks):
            raise ValueError(f"EEM: got {len(features)} feature maps, expected {len(self.blocks)}")
        n = expression.shape[0]
        if n > 1 and all(f.shape[0] == 1 for f in features) and bool((expression == expression[:1]).all()):
            # One identity, one expression for every frame (a clip-level emotion): compute once, broadcast.
            out = self.forward(features, expression[:1], prepared)
            return [f.expand(n, -1, -1, -1) for f in out]
        prepared = prepared if prepared is not None else [None] * len(self.blocks)
        return [block(f, expression, p) for block, f, p in zip(self.blocks, features, prepared, strict=True)]
