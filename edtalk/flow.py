"""Conditional normalizing flow φ for audio-driven pose and eye weights (Sec. 3.3, Eq. 13-14).

Per frame t the flow is a bijection between bank weights w_t (pose: 6, eye: 6) and a Gaussian latent z_t, given a
condition h_t. h_t comes from a small temporal conv net over the audio features f^a of the whole clip, so each
frame's mapping sees the rhythm around it, not one 200 ms window. Each flow step is

    ActNorm (learned per-dimension scale and shift) -> fixed permutation -> affine coupling,

where the coupling keeps half the dimensions and scales/shifts the other half with a network of (kept half, h_t).
Scales are soft-clamped (tanh) so training cannot blow up; the last layer of each coupling net starts at zero,
so a new flow is the identity. Every step is exactly invertible and its log-determinant is a sum of log-scales.

Direction names: ``forward(w, cond) -> (z, logdet)`` is data -> latent (the paper's φ^{-1} in Eq. 13), with
logdet = log|det ∂z/∂w| per frame; ``inverse(z, cond) -> w`` is the paper's φ, used to sample. Both directions
(and ``log_prob``, ``sample``) run through the modules' forwards (``reverse=True`` for φ): DeepSpeed ZeRO-3 gathers
a partitioned parameter only around its module's forward and backward.

Training (Eq. 13-14): L_MLE = ``losses.flow_nll(*flow(w, f^a))``. Since inverse(forward(w)) is w exactly, the
reconstruction and temporal losses of Eq. 14 only carry signal on weights produced from a latent that did not
come from w: we suggest ŵ = ``sample(f^a, temperature=τ)`` with small τ (0 gives the mode φ(0)), which pulls the
conditional mode towards the true motion and keeps it smooth, while the likelihood keeps the spread.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass
class ConditionalFlowConfig:
    """φ_p (pose) or φ_eye: weights of one bank given per-frame audio features."""

    dim: int = 6  # size of the modelled weight vector (pose bank 6, eye bank 6)
    cond_dim: int = 512  # size of the audio features f^a (AudioEncoderConfig.feature_dim)
    context_dim: int = 128  # size of the temporal condition h_t fed to every coupling
    context_kernel: int = 5  # temporal kernel (frames) of each context conv layer
    context_layers: int = 2  # context conv layers: receptive field = layers*(kernel-1)+1 frames
    n_steps: int = 8  # flow steps (actnorm + permutation + coupling)
    hidden: int = 256  # hidden width of each coupling network
    coupling_layers: int = 2  # hidden layers of each coupling network
    scale_clamp: float = 3.0  # |log-scale| bound per coupling (soft, by tanh)
    permutation_seed: int = 0  # seed of the fixed per-step permutations (stored as buffers too)

    def __post_init__(self) -> None:
        if self.dim < 2:
            raise ValueError(
                f"ConditionalFlowConfig.dim must be >= 2 (coupling needs two halves), got {self.dim}"
            )
        for name in ("cond_dim", "context_dim", "context_layers", "n_steps", "hidden", "coupling_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ConditionalFlowConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.context_kernel <= 0 or self.context_kernel % 2 == 0:
            raise ValueError(
                f"ConditionalFlowConfig.context_kernel must be odd (centred in time), got {self.context_kernel}"
            )
        if self.scale_clamp <= 0:
            raise ValueError(f"ConditionalFlowConfig.scale_clamp must be > 0, got {self.scale_clamp}")

    @classmethod
    def tiny(cls, dim: int = 6) -> ConditionalFlowConfig:
        return cls(
            dim=dim, cond_dim=64, context_dim=16, context_layers=1, n_steps=4, hidden=32, coupling_layers=1
        )

    @classmethod
    def paper(cls, dim: int = 6) -> ConditionalFlowConfig:
        return cls(dim=dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConditionalFlowConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"ConditionalFlowConfig: unknown keys {unknown}; known keys are {sorted(names)}")
        return cls(**data)


class _ActNorm(nn.Module):
    """y = (x + b) * exp(s) per dimension; starts as the identity (no data-dependent init, so no hidden state).

    Both directions run in ``forward`` (``reverse=True``: x = y * exp(-s) - b), so the parameters are read only
    inside a forward, where DeepSpeed ZeRO-3 has gathered them.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(
        self, x: torch.Tensor, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """x -> (y, logdet) per frame; with ``reverse`` y -> x alone."""
        if reverse:
            return x * torch.exp(-self.log_scale) - self.shift
        y = (x + self.shift) * torch.exp(self.log_scale)
        return y, self.log_scale.sum().expand(x.shape[:-1])


class _AffineCoupling(nn.Module):
    """Keep x[:k]; x[k:] -> x[k:] * exp(s) + t with (s, t) = NN(x[:k], h)."""

    def __init__(self, dim: int, context_dim: int, hidden: int, layers: int, scale_clamp: float) -> None:
        super().__init__()
        self.k = dim // 2
        self.scale_clamp = scale_clamp
        width = self.k + context_dim
        net: list[nn.Module] = []
        for _ in range(layers):
            net += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        last = nn.Linear(width, 2 * (dim - self.k))
        nn.init.zeros_(last.weight)  # identity at initialisation
        nn.init.zeros_(last.bias)
        net.append(last)
        self.net = nn.Sequential(*net)

    def _params(self, keep: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, t = self.net(torch.cat([keep, h], dim=-1)).chunk(2, dim=-1)
        s = self.scale_clamp * torch.tanh(raw_s / self.scale_clamp)
        return s, t

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """x -> (y, logdet) per frame; with ``reverse`` y -> x alone (the kept half gives the same (s, t))."""
        keep, other = x[..., : self.k], x[..., self.k :]
        s, t = self._params(keep, h)
        if reverse:
            return torch.cat([keep, (other - t) * torch.exp(-s)], dim=-1)
        return torch.cat([keep, other * torch.exp(s) + t], dim=-1), s.sum(-1)


class _Context(nn.Module):
    """h_t from audio features over time: conv1d layers over T, 'same' length (replicate padding at clip ends)."""

    def __init__(self, cfg: ConditionalFlowConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = cfg.cond_dim
        pad = cfg.context_kernel // 2
        for i in range(cfg.context_layers):
            layers.append(
                nn.Conv1d(width, cfg.context_dim, cfg.context_kernel, padding=pad, padding_mode="replicate")
            )
            if i < cfg.context_layers - 1:
                layers.append(nn.LeakyReLU(0.2))
            width = cfg.context_dim
        self.net = nn.Sequential(*layers)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net(cond.transpose(1, 2)).transpose(1, 2)


class ConditionalFlow(nn.Module):
    """Conditional normalizing flow over [B,T,dim] weight sequences given [B,T,cond_dim] audio features."""

    def __init__(self, config: ConditionalFlowConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ConditionalFlowConfig()
        self.context = _Context(cfg)
        self.actnorms = nn.ModuleList(_ActNorm(cfg.dim) for _ in range(cfg.n_steps))
        self.couplings = nn.ModuleList(
            _AffineCoupling(cfg.dim, cfg.context_dim, cfg.hidden, cfg.coupling_layers, cfg.scale_clamp)
            for _ in range(cfg.n_steps)
        )
        gen = torch.Generator().manual_seed(cfg.permutation_seed)
        for i in range(cfg.n_steps):
            # Alternate a reversal (every half gets changed every other step) with random mixes.
            perm = torch.arange(cfg.dim - 1, -1, -1) if i % 2 == 0 else torch.randperm(cfg.dim, generator=gen)
            self.register_buffer(f"perm_{i}", perm)
            self.register_buffer(f"inv_perm_{i}", torch.argsort(perm))

    def _check(self, x: torch.Tensor | None, cond: torch.Tensor) -> None:
        cfg = self.config
        if cond.dim() != 3 or cond.shape[-1] != cfg.cond_dim:
            raise ValueError(
                f"ConditionalFlow cond must be audio features [B,T,{cfg.cond_dim}], got {tuple(cond.shape)}"
            )
        if x is not None and (x.dim() != 3 or x.shape[-1] != cfg.dim or x.shape[:2] != cond.shape[:2]):
            raise ValueError(
                f"ConditionalFlow input must be weights [B,T,{cfg.dim}] matching cond's [B,T]={tuple(cond.shape[:2])}, "
                f"got {tuple(x.shape)}"
            )

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Data -> latent: x [B,T,dim], cond [B,T,cond_dim] -> (z [B,T,dim], logdet [B,T]).

        With ``reverse`` latent -> data: x is a latent z and the result is the weights [B,T,dim] alone (what
        ``inverse`` returns). Both directions call the layers' forwards, so under DeepSpeed ZeRO-3 every parameter
        is read while its module's forward has it gathered.
        """
        self._check(x, cond)
        h = self.context(cond)
        if reverse:
            for i in reversed(range(self.config.n_steps)):
                x = self.couplings[i](x, h, reverse=True)
                x = x[..., getattr(self, f"inv_perm_{i}")]
                x = self.actnorms[i](x, reverse=True)
            return x
        logdet = x.new_zeros(x.shape[:-1])
        for i in range(self.config.n_steps):
            x, ld = self.actnorms[i](x)
            logdet = logdet + ld
            x = x[..., getattr(self, f"perm_{i}")]
            x, ld = self.couplings[i](x, h)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Latent -> data: z [B,T,dim], cond [B,T,cond_dim] -> x [B,T,dim] (``forward`` with ``reverse=True``)."""
        return self(z, cond, reverse=True)

    def log_prob(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p(x_t | audio) per frame, [B,T] (Eq. 13's L_MLE is its negative sum)."""
        z, logdet = self(x, cond)
        log_pz = -0.5 * z.pow(2).sum(-1) - 0.5 * self.config.dim * math.log(2.0 * math.pi)
        return log_pz + logdet

    def sample(
        self,
        cond: torch.Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Draw weights [B,T,dim] given audio features [B,T,cond_dim]: z ~ N(0, temperature² I), x = φ(z).

        ``seed`` (or a ``generator`` on cond's device) makes the draw reproducible; temperature 0 gives φ(0).
        """
        if temperature < 0:
            raise ValueError(f"ConditionalFlow.sample: temperature must be >= 0, got {temperature}")
        if generator is not None and seed is not None:
            raise ValueError("ConditionalFlow.sample: pass a generator or a seed, not both")
        self._check(None, cond)
        if seed is not None:
            generator = torch.Generator(device=cond.device).manual_seed(seed)
        shape = (*cond.shape[:2], self.config.dim)
        z = torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype) * temperature
        return self.inverse(z, cond)
