"""ModelConfig: every size of every network, as typed data. `ModelConfig.preset("paper" | "tiny")`.

One code path builds both presets; only these numbers differ. `to_dict()`/`from_dict()` round-trip through JSON.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from edtalk.navigation import SPACES

# Widths from 4x4 up to SxS (index i = resolution 4 * 2**i); the paper's are the reference's StyleGAN2 widths.
PAPER_CHANNELS: tuple[int, ...] = (512, 512, 512, 512, 256, 128, 64)
TINY_CHANNELS: tuple[int, ...] = (64, 64, 64, 32, 16)

# The audio-to-motion sub-configs: (field, module, class). Each class offers tiny() and paper() (the flows take
# the size of the bank they model) and from_dict().
AUDIO_CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("audio_to_mouth", "edtalk.audio_encoder", "AudioToMouthConfig"),
    ("syncnet", "edtalk.syncnet", "SyncNetConfig"),
    ("pose_flow", "edtalk.flow", "ConditionalFlowConfig"),
    ("eye_flow", "edtalk.flow", "ConditionalFlowConfig"),
    ("expression_predictor", "edtalk.expression_predictor", "ExpressionPredictorConfig"),
)


# (audio sub-config, its output-size field, the bank it drives)
BANK_DRIVERS: tuple[tuple[str, str, str], ...] = (
    ("audio_to_mouth", "n_mouth", "mouth"),
    ("pose_flow", "dim", "pose"),
    ("eye_flow", "dim", "eye"),
    ("expression_predictor", "n_out", "expression"),
)


def _choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")


def _blur_ok(taps: tuple[int, ...], where: str) -> None:
    if len(taps) < 2 or any(t <= 0 for t in taps):
        raise ValueError(f"{where}.blur_kernel must be >= 2 positive taps, got {taps}")


@dataclass
class EncoderConfig:
    """Encoder E (StyleGAN2-discriminator-style trunk)."""

    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)  # FIR taps of the anti-aliasing blur before each downsampling

    def __post_init__(self) -> None:
        self.blur_kernel = tuple(int(t) for t in self.blur_kernel)
        _blur_ok(self.blur_kernel, "encoder")


@dataclass
class GeneratorConfig:
    """Generator G (StyleGAN2 synthesis with per-scale flow heads)."""

    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)  # FIR taps of the upsampling filters
    # The finest N scales whose ToRGB sees the blend of warped identity and generated features (so G can paint
    # what no identity feature shows, e.g. the inside of a mouth that is closed in the identity image); the other
    # scales' ToRGB sees the masked warp only (LIA). 0 = warped features only.
    paint_scales: int = 0
    # "modulated": ours (style-modulated 1x1 conv + bias); "reference": the EDTalk/LIA reference's ToRGB
    # (plain 1x1 EqualConv2d -> FusedLeakyReLU -> + bias, no style).
    to_rgb: str = "modulated"
    # "align_corners": ours (linspace grid samples pixel centres exactly); "reference": the EDTalk/LIA reference's
    # warp (float64 linspace base grid cast to float32, grid_sample with align_corners=False).
    warp: str = "align_corners"

    def __post_init__(self) -> None:
        self.blur_kernel = tuple(int(t) for t in self.blur_kernel)
        _blur_ok(self.blur_kernel, "generator")
        if int(self.paint_scales) < 0:
            raise ValueError(f"generator.paint_scales must be >= 0, got {self.paint_scales}")
        _choice(self.to_rgb, ("modulated", "reference"), "generator.to_rgb")
        _choice(self.warp, ("align_corners", "reference"), "generator.warp")


@dataclass
class NavigationConfig:
    """Latent navigation: bank sizes per space, the shared trunk and per-space heads, the LIA bank."""

    mouth: int = 20  # n_m, mouth bases (MLN); paper: 20
    pose: int = 6  # n_p, pose bases (PLN); paper: 6
    eye: int = 6  # n_eye, eye bases (EYLN, EDTalk++; not published, ours is a parameter)
    expression: int = 10  # n_e, expression bases (EXLN); paper: 10
    trunk_layers: int = 4  # linear layers of the shared MLP trunk (reference: 4)
    head_layers: int = 3  # linear layers of each space's head, the last one to n_s (reference: 3)
    lia_bases: int = 20  # motion bases of the single LIA bank of the autoencoder stage
    lia_head_layers: int = 1  # linear layers of the LIA head after its own trunk (LIA: 1)
    # False: ours (leaky ReLU between the MLP layers); True: the EDTalk/LIA reference's purely linear trunk,
    # heads and LIA motion MLP (no activation anywhere).
    linear: bool = False
    # "blocks": ours (block QR, diag(R) > 0, a later bank never moves an earlier one); "joint": the EDTalk/LIA
    # reference's single Householder QR of [mouth | pose | (eye) | expression] + 1e-8 with LAPACK's raw signs.
    qr: str = "blocks"

    def __post_init__(self) -> None:
        # A space of size 0 is absent (the reference EDTalk.pt has no eye space, EDTalk_lip_pose.pt no
        # expression space); mouth and pose are always present.
        for name in ("mouth", "pose", "lia_bases"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"navigation.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eye", "expression"):
            if int(getattr(self, name)) < 0:
                raise ValueError(
                    f"navigation.{name} must be >= 0 (0 = no such space), got {getattr(self, name)}"
                )
        _choice(self.qr, ("blocks", "joint"), "navigation.qr")
        for name in ("trunk_layers", "head_layers", "lia_head_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"navigation.{name} must be >= 1, got {getattr(self, name)}")

    def num_bases(self) -> dict[str, int]:
        return {s: int(getattr(self, s)) for s in SPACES}


@dataclass
class EEMConfig:
    """Emotion Enhancement Module (Eq. 8)."""

    enabled: bool = True  # build the EEM (False: the expression space still shifts the latent, no AdaIN)
    hidden: int = 128  # hidden width of each AdaIN's condition MLP (reference: 128)
    # "full": ours (both AdaIN-modulated convs act, equalized layers, leaky ReLU); "reference": the EDTalk
    # reference as released (conv1/norm1 branch overwritten, out = x + AdaIN2(conv2(x)), nn.Conv2d/nn.Linear,
    # ReLU in the condition MLP).
    variant: str = "full"

    def __post_init__(self) -> None:
        if int(self.hidden) < 1:
            raise ValueError(f"eem.hidden must be >= 1, got {self.hidden}")
        _choice(self.variant, ("full", "reference"), "eem.variant")


@dataclass
class DiscriminatorConfig:
    """Discriminator D (StyleGAN2-style)."""

    stddev_group: int = 4  # samples per minibatch-stddev group
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)  # FIR taps before each downsampling

    def __post_init__(self) -> None:
        self.blur_kernel = tuple(int(t) for t in self.blur_kernel)
        _blur_ok(self.blur_kernel, "discriminator")
        if int(self.stddev_group) < 1:
            raise ValueError(f"discriminator.stddev_group must be >= 1, got {self.stddev_group}")


@dataclass
class ModelConfig:
    """All sizes of the EDTalk / EDTalk++ model. Build with `ModelConfig.preset(name)` and override fields."""

    image_size: int = 64  # S: square input/output side in pixels, a power of two >= 8
    latent_dim: int = 64  # D: dimension of latents f^{*->r} and of every basis
    channels: tuple[int, ...] = TINY_CHANNELS  # widths at 4x4, 8x8, ..., SxS (log2(S) - 1 entries)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # E
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)  # G
    navigation: NavigationConfig = field(default_factory=NavigationConfig)  # MLN/PLN/EYLN/EXLN + LIA bank
    eem: EEMConfig = field(default_factory=EEMConfig)  # EEM
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)  # D
    audio_to_mouth: Any = None  # AudioToMouthConfig (E_a + mouth head); None: not built
    syncnet: Any = None  # SyncNetConfig (lip-sync expert); None: not built
    pose_flow: Any = None  # ConditionalFlowConfig of the audio-to-pose flow; None: not built
    eye_flow: Any = None  # ConditionalFlowConfig of the audio-to-eye flow; None: not built
    expression_predictor: Any = None  # ExpressionPredictorConfig (HuBERT + RoBERTa + MLP); None: disabled

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        if isinstance(self.generator, dict):
            self.generator = GeneratorConfig(**self.generator)
        if isinstance(self.navigation, dict):
            self.navigation = NavigationConfig(**self.navigation)
        if isinstance(self.eem, dict):
            self.eem = EEMConfig(**self.eem)
        if isinstance(self.discriminator, dict):
            self.discriminator = DiscriminatorConfig(**self.discriminator)
        for name, module, cls in AUDIO_CONFIGS:
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _audio_from_dict(_audio_class(module, cls), value, f"model.{name}"))
        s = int(self.image_size)
        if s < 8 or s & (s - 1):
            raise ValueError(f"model.image_size must be a power of two >= 8, got {self.image_size}")
        self.channels = tuple(int(c) for c in self.channels)
        levels = int(math.log2(s)) - 1
        if len(self.channels) != levels or any(c < 1 for c in self.channels):
            raise ValueError(
                f"model.channels must list {levels} positive widths (4x4 .. {s}x{s}) for image_size {s}, "
                f"got {self.channels}"
            )
        self._check_audio_sizes()
        total = sum(self.navigation.num_bases().values())
        if total > self.latent_dim or self.navigation.lia_bases > self.latent_dim:
            raise ValueError(
                f"model.latent_dim={self.latent_dim} is too small: the banks need {total} orthogonal bases "
                f"(LIA: {self.navigation.lia_bases}); raise latent_dim or lower the bank sizes"
            )

    def _check_audio_sizes(self) -> None:
        """The audio-to-motion outputs must match the banks they drive."""
        for fname, attr, space in BANK_DRIVERS:
            sub = getattr(self, fname)
            want = int(getattr(self.navigation, space))
            if sub is not None and hasattr(sub, attr) and int(getattr(sub, attr)) != want:
                raise ValueError(
                    f"model.{fname}.{attr}={getattr(sub, attr)} must equal navigation.{space}={want} "
                    "(the bank it drives)"
                )
        if self.audio_to_mouth is not None:
            feat = self.audio_to_mouth.encoder.feature_dim
            for fname in ("pose_flow", "eye_flow"):
                sub = getattr(self, fname)
                if sub is not None and sub.cond_dim != feat:
                    raise ValueError(
                        f"model.{fname}.cond_dim={sub.cond_dim} must equal the audio feature size "
                        f"model.audio_to_mouth.encoder.feature_dim={feat}"
                    )

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """ "paper": 256x256, D=512, the reference's widths. "tiny": 64x64, D=64, CPU-test sized.
        "reference": the paper sizes with every switch set to the authors' released EDTalk.pt (edtalk/reference).
        """
        if name == "reference":
            from edtalk.reference.config import reference_config

            return reference_config()
        if name == "paper":
            cfg = cls(image_size=256, latent_dim=512, channels=PAPER_CHANNELS)
        elif name == "tiny":
            cfg = cls(image_size=64, latent_dim=64, channels=TINY_CHANNELS)
        else:
            raise ValueError(f"unknown model preset {name!r}; choose 'paper', 'tiny' or 'reference'")
        bank_dims = {"pose_flow": cfg.navigation.pose, "eye_flow": cfg.navigation.eye}
        for fname, module, clsname in AUDIO_CONFIGS:
            audio_cls = _audio_class(module, clsname, required=False)
            if audio_cls is not None:
                make = getattr(audio_cls, name)
                setattr(cfg, fname, make(bank_dims[fname]) if fname in bank_dims else make())
        if cfg.pose_flow is not None and cfg.audio_to_mouth is not None:
            # The flows are conditioned on E_a's features f^a.
            feat = cfg.audio_to_mouth.encoder.feature_dim
            cfg.pose_flow.cond_dim = cfg.eye_flow.cond_dim = feat
        cfg.__post_init__()
        return cfg

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> ModelConfig:
        """The `model:` section of params.yaml -> config: `preset` plus nested `overrides` merged on top."""
        unknown = sorted(set(section) - {"preset", "overrides"})
        if unknown:
            raise ValueError(f"params model: unknown keys {unknown}; valid keys: ['overrides', 'preset']")
        overrides = section.get("overrides") or {}
        merged = _deep_merge(
            cls.preset(str(section.get("preset", "tiny"))).to_dict(), overrides, "model.overrides"
        )
        # A bank resized in navigation resizes the audio-to-motion output that drives it, unless set explicitly.
        for fname, attr, space in BANK_DRIVERS:
            sub = merged.get(fname)
            if isinstance(sub, dict) and attr in sub and attr not in (overrides.get(fname) or {}):
                sub[attr] = merged["navigation"][space]
        return cls.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return _jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict; unknown keys are an error (a typo must not be silently ignored)."""
        return _build_dataclass(cls, data, "model")


def _deep_merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(over, dict):
        raise ValueError(f"{where} must be a mapping, got {type(over).__name__}")
    out = dict(base)
    for key, value in over.items():
        if key not in base:
            raise ValueError(f"{where}: unknown key {key!r}; valid keys: {sorted(base)}")
        if isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = _deep_merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _audio_class(module: str, name: str, required: bool = True) -> type | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        if required:
            raise ValueError(f"config names {module}.{name}, which cannot be imported: {exc}") from exc
        return None


def _audio_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """The sub-config's own from_dict when it has one (it knows its nesting), else the generic rebuild."""
    if hasattr(cls, "from_dict"):
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: invalid {cls.__name__}: {exc}") from exc
    return _build_dataclass(cls, data, where)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj


def _build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Rebuild dataclass `cls` from a plain dict, recursing into nested dataclass fields by their type hints."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints.get(key, Any), value, f"{where}.{key}")
    if cls is ModelConfig:
        for fname, module, clsname in AUDIO_CONFIGS:
            if isinstance(kwargs.get(fname), dict):
                kwargs[fname] = _audio_from_dict(
                    _audio_class(module, clsname), kwargs[fname], f"{where}.{fname}"
                )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: invalid {cls.__name__}: {exc}") from exc


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _build_dataclass(hint, value, where)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        return tuple(value)
    return value
