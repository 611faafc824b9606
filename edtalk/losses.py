"""The training losses of EDTalk, each named for its paper equation.

Visual stages: L1 reconstruction and VGG19 perceptual loss (Eq. 5), non-saturating adversarial loss with an
optional R1 penalty (Eq. 6), feature loss exp(-cos) (Eq. 7, also the mouth consistency loss Eq. 10), and our
substitute for the EMOCA motion loss (Eq. 9, see :class:`MotionLoss`). Audio stages: mouth-weight L2 (Eq. 11),
sync loss (Eq. 12) and SyncNet's own BCE, flow negative log-likelihood (Eq. 13), pose reconstruction and temporal
losses (Eq. 14), expression L1 (Eq. 15).

Conventions: every function returns a scalar averaged over the batch (and over frames where there is a time
axis); per-sample norms (``||.||_2``) are taken over the last axis as the equations write them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edtalk.vgg19 import LAYER_NAMES, VGG19

# 68-point landmark groups (iBUG convention) that carry expression: brows, eyes, mouth.
BROWS = tuple(range(17, 27))
EYES = tuple(range(36, 48))
MOUTH = tuple(range(48, 68))


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a flat config dataclass from a JSON dict; lists become tuples; unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# --------------------------------------------------------------------------------------------- reconstruction


def l1_reconstruction_loss(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_rec of Eq. 5: mean absolute error between images (any matching shapes)."""
    _same_shape("l1_reconstruction_loss", generated, target)
    return (generated - target).abs().mean()


def region_l1_loss(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error inside a soft region `mask` (B,1,H,W) in [0, 1]: sum |g - t| * mask / (C * sum mask).

    Same scale as the whole-image L1, whatever the region's area. Not in the paper: at the tiny preset's 64 px the
    mouth covers ~6% of a frame, and the whole-image L1 alone left it nearly unlearned (docs/training.md).
    """
    _same_shape("region_l1_loss", generated, target)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != generated.shape[0]:
        raise ValueError(f"region_l1_loss: mask must be (B,1,H,W), got {tuple(mask.shape)}")
    mask = mask.to(generated.dtype)
    err = ((generated - target).abs() * mask).sum()
    return err / (generated.shape[1] * mask.sum()).clamp_min(1e-6)


def l2_norm_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||a - b||_2 over the last axis, averaged over all leading axes.

    Eq. 11 L^m_fea (mouth weights from audio vs MLN's), Eq. 14 L^p_rec (pose weights from the flow vs PLN's).
    """
    _same_shape("l2_norm_loss", predicted, target)
    return (predicted - target).norm(dim=-1).mean()


mouth_weight_loss = l2_norm_loss  # Eq. 11, L^m_fea
pose_reconstruction_loss = l2_norm_loss  # Eq. 14, L^p_rec


def temporal_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_tem of Eq. 14: mean over t of ||(w_t - w_{t-1}) - (ŵ_t - ŵ_{t-1})||_2; inputs [B,T,D] with T >= 2."""
    _same_shape("temporal_loss", predicted, target)
    if predicted.dim() != 3 or predicted.shape[1] < 2:
        raise ValueError(f"temporal_loss needs [B,T,D] sequences with T >= 2, got {tuple(predicted.shape)}")
    d_pred = predicted[:, 1:] - predicted[:, :-1]
    d_true = target[:, 1:] - target[:, :-1]
    return (d_true - d_pred).norm(dim=-1).mean()


def expression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_exp of Eq. 15: ||W^e - Ŵ^e||_1 per sample (sum over the n_e weights), averaged over the batch."""
    _same_shape("expression_loss", predicted, target)
    return (predicted - target).abs().sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------------- perceptual


@dataclass
class PerceptualLossConfig:
    """Multi-scale VGG19 perceptual loss (Eq. 5)."""

    scales: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)  # image pyramid; each scale's side must stay >= 16 px
    layer_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)  # weights of relu1_1 .. relu5_1
    distance: str = "mse"  # "mse" = squared L2 as Eq. 5 writes it; "l1" = the FOMM/LIA variant
    vgg_weights: str | None = None  # torchvision-format vgg19 file; None: $EDTALK_VGG19_WEIGHTS, else random

    def __post_init__(self) -> None:
        if not self.scales or any(not 0.0 < s <= 1.0 for s in self.scales):
            raise ValueError(
                f"PerceptualLossConfig.scales must be non-empty, each in (0, 1]; got {self.scales}"
            )
        if len(self.layer_weights) != len(LAYER_NAMES) or any(w < 0 for w in self.layer_weights):
            raise ValueError(
                f"PerceptualLossConfig.layer_weights needs {len(LAYER_NAMES)} non-negative weights "
                f"({', '.join(LAYER_NAMES)}); got {self.layer_weights}"
            )
        if self.distance not in ("mse", "l1"):
            raise ValueError(f"PerceptualLossConfig.distance must be 'mse' or 'l1', got {self.distance!r}")

    @classmethod
    def tiny(cls) -> PerceptualLossConfig:
        # 64 px images: 0.25 would leave 16 px, the smallest VGG19 can take to relu5_1; keep two scales for speed.
        return cls(scales=(1.0, 0.5))

    @classmethod
    def paper(cls) -> PerceptualLossConfig:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerceptualLossConfig:
        return _from_dict(cls, data)


class PerceptualLoss(nn.Module):
    """L_per of Eq. 5 over an image pyramid: Σ_scales Σ_layers w_l · dist(Φ_l(I), Φ_l(Î)), Φ = frozen VGG19.

    The target's features are computed without gradient; gradients flow to the generated image only.
    """

    def __init__(self, config: PerceptualLossConfig | None = None) -> None:
        super().__init__()
        self.config = config or PerceptualLossConfig()
        self.vgg = VGG19(self.config.vgg_weights, requires_grad=False)
        self.vgg.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # Φ is a fixed measuring instrument
        return self

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """generated, target: [B,3,H,W] in [-1,1] -> scalar loss."""
        _same_shape("PerceptualLoss", generated, target)
        total = generated.new_zeros(())
        dist = F.mse_loss if self.config.distance == "mse" else F.l1_loss
        for scale in self.config.scales:
            g, t = generated, target
            if scale != 1.0:
                size = (round(generated.shape[-2] * scale), round(generated.shape[-1] * scale))
                g = F.interpolate(g, size=size, mode="bilinear", align_corners=False, antialias=True)
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
            feats_g = self.vgg(g)
            with torch.no_grad():
                feats_t = self.vgg(t)
            for w, fg, ft in zip(self.config.layer_weights, feats_g, feats_t, strict=True):
                if w > 0:
                    total = total + w * dist(fg, ft)
        return total


# ---------------------------------------------------------------------------------------------- adversarial


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of Eq. 6, non-saturating form: E[softplus(-D(Î))] = -E[log sigmoid(D(Î))]."""
    return F.softplus(-fake_logits).mean()


def discriminator_adversarial_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator side of Eq. 6: -E[log σ(D(I))] - E[log(1 - σ(D(Î)))], with D returning logits."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty E[||∇_I D(I)||²] (StyleGAN2); ``real_images`` must have requires_grad set before D.

    Multiply by gamma/2 (and by the lazy-regularisation interval if applied every k steps) in the caller.
    """
    if not real_images.requires_grad:
        raise ValueError("r1_penalty: real_images must have requires_grad=True before they go through D")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------- feature space


def feature_loss(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(-S(a, b)) with S the cosine similarity along ``dim``, averaged over the rest.

    Eq. 7 (L_fea: features of a swapped image vs those of the original) and Eq. 10 (L_m-c, mouth consistency:
    MLN(E(Î)) vs MLN(E(I^d))). Ranges from exp(-1) (same direction) to e (opposite).
    """
    _same_shape("feature_loss", a, b)
    return torch.exp(-F.cosine_similarity(a, b, dim=dim, eps=1e-8)).mean()


mouth_consistency_loss = feature_loss  # Eq. 10


def landmark_heatmap_mask(
    landmarks: torch.Tensor, size: tuple[int, int], sigma: float, indices: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Soft region mask from landmarks: per pixel the max over points of exp(-d²/2σ²).

    landmarks: [B,68,2] (x, y) in pixels of an image of ``size`` = (H, W); sigma in pixels -> [B,1,H,W] in [0,1].
    """
    if landmarks.dim() != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks must be [B,N,2] pixel (x, y), got {tuple(landmarks.shape)}")
    if sigma <= 0:
        raise ValueError(f"landmark_heatmap_mask: sigma must be > 0 pixels, got {sigma}")
    pts = landmarks if indices is None else landmarks[:, list(indices)]
    h, w = size
    ys = torch.arange(h, device=pts.device, dtype=pts.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=pts.device, dtype=pts.dtype).view(1, 1, 1, w)
    px = pts[..., 0].reshape(pts.shape[0], -1, 1, 1)
    py = pts[..., 1].reshape(pts.shape[0], -1, 1, 1)
    d2 = (xs - px) ** 2 + (ys - py) ** 2  # [B,N,H,W]
    return torch.exp(-d2 / (2.0 * sigma * sigma)).amax(dim=1, keepdim=True)


@dataclass
class MotionLossConfig:
    """Our substitute for the EMOCA motion loss of Eq. 9 (see MotionLoss)."""

    latent_weight: float = 1.0  # weight of the frozen-encoder latent term (stands in for EMOCA's ψ, emotion)
    landmark_weight: float = (
        1.0  # weight of the landmark-region pixel term (stands in for EMOCA's φ, geometry)
    )
    sigma: float = 0.04  # landmark Gaussian radius as a fraction of the image side
    regions: tuple[int, ...] = BROWS + EYES + MOUTH  # 68-point indices whose neighbourhoods carry expression

    def __post_init__(self) -> None:
        if (
            self.latent_weight < 0
            or self.landmark_weight < 0
            or self.latent_weight + self.landmark_weight == 0
        ):
            raise ValueError(
                "MotionLossConfig: latent_weight and landmark_weight must be >= 0 and not both 0, got "
                f"{self.latent_weight}, {self.landmark_weight}"
            )
        if not 0.0 < self.sigma < 1.0:
            raise ValueError(
                f"MotionLossConfig.sigma is a fraction of the image side in (0, 1), got {self.sigma}"
            )
        if not self.regions or any(not 0 <= i < 68 for i in self.regions):
            raise ValueError(
                f"MotionLossConfig.regions must be 68-point indices in [0, 68), got {self.regions}"
            )

    @classmethod
    def tiny(cls) -> MotionLossConfig:
        return cls(sigma=0.06)  # a few pixels at 64 px

    @classmethod
    def paper(cls) -> MotionLossConfig:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MotionLossConfig:
        return _from_dict(cls, data)


class MotionLoss(nn.Module):
    """L_mot, a substitute for Eq. 9, which compares EMOCA's 3D-reconstruction (φ) and emotion (ψ) features.

    We have no EMOCA and no differentiable landmark detector to put in the graph, so the two terms are replaced
    by things we can compute honestly:

    * latent term (for ψ): ||E(I^d) - E(Î)||_2 in the latent of the FROZEN encoder E (trained in the autoencoder
      stage to encode every motion of a frame). A trainable network here (EXLN) could collapse to a constant and
      zero the loss; frozen E cannot. The caller passes both latents (E(Î) with gradient).
    * landmark term (for φ): an L1 between Î and I^d weighted by a soft mask of Gaussians around the driving
      frame's brow, eye and mouth landmarks (from preprocessing), normalised by the mask's mass: the pixels where
      expression geometry shows. Skipped when no landmarks are given.

    Both terms are 0 iff the generated frame matches the driving frame where they look; neither is EMOCA's
    geometry, so numbers are not comparable with the paper's.
    """

    def __init__(self, config: MotionLossConfig | None = None) -> None:
        super().__init__()
        self.config = config or MotionLossConfig()

    def forward(
        self,
        generated: torch.Tensor,
        driving: torch.Tensor,
        generated_latent: torch.Tensor | None = None,
        driving_latent: torch.Tensor | None = None,
        driving_landmarks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """generated, driving: [B,3,H,W]; latents [B,D] (E's output); driving_landmarks [B,68,2] crop pixels."""
        _same_shape("MotionLoss images", generated, driving)
        cfg = self.config
        total = generated.new_zeros(())
        used = False
        if cfg.latent_weight > 0 and generated_latent is not None and driving_latent is not None:
            total = total + cfg.latent_weight * l2_norm_loss(generated_latent, driving_latent.detach())
            used = True
        if cfg.landmark_weight > 0 and driving_landmarks is not None:
            h, w = generated.shape[-2:]
            mask = landmark_heatmap_mask(
                driving_landmarks.to(generated.dtype), (h, w), cfg.sigma * max(h, w), cfg.regions
            )
            diff = (generated - driving.detach()).abs().mean(dim=1, keepdim=True)
            per_sample = (diff * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-6)
            total = total + cfg.landmark_weight * per_sample.mean()
            used = True
        if not used:
            raise ValueError(
                "MotionLoss got nothing to compare: pass generated_latent and driving_latent (frozen E outputs) "
                "and/or driving_landmarks [B,68,2], matching the non-zero weights of its config"
            )
        return total


# ------------------------------------------------------------------------------------------------ audio side


def sync_loss(
    audio_embedding: torch.Tensor, video_embedding: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """L^m_sync of Eq. 12: -log(v·s / max(||v|| ||s||, ε)), averaged over the batch.

    The cosine is clamped to [eps, 1] before the log: our SyncNet embeddings are non-negative so the cosine is in
    [0, 1] already; the clamp only keeps the log finite (a fully off-sync pair gives -log(eps), not inf).
    """
    _same_shape("sync_loss", audio_embedding, video_embedding)
    dot = (audio_embedding * video_embedding).sum(dim=-1)
    norms = (audio_embedding.norm(dim=-1) * video_embedding.norm(dim=-1)).clamp_min(eps)
    return -torch.log((dot / norms).clamp(min=eps, max=1.0)).mean()


def sync_bce_loss(score: torch.Tensor, in_sync: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SyncNet training: binary cross-entropy of the cosine score in [0, 1] against the in-sync label (1/0)."""
    _same_shape("sync_bce_loss", score, in_sync)
    return F.binary_cross_entropy(score.clamp(eps, 1.0 - eps), in_sync.to(score.dtype))


def flow_nll(z: torch.Tensor, logdet: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_MLE of Eq. 13: -log p(w) = -(log N(z; 0, I) + log|det ∂z/∂w|), averaged over valid frames.

    z: [B,T,D] latents of the flow's data->latent direction, logdet: [B,T], mask: [B,T] (1 = real frame) or None.
    Eq. 13 sums over t; the mean keeps the scale independent of clip length.
    """
    if z.dim() != 3 or logdet.shape != z.shape[:2]:
        raise ValueError(
            f"flow_nll needs z [B,T,D] and logdet [B,T], got {tuple(z.shape)} and {tuple(logdet.shape)}"
        )
    d = z.shape[-1]
    log_pz = -0.5 * z.pow(2).sum(-1) - 0.5 * d * math.log(2.0 * math.pi)
    nll = -(log_pz + logdet)
    if mask is None:
        return nll.mean()
    if mask.shape != nll.shape:
        raise ValueError(f"flow_nll mask must be [B,T] = {tuple(nll.shape)}, got {tuple(mask.shape)}")
    m = mask.to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def _same_shape(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: inputs must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
