"""Component-aware latent navigation: MLN (mouth), PLN (pose), EYLN (eye, EDTalk++), EXLN (expression).

Each space s has a bank B^s of n_s learnable D-dimensional bases and a head predicting its weights W^s from the
driving latent f^{*->r}; f^{r->s} = sum_i w_i q_i with q the orthonormalised bases.

Structure (our choice, documented): one shared MLP trunk on the latent, then one small MLP head per space, as the
reference implementation does (the paper's per-space MLP^s = head_s(trunk(.))). The trunk is trained with the first
spaces (mouth_pose stage) and frozen afterwards, so later spaces train without moving the earlier ones.

Orthogonality is exact by construction: the banks, concatenated in the fixed order [mouth, pose, eye, expression],
are orthonormalised by one ordered QR computed block by block (block Gram-Schmidt, re-orthogonalised once, then a
Householder QR of each block with diag(R) > 0). Column j of Q depends only on raw columns <= j, and the block form
makes that hold bitwise: adding or changing a later bank never changes an earlier space's bases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from edtalk.ops import EqualLinear

SPACES: tuple[str, ...] = ("mouth", "pose", "eye", "expression")  # training order = Gram-Schmidt order


def mlp(
    in_dim: int, hidden: int, out_dim: int, layers: int, activate_last: bool = False, linear: bool = False
) -> nn.Sequential:
    """`layers` equalized linear layers in_dim -> hidden ... -> out_dim, leaky ReLU between them (none at all
    when `linear`, as in the EDTalk/LIA reference)."""
    if layers < 1:
        raise ValueError(f"mlp: layers must be >= 1, got {layers}")
    mods = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(
            EqualLinear(
                in_dim if i == 0 else hidden,
                out_dim if last else hidden,
                activate=not linear and (activate_last or not last),
            )
        )
    return nn.Sequential(*mods)


def orthonormalize(banks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Ordered QR of the concatenation of `banks` (each (D, n_s)), returned per bank, diag(R) > 0.

    Block by block: project the earlier orthonormal columns out of this bank twice (one pass loses orthogonality
    in float32 when banks are nearly dependent), then QR the remainder and fix the signs. Always in float32 with
    autocast off: under bf16 autocast (GPU training) the projections would run in bf16 and leave the bases
    ~1e-3 from orthogonal.
    """
    qs: list[torch.Tensor] = []
    with _no_autocast(banks[0].device.type if banks else "cpu"):
        for a in banks:
            x = a.float()
            if qs:
                prev = torch.cat(qs, dim=1)
                for _ in range(2):
                    x = x - prev @ (prev.t() @ x)
            q, r = torch.linalg.qr(x, mode="reduced")
            sign = torch.sign(torch.diagonal(r))
            sign = torch.where(sign == 0, torch.ones_like(sign), sign)
            qs.append(q * sign.unsqueeze(0))
    return qs


def orthonormalize_joint(banks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The EDTalk/LIA reference's bases: one Householder QR (LAPACK geqrf/orgqr) of the concatenated raw banks
    + 1e-8, with LAPACK's raw signs (no sign normalisation), split back per bank. Float32, autocast off. The QR
    runs on the CPU whatever the device: the signs are LAPACK's convention and GPU solvers need not share it (a
    D x 36 matrix; autograd follows the copies)."""
    device = banks[0].device if banks else torch.device("cpu")
    with _no_autocast(device.type), _no_autocast("cpu"):
        x = torch.cat([a.float() for a in banks], dim=1).cpu() + 1e-8
        q, _ = torch.linalg.qr(x, mode="reduced")
    return list(torch.split(q.to(device), [a.shape[1] for a in banks], dim=1))


ORTHONORMALIZERS = {"blocks": orthonormalize, "joint": orthonormalize_joint}


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def _orthogonality_error(q: torch.Tensor) -> float:
    """max |QᵀQ - I| in float32 (autocast off, so a bf16 matmul does not measure its own rounding)."""
    with torch.no_grad(), _no_autocast(q.device.type):
        q = q.float()
        return float((q.t() @ q - torch.eye(q.shape[1], dtype=q.dtype, device=q.device)).abs().max())


class SpaceNavigator(nn.Module):
    """One space: its head (trunk output -> W^s) and its bank B^s (D x n_s raw bases)."""

    def __init__(self, latent_dim: int, num_bases: int, head_layers: int, linear: bool = False) -> None:
        super().__init__()
        self.num_bases = num_bases
        self.head = mlp(latent_dim, latent_dim, num_bases, head_layers, linear=linear)
        self.bank = nn.Parameter(torch.randn(latent_dim, num_bases))

    def forward(self, trunk_out: torch.Tensor | None = None) -> torch.Tensor:
        """Trunk output (B,D) -> W^s (B, n_s); with no input, a copy of the raw bank B^s (D, n_s).

        The bank is read here because ZeRO-3 gathers a module's parameters only around its forward (and backward);
        a copy, since the gathered storage is released when the forward returns.
        """
        if trunk_out is None:
            return self.bank.clone()
        return self.head(trunk_out)


class LatentNavigation(nn.Module):
    """The navigation modules sharing a trunk; submodules `trunk`, `mouth`, `pose`, `eye`, `expression` (a space
    with 0 bases is absent: `spaces` lists those present). `linear` and `qr` select the reference's behaviour
    (NavigationConfig)."""

    def __init__(
        self,
        latent_dim: int,
        num_bases: Mapping[str, int],
        trunk_layers: int,
        head_layers: int,
        linear: bool = False,
        qr: str = "blocks",
    ) -> None:
        super().__init__()
        missing = [s for s in SPACES if s not in num_bases]
        if missing:
            raise ValueError(f"LatentNavigation: num_bases lacks spaces {missing}; give all of {SPACES}")
        if sum(num_bases[s] for s in SPACES) > latent_dim:
            raise ValueError(
                f"LatentNavigation: {sum(num_bases.values())} bases cannot be orthogonal in D={latent_dim}"
            )
        self.latent_dim = latent_dim
        self.orthonormalize = ORTHONORMALIZERS[qr]
        self.trunk = mlp(latent_dim, latent_dim, latent_dim, trunk_layers, activate_last=True, linear=linear)
        self.spaces: tuple[str, ...] = tuple(s for s in SPACES if int(num_bases[s]) > 0)
        for s in self.spaces:
            self.add_module(s, SpaceNavigator(latent_dim, num_bases[s], head_layers, linear))

    def space(self, name: str) -> SpaceNavigator:
        if name not in self.spaces:
            if name in SPACES:
                raise KeyError(
                    f"latent space {name!r} is absent from this model; its spaces are {self.spaces}"
                )
            raise KeyError(f"unknown latent space {name!r}; the spaces are {SPACES}")
        return getattr(self, name)

    def num_bases(self) -> dict[str, int]:
        return {s: self.space(s).num_bases for s in self.spaces}

    def weights(self, latent: torch.Tensor, spaces: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Driving latent f^{*->r} (B,D) -> {space: W^s (B, n_s)} (all present spaces by default)."""
        spaces = self.spaces if spaces is None else spaces
        h = self.trunk(latent)
        return {s: self.space(s)(h) for s in spaces}

    def bases(self) -> dict[str, torch.Tensor]:
        """{space: Q^s (D, n_s)}, orthonormal within and across spaces."""
        qs = self.orthonormalize([self.space(s)() for s in self.spaces])  # banks read in forwards (ZeRO-3)
        return dict(zip(self.spaces, qs, strict=True))

    def motion(
        self, weights: Mapping[str, torch.Tensor], bases: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """{space: f^{r->s} = W^s Q^sᵀ (B,D)} for the spaces given."""
        bases = self.bases() if bases is None else bases
        out = {}
        for s, w in weights.items():
            q = bases[s]
            if w.shape[-1] != q.shape[1]:
                raise ValueError(
                    f"weights for space {s!r} have {w.shape[-1]} entries, its bank has {q.shape[1]}"
                )
            out[s] = w @ q.t().to(w.dtype)
        return out

    def orthogonality_error(self) -> float:
        """max |QᵀQ - I| over all bases of all spaces."""
        with torch.no_grad():
            return _orthogonality_error(torch.cat(list(self.bases().values()), dim=1))


class LatentNavigationLIA(nn.Module):
    """Single-bank LIA-style navigation for the autoencoder stage: latent -> n weights over one motion bank."""

    def __init__(
        self,
        latent_dim: int,
        num_bases: int,
        trunk_layers: int,
        head_layers: int,
        linear: bool = False,
        qr: str = "blocks",
    ) -> None:
        super().__init__()
        if num_bases > latent_dim:
            raise ValueError(f"LatentNavigationLIA: {num_bases} bases cannot be orthogonal in D={latent_dim}")
        self.num_bases = num_bases
        self.orthonormalize = ORTHONORMALIZERS[qr]
        self.trunk = mlp(latent_dim, latent_dim, latent_dim, trunk_layers, activate_last=True, linear=linear)
        self.motion_bank = SpaceNavigator(latent_dim, num_bases, head_layers, linear)

    def weights(self, latent: torch.Tensor) -> torch.Tensor:
        return self.motion_bank(self.trunk(latent))

    def bases(self) -> torch.Tensor:
        return self.orthonormalize([self.motion_bank()])[0]  # the bank read in its forward (ZeRO-3)

    def motion(self, weights: torch.Tensor) -> torch.Tensor:
        """f^{r->d} = W Qᵀ (B,D)."""
        return weights @ self.bases().t().to(weights.dtype)

    def orthogonality_error(self) -> float:
        with torch.no_grad():
            return _orthogonality_error(self.bases())
