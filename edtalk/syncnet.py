"""SyncNet: the lip-sync expert, trained on our own data (Sec. 3.3, Eq. 12; Sync confidence metric).

Inputs (our choices):
* video: ``n_frames`` (5) consecutive mouth crops, the lower half of the face crop resized to
  ``mouth_height x mouth_width`` (24x48 tiny, 48x96 paper), RGB in [-1,1] (grey if ``color="gray"``), stacked on
  channels. ``crop_mouths`` cuts them, from the fixed lower half or around the mouth landmarks.
* audio: the contract's per-frame mel window [80, 16] of the CENTRE frame of the 5 (index s+2 for frames s..s+4).
  16 mel frames at 80 frames/s are 200 ms, the same span as 5 video frames at 25 fps, centred on the same instant,
  so no re-windowing of the stored mel is needed: ``sync_windows`` pairs them.

Both branches end in ReLU then L2 normalisation (as Wav2Lip's expert), so the cosine score is in [0, 1] and is
trained with BCE against in-sync (1) / shifted (0) labels (``losses.sync_bce_loss``). ``confidence`` gives the
SyncNet-style offset search (Chung & Zisserman): the mean embedding distance at every audio offset within ±k frames,
confidence = median - min distance, offset = argmin. Our embeddings are unit vectors, so the numbers are on our
own scale (distances in [0, √2]), not comparable with the published SyncNet's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edtalk.audio_encoder import NORMS, AudioEncoder, AudioEncoderConfig, ResidualBlock, make_norm

MOUTH_POINTS = tuple(range(48, 68))  # 68-point iBUG mouth
_GRAY = (0.299, 0.587, 0.114)


@dataclass
class SyncNetConfig:
    """Lip-sync expert: mouth-crop sequence encoder + mel encoder -> unit embeddings."""

    n_frames: int = 5  # video frames per sample; the audio is the centre frame's 16-mel window
    mouth_height: int = 48  # mouth crop height (lower half of the face crop, resized)
    mouth_width: int = 96  # mouth crop width
    color: str = "rgb"  # "rgb" or "gray" mouth crops (RGB input is converted when "gray")
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)  # face encoder stage widths; stage i>0 halves H and W
    embed_dim: int = 512  # size of both embeddings
    norm: str = "batch"  # face encoder normalisation: "batch", "group" or "none" (audio_encoder.make_norm)
    norm_groups: int = 8  # groups when norm == "group"
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)  # the mel branch (its own weights)

    def __post_init__(self) -> None:
        if isinstance(self.audio, dict):
            self.audio = AudioEncoderConfig.from_dict(self.audio)
        if self.n_frames < 1 or self.n_frames % 2 == 0:
            raise ValueError(f"SyncNetConfig.n_frames must be odd (a centre frame), got {self.n_frames}")
        if self.mouth_height < 8 or self.mouth_width < 8:
            raise ValueError(
                f"SyncNetConfig: mouth crop must be at least 8x8, got {self.mouth_height}x{self.mouth_width}"
            )
        if self.color not in ("rgb", "gray"):
            raise ValueError(f"SyncNetConfig.color must be 'rgb' or 'gray', got {self.color!r}")
        if self.norm not in NORMS:
            raise ValueError(f"SyncNetConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"SyncNetConfig.channels must be positive widths, got {self.channels}")
        if self.norm == "group" and any(c % self.norm_groups for c in self.channels):
            raise ValueError(
                f"SyncNetConfig.channels {self.channels} must be divisible by norm_groups {self.norm_groups}"
            )
        if self.embed_dim <= 0:
            raise ValueError(f"SyncNetConfig.embed_dim must be > 0, got {self.embed_dim}")

    @property
    def in_channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    @classmethod
    def tiny(cls) -> SyncNetConfig:
        return cls(
            mouth_height=24,
            mouth_width=48,
            channels=(16, 32, 64, 64),
            embed_dim=64,
            norm_groups=4,
            audio=AudioEncoderConfig.tiny(),
        )

    @classmethod
    def paper(cls) -> SyncNetConfig:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyncNetConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"SyncNetConfig: unknown keys {unknown}; known keys are {sorted(names)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "audio" in data:
            data["audio"] = AudioEncoderConfig.from_dict(data["audio"])
        return cls(**data)


@dataclass
class SyncConfidence:
    """Result of the offset search, one entry per video: see ``SyncNet.confidence``."""

    offset: torch.Tensor  # [B] long: audio shift (frames) with the smallest distance; > 0: audio lags video
    confidence: torch.Tensor  # [B]: median distance - minimum distance over offsets
    min_distance: torch.Tensor  # [B]: the minimum mean distance
    distances: torch.Tensor  # [B, 2k+1]: mean distance per offset -k..k


def crop_mouths(
    faces: torch.Tensor,
    size: tuple[int, int],
    landmarks: torch.Tensor | None = None,
    margin: float = 1.6,
) -> torch.Tensor:
    """Mouth crops of face crops, differentiable in the images.

    faces: [..., 3, S, S] in [-1,1]; size: (height, width) of the crops. Without landmarks: the lower half of the
    face crop (rows S/2..S, full width), the Wav2Lip convention for FOMM-aligned crops. With landmarks [..., 68, 2]
    (x, y crop pixels): a box of aspect height:width = size centred on the mouth points' centre, as wide as
    ``margin`` x the mouth's width (mouth corners move little while speaking), cut per frame.
    """
    if faces.dim() < 4 or faces.shape[-3] not in (1, 3):
        raise ValueError(f"crop_mouths: faces must be [...,C,H,W] with C 1 or 3, got {tuple(faces.shape)}")
    lead = faces.shape[:-3]
    x = faces.reshape(-1, *faces.shape[-3:])
    h, w = x.shape[-2:]
    if landmarks is None:
        half = x[..., h // 2 :, :]
        out = F.interpolate(half, size=size, mode="bilinear", align_corners=False, antialias=True)
        return out.reshape(*lead, *out.shape[-3:])
    if landmarks.shape[:-2] != lead or tuple(landmarks.shape[-2:]) != (68, 2):
        raise ValueError(
            f"crop_mouths: landmarks must be [...,68,2] matching faces' leading shape {tuple(lead)}, "
            f"got {tuple(landmarks.shape)}"
        )
    pts = landmarks.reshape(-1, 68, 2)[:, list(MOUTH_POINTS)].to(x.dtype)
    centre = pts.mean(dim=1)  # [N,2] pixels
    box_w = margin * (pts[..., 0].amax(1) - pts[..., 0].amin(1)).clamp_min(4.0)
    box_h = box_w * size[0] / size[1]
    # affine_grid maps output [-1,1] to input normalised coords (align_corners=False: pixel centres at (i+0.5)).
    theta = x.new_zeros(x.shape[0], 2, 3)
    theta[:, 0, 0] = box_w / w
    theta[:, 1, 1] = box_h / h
    theta[:, 0, 2] = (centre[:, 0] + 0.5) * 2.0 / w - 1.0
    theta[:, 1, 2] = (centre[:, 1] + 0.5) * 2.0 / h - 1.0
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def sync_windows(
    mouths: torch.Tensor, mel: torch.Tensor, n_frames: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """All in-sync training samples of clips: mouths [B,T,C,H,W], mel [B,T,80,16] ->
    (video [B,N,n,C,H,W], audio [B,N,80,16]) with N = T-n+1; sample s holds frames s..s+n-1 and mel window s+n//2.
    """
    if mouths.dim() != 5 or mel.dim() != 4 or mouths.shape[:2] != mel.shape[:2]:
        raise ValueError(
            f"sync_windows: mouths [B,T,C,H,W] and mel [B,T,80,16] with the same B,T expected, got "
            f"{tuple(mouths.shape)} and {tuple(mel.shape)}"
        )
    t = mouths.shape[1]
    if t < n_frames:
        raise ValueError(f"sync_windows: clips of {t} frames are shorter than a {n_frames}-frame sync window")
    video = mouths.unfold(1, n_frames, 1).permute(0, 1, 5, 2, 3, 4)  # [B,N,C,H,W,n] -> [B,N,n,C,H,W]
    c = n_frames // 2
    return video, mel[:, c : t - c]


def offset_distances(
    video_emb: torch.Tensor, audio_emb: torch.Tensor, centre: int, max_offset: int
) -> torch.Tensor:
    """Mean distance between video window s and audio frame s+centre+o, for o in -k..k -> [B, 2k+1].

    video_emb [B,N,E] (window s), audio_emb [B,T,E] (frame t); pairs falling outside the clip are left out.
    """
    b, n, _ = video_emb.shape
    t = audio_emb.shape[1]
    out = video_emb.new_full((b, 2 * max_offset + 1), float("nan"))
    s = torch.arange(n, device=video_emb.device)
    for i, o in enumerate(range(-max_offset, max_offset + 1)):
        idx = s + centre + o
        valid = (idx >= 0) & (idx < t)
        if valid.any():
            d = (video_emb[:, valid] - audio_emb[:, idx[valid]]).norm(dim=-1)
            out[:, i] = d.mean(dim=1)
    if torch.isnan(out).any():
        raise ValueError(
            f"offset search ±{max_offset} frames is too wide for clips of {t} frames: lower max_offset"
        )
    return out


class SyncNet(nn.Module):
    """forward(mouths [B,n,C,h,w], mel [B,80,16]) -> cosine score [B] in [0,1] (1 = in sync)."""

    def __init__(self, config: SyncNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SyncNetConfig()
        layers: list[nn.Module] = []
        in_ch = cfg.n_frames * cfg.in_channels
        h, w = cfg.mouth_height, cfg.mouth_width
        for i, ch in enumerate(cfg.channels):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(in_ch, ch, 3, stride=stride, padding=1),
                make_norm(cfg.norm, ch, cfg.norm_groups),
            ]
            layers += [nn.LeakyReLU(0.2), ResidualBlock(ch, cfg.norm, cfg.norm_groups)]
            in_ch = ch
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        self.face_encoder = nn.Sequential(*layers, nn.Flatten(1), nn.Linear(in_ch * h * w, cfg.embed_dim))
        self.audio_encoder = AudioEncoder(cfg.audio)
        self.audio_head = nn.Linear(cfg.audio.feature_dim, cfg.embed_dim)

    def _prepare_video(self, mouths: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if (
            mouths.dim() != 5
            or mouths.shape[1] != cfg.n_frames
            or mouths.shape[2] not in (1, 3)
            or tuple(mouths.shape[-2:]) != (cfg.mouth_height, cfg.mouth_width)
        ):
            raise ValueError(
                f"SyncNet video must be [B,{cfg.n_frames},3,{cfg.mouth_height},{cfg.mouth_width}] mouth crops "
                f"(see crop_mouths), got {tuple(mouths.shape)}"
            )
        if cfg.color == "gray" and mouths.shape[2] == 3:
            wts = mouths.new_tensor(_GRAY).view(1, 1, 3, 1, 1)
            mouths = (mouths * wts).sum(dim=2, keepdim=True)
        elif cfg.color == "rgb" and mouths.shape[2] != 3:
            raise ValueError("SyncNet is configured for RGB mouth crops but got 1 channel")
        return mouths.flatten(1, 2)

    def embed_video(self, mouths: torch.Tensor) -> torch.Tensor:
        """[B,n,C,h,w] -> unit, non-negative embeddings [B,E]."""
        return F.normalize(F.relu(self.face_encoder(self._prepare_video(mouths))), dim=-1, eps=1e-6)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """[B,80,16] (or [B,T,80,16]) -> unit, non-negative embeddings [B,E] (or [B,T,E])."""
        return F.normalize(F.relu(self.audio_head(self.audio_encoder(mel))), dim=-1, eps=1e-6)

    def forward(self, mouths: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        return (self.embed_video(mouths) * self.embed_audio(mel)).sum(dim=-1)

    @torch.no_grad()
    def confidence(self, mouths: torch.Tensor, mel: torch.Tensor, max_offset: int = 15) -> SyncConfidence:
        """Sync offset and confidence of whole clips.

        mouths: per-frame mouth crops [T,C,h,w] or [B,T,C,h,w]; mel: per-frame windows [T,80,16] or [B,T,80,16].
        At every offset only the pairs inside the clip are averaged, so T must exceed n_frames + 2*max_offset
        roughly; the default ±15 frames (0.6 s) is the original SyncNet's search width.
        """
        if mouths.dim() == 4:
            mouths, mel = mouths.unsqueeze(0), mel.unsqueeze(0)
        was_training = self.training
        self.eval()
        try:
            n = self.config.n_frames
            video, _ = sync_windows(mouths, mel, n)
            b, nw = video.shape[:2]
            v = self.embed_video(video.flatten(0, 1)).view(b, nw, -1)
            a = self.embed_audio(mel)
            dists = offset_distances(v, a, centre=n // 2, max_offset=max_offset)
        finally:
            self.train(was_training)
        best, arg = dists.min(dim=1)
        return SyncConfidence(
            offset=arg - max_offset,
            confidence=dists.median(dim=1).values - best,
            min_distance=best,
            distances=dists,
        )
