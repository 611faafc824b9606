"""Audio encoder E_a and the audio-to-mouth head MLP_A^m (Sec. 3.3, Eq. 11).

E_a reads one mel window per video frame (the contract's [80, 16] log-mel window centred on the frame, 200 ms)
and returns one feature f^a_t per frame. A 2D conv stack over (mel bins, time) with residual blocks; strides
halve the frequency axis at every stage and the time axis after the first, so 80x16 ends as a small map that a
linear layer flattens into f^a (keeping where in the spectrum and in the window energy sits). ``AudioToMouth``
adds the linear (or MLP) head that predicts the mouth-bank weights Ŵ^m. The same per-frame features condition the
pose and eye flows (``AudioEncoder.features``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn


def _flat_from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class AudioEncoderConfig:
    """E_a: per-frame mel window -> audio feature f^a."""

    n_mels: int = 80  # mel bins of a window (contract: 80)
    window: int = 16  # mel frames per video frame's window (contract: 16)
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)  # conv stage widths; stage i>0 downsamples
    feature_dim: int = 512  # size of f^a
    blocks_per_stage: int = 1  # residual blocks after each stage's strided conv
    norm: str = "batch"  # "batch" (Wav2Lip's), "group" or "none"; see make_norm for why batch is the default
    norm_groups: int = 8  # groups when norm == "group"
    # "ours": the stack above; "wav2lip": the reference Audio2Lip's Wav2Lip audio encoder (13 conv + BatchNorm +
    # ReLU layers, fixed widths, 80x16 -> 512; `channels`/`blocks_per_stage`/`norm` are then unused).
    architecture: str = "ours"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"AudioEncoderConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if self.architecture == "wav2lip" and (self.n_mels, self.window, self.feature_dim) != (80, 16, 512):
            raise ValueError(
                "AudioEncoderConfig: the wav2lip encoder needs n_mels 80, window 16, feature_dim 512"
            )
        if self.n_mels < 8 or self.window < 4:
            raise ValueError(
                f"AudioEncoderConfig: n_mels >= 8 and window >= 4 needed, got {self.n_mels}, {self.window}"
            )
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"AudioEncoderConfig.channels must be positive widths, got {self.channels}")
        if self.norm not in NORMS:
            raise ValueError(f"AudioEncoderConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm == "group" and any(c % self.norm_groups for c in self.channels):
            raise ValueError(
                f"AudioEncoderConfig: every channel width {self.channels} must be divisible by norm_groups "
                f"{self.norm_groups}"
            )
        if self.feature_dim <= 0 or self.blocks_per_stage < 0:
            raise ValueError("AudioEncoderConfig: feature_dim must be > 0 and blocks_per_stage >= 0")

    @classmethod
    def tiny(cls) -> AudioEncoderConfig:
        return cls(channels=(8, 16, 32, 32), feature_dim=64, blocks_per_stage=1, norm_groups=4)

    @classmethod
    def paper(cls) -> AudioEncoderConfig:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioEncoderConfig:
        return _flat_from_dict(cls, data)


def _stage_stride(i: int) -> tuple[int, int]:
    # Stage 0 keeps resolution; then frequency halves every stage, time from stage 2 on (16 -> 8 -> 4 -> 2).
    if i == 0:
        return (1, 1)
    return (2, 1) if i == 1 else (2, 2)


def _output_hw(n_mels: int, window: int, n_stages: int) -> tuple[int, int]:
    h, w = n_mels, window
    for i in range(n_stages):
        sh, sw = _stage_stride(i)
        # conv k=3, padding=1: out = floor((in - 1) / s) + 1
        h, w = (h - 1) // sh + 1, (w - 1) // sw + 1
    return h, w


NORMS = ("batch", "group", "none")
ARCHITECTURES = ("ours", "wav2lip")

# The Wav2Lip audio encoder of the reference Audio2Lip: (in, out, kernel, stride, padding, residual) per layer.
WAV2LIP_LAYERS: tuple[tuple[int, int, int, Any, int, bool], ...] = (
    (1, 32, 3, 1, 1, False),
    (32, 32, 3, 1, 1, True),
    (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False),
    (64, 64, 3, 1, 1, True),
    (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False),
    (128, 128, 3, 1, 1, True),
    (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False),
    (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False),
    (512, 512, 1, 1, 0, False),
)


class Wav2LipConv(nn.Module):
    """conv (bias) -> BatchNorm -> (+ input when residual) -> ReLU, the ReLU after the residual add."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: Any, padding: int, residual: bool) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        return torch.relu(out + x if self.residual else out)


def make_norm(kind: str, ch: int, groups: int) -> nn.Module:
    """The normalisation after a conv. BatchNorm is the default because GroupNorm normalises each sample on its
    own and so discards its overall level (a clip's loudness, a crop's brightness), a cue for mouth opening.
    BatchNorm's running statistics make train/eval matter: frozen copies must be kept in eval mode."""
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(groups, ch)
    return nn.Identity()


class ResidualBlock(nn.Module):
    """x -> act(x + N(conv(act(N(conv(x)))))), width and size kept; shared by E_a and SyncNet's face branch."""

    def __init__(self, ch: int, norm: str = "batch", groups: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1),
            make_norm(norm, ch, groups),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch, 3, padding=1),
            make_norm(norm, ch, groups),
        )
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class AudioEncoder(nn.Module):
    """E_a. forward: [B,80,16] -> [B,C] or [B,T,80,16] -> [B,T,C] (C = feature_dim)."""

    def __init__(self, config: AudioEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or AudioEncoderConfig()
        if cfg.architecture == "wav2lip":
            self.convs = nn.Sequential(*(Wav2LipConv(*spec) for spec in WAV2LIP_LAYERS))
            self.proj = nn.Flatten(1)
            return
        layers: list[nn.Module] = []
        in_ch = 1
        for i, ch in enumerate(cfg.channels):
            layers += [
                nn.Conv2d(in_ch, ch, 3, stride=_stage_stride(i), padding=1),
                make_norm(cfg.norm, ch, cfg.norm_groups),
                nn.LeakyReLU(0.2),
            ]
            layers += [ResidualBlock(ch, cfg.norm, cfg.norm_groups) for _ in range(cfg.blocks_per_stage)]
            in_ch = ch
        self.convs = nn.Sequential(*layers)
        h, w = _output_hw(cfg.n_mels, cfg.window, len(cfg.channels))
        self.proj = nn.Sequential(nn.Flatten(1), nn.Linear(in_ch * h * w, cfg.feature_dim), nn.LeakyReLU(0.2))

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def _check(self, mel: torch.Tensor) -> None:
        cfg = self.config
        if mel.dim() not in (3, 4) or tuple(mel.shape[-2:]) != (cfg.n_mels, cfg.window):
            raise ValueError(
                f"AudioEncoder expects mel windows [B,{cfg.n_mels},{cfg.window}] or [B,T,{cfg.n_mels},{cfg.window}] "
                f"(one window per video frame, as preprocessing writes them); got {tuple(mel.shape)}"
            )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        self._check(mel)
        lead = mel.shape[:-2]
        x = mel.reshape(-1, 1, *mel.shape[-2:])
        f = self.proj(self.convs(x))
        return f.reshape(*lead, f.shape[-1])

    def features(self, mel: torch.Tensor) -> torch.Tensor:
        """Per-frame f^a for the flows' conditioning: [B,T,80,16] -> [B,T,C]; [B,80,16] -> [B,1,C]."""
        self._check(mel)
        f = self.forward(mel)
        return f.unsqueeze(1) if mel.dim() == 3 else f


@dataclass
class AudioToMouthConfig:
    """E_a + MLP_A^m: mel windows -> mouth-bank weights Ŵ^m (Eq. 11)."""

    encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)  # E_a
    n_mouth: int = 20  # mouth bank size n_m (paper: 20); must equal the visual MLN's
    head_hidden: tuple[int, ...] = ()  # hidden widths of MLP_A^m; () = one linear layer, as the paper says

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = AudioEncoderConfig.from_dict(self.encoder)
        if not isinstance(self.encoder, AudioEncoderConfig):
            raise ValueError(
                f"AudioToMouthConfig.encoder must be an AudioEncoderConfig, got {type(self.encoder)}"
            )
        if self.n_mouth <= 0 or any(h <= 0 for h in self.head_hidden):
            raise ValueError(
                f"AudioToMouthConfig: n_mouth and head_hidden widths must be > 0, got {self.n_mouth}, "
                f"{self.head_hidden}"
            )

    @classmethod
    def tiny(cls) -> AudioToMouthConfig:
        return cls(encoder=AudioEncoderConfig.tiny(), n_mouth=20)

    @classmethod
    def paper(cls) -> AudioToMouthConfig:
        return cls(encoder=AudioEncoderConfig.paper(), n_mouth=20)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioToMouthConfig:
        data = dict(data)
        if "encoder" in data:
            data["encoder"] = AudioEncoderConfig.from_dict(data["encoder"])
        return _flat_from_dict(cls, data)


class AudioToMouth(nn.Module):
    """Ŵ^m = MLP_A^m(E_a(a)). forward: [B,T,80,16] -> [B,T,n_mouth] (or [B,80,16] -> [B,n_mouth])."""

    def __init__(self, config: AudioToMouthConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or AudioToMouthConfig.paper()
        self.encoder = AudioEncoder(cfg.encoder)
        head: list[nn.Module] = []
        width = cfg.encoder.feature_dim
        for h in cfg.head_hidden:
            head += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        head.append(nn.Linear(width, cfg.n_mouth))
        self.head = nn.Sequential(*head)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(mel))

    def features(self, mel: torch.Tensor) -> torch.Tensor:
        """The per-frame audio features f^a, [B,T,C] (see ``AudioEncoder.features``)."""
        return self.encoder.features(mel)
