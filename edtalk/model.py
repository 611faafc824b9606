"""EDTalk: the assembled model (E, G, navigation, EEM, LIA bank, D, and the audio-to-motion modules).

Images are float NCHW RGB in [-1, 1]. The public API (docs/contracts.md):
    ident = model.encode_identity(img)            # reusable across frames; batch 1 broadcasts to N frames
    w = model.extract(frames, spaces=(...))       # {space: (B, n_s)}
    out = model.render(ident, {"mouth": w_m})     # spaces not given come from the identity itself
    model.save_pretrained(path); EDTalk.from_pretrained(path)
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edtalk.config import ModelConfig
from edtalk.discriminator import Discriminator
from edtalk.eem import EEM
from edtalk.encoder import Encoder
from edtalk.generator import Generator
from edtalk.navigation import LatentNavigation, LatentNavigationLIA
from edtalk.ops import count_parameters

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
META_NAME = "meta.json"
EXPRESSION_COMPONENTS = "expression_predictor"  # sub-folder: the predictor's encoder configs + tokenizer
FORMAT_VERSION = 1

# The audio colleague's networks: (attribute, module, class); each takes its config as the only argument.
AUDIO_MODULES: tuple[tuple[str, str, str], ...] = (
    ("audio_to_mouth", "edtalk.audio_encoder", "AudioToMouth"),
    ("syncnet", "edtalk.syncnet", "SyncNet"),
    ("pose_flow", "edtalk.flow", "ConditionalFlow"),
    ("eye_flow", "edtalk.flow", "ConditionalFlow"),
    ("expression_predictor", "edtalk.expression_predictor", "ExpressionPredictor"),
)


@dataclass
class Identity:
    """An encoded identity image: reuse it for every frame rendered of this person.

    latent: f^{i->r} (B, D). features: the skip features f^id at 8x8 .. SxS, coarse to fine.
    weights: the identity's own weights in every space (used for spaces a render call does not drive).
    """

    latent: torch.Tensor
    features: list[torch.Tensor]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    # Inference-only memo of identity-dependent EEM work (filled by EDTalk.render without autograd; keyed by the
    # EEM parameters' versions, so it is never reused after the weights change).
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return int(self.latent.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> Identity:
        return Identity(
            self.latent.to(*args, **kwargs),
            [f.to(*args, **kwargs) for f in self.features],
            {k: v.to(*args, **kwargs) for k, v in self.weights.items()},
        )


class EDTalk(nn.Module):
    """The full EDTalk / EDTalk++ model. Build with `EDTalk(ModelConfig.preset("tiny"))`."""

    def __init__(self, config: ModelConfig, expression_components: str | Path | None = None) -> None:
        """`expression_components`: a folder from ExpressionPredictor.save_components; the predictor is then
        rebuilt from it (architecture only) instead of from its configured checkpoints (what from_pretrained does).
        """
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(
                f"EDTalk needs a ModelConfig, got {type(config).__name__}; use ModelConfig.preset()"
            )
        self.config = config
        c = config
        self.encoder = Encoder(c.image_size, c.channels, c.latent_dim, c.encoder.blur_kernel)
        g = c.generator
        self.generator = Generator(
            c.image_size, c.channels, c.latent_dim, g.blur_kernel, g.paint_scales, g.to_rgb, g.warp
        )
        nav = c.navigation
        self.navigation = LatentNavigation(
            c.latent_dim, nav.num_bases(), nav.trunk_layers, nav.head_layers, nav.linear, nav.qr
        )
        self.eem = EEM(c.channels[1:], c.latent_dim, c.eem.hidden, c.eem.variant) if c.eem.enabled else None
        self.lia = LatentNavigationLIA(
            c.latent_dim, nav.lia_bases, nav.trunk_layers, nav.lia_head_layers, nav.linear, nav.qr
        )
        self.discriminator = Discriminator(
            c.image_size, c.channels, c.discriminator.stddev_group, c.discriminator.blur_kernel
        )
        for attr, module, cls in AUDIO_MODULES:
            sub = getattr(c, attr)
            net_cls = None if sub is None else getattr(importlib.import_module(module), cls)
            if net_cls is None:
                net = None
            elif attr == "expression_predictor" and expression_components is not None:
                net = net_cls.load_components(expression_components, sub)
            else:
                net = net_cls(sub)
            setattr(self, attr, net)
        # Spaces summed into f^{r->d} when a render call does not name them; stages narrow this (stages.py).
        self.active_spaces: tuple[str, ...] = self.navigation.spaces
        # Per-emotion mean expression weights, filled by training (saved in meta.json).
        self.emotion_means: dict[str, list[float]] = {}

    # ---- encoding -------------------------------------------------------------------------------------------
    def _check_images(self, img: torch.Tensor, name: str) -> None:
        s = self.config.image_size
        if not isinstance(img, torch.Tensor) or img.ndim != 4 or img.shape[1] != 3 or img.shape[2:] != (s, s):
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(
                f"{name} must be a float tensor [B, 3, {s}, {s}] (RGB in [-1, 1]), got {shape}; "
                f"resize/crop to the model's image_size {s}"
            )

    def encode_identity(self, img: torch.Tensor) -> Identity:
        """Identity image (B,3,S,S) -> Identity (latent f^{i->r}, skip features f^id, its own weights)."""
        self._check_images(img, "identity image")
        return self.identity_from(*self.encoder(img))

    def identity_from(self, latent: torch.Tensor, features: list[torch.Tensor]) -> Identity:
        """The Identity of an encoder output (latent, skip features): its own weights from the navigation."""
        return Identity(latent, features, self.navigation.weights(latent))

    def extract(self, frames: torch.Tensor, spaces: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Driving frames (B,3,S,S) -> {space: W^s (B, n_s)} for the spaces asked (default: all the model has)."""
        spaces = self.navigation.spaces if spaces is None else spaces
        self.check_extract(frames, spaces)
        latent, _ = self.encoder(frames)
        return self.navigation.weights(latent, tuple(spaces))

    def check_extract(self, frames: torch.Tensor, spaces: Sequence[str]) -> None:
        """The input checks of `extract` (frames' shape, known spaces), shared with the fast path."""
        self._check_images(frames, "driving frames")
        for s in spaces:
            self.navigation.space(s)  # raises a clear KeyError on an unknown space

    def motion_features(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{space: W^s} -> f^{r->d} = sum_s W^s Q^sᵀ (B, D)."""
        if not weights:
            raise ValueError("motion_features needs weights of at least one space")
        return torch.stack(list(self.navigation.motion(weights).values())).sum(0)

    # ---- synthesis ------------------------------------------------------------------------------------------
    def _complete_weights(
        self, identity: Identity, weights: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        unknown = [s for s in weights if s not in self.navigation.spaces]
        if unknown:
            raise KeyError(
                f"render: unknown spaces {unknown}; this model's spaces are {self.navigation.spaces}"
            )
        sizes = {int(w.shape[0]) for w in weights.values()} | {identity.batch_size}
        n = max(sizes)
        if len(sizes - {1}) > 1:
            raise ValueError(
                f"render: batch sizes {sorted(sizes)} disagree (identity and weights must match or be 1)"
            )
        full = {}
        for s in self.navigation.spaces:
            if s in weights:
                w = weights[s]
            elif s in self.active_spaces:
                w = identity.weights.get(s)
                if w is None:
                    raise ValueError(f"render: no weights for space {s!r} and the identity carries none")
            else:
                continue
            full[s] = w.expand(n, -1) if w.shape[0] != n else w
        return full

    def render(self, identity: Identity, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Render frames: f^{i->d} = f^{i->r} + sum_s f^{r->s}, identity features (EEM-conditioned when the
        expression space takes part), through G. Spaces not given take the identity's own weights.
        """
        latent, motion = self.driving_latent(identity, weights)
        feats = identity.features
        if self.eem is not None and "expression" in motion:
            feats = self._eem_features(identity, motion["expression"])
        return self.generator(latent, feats)

    def driving_latent(
        self, identity: Identity, weights: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(f^{i->d} (N,D), per-space f^{r->s}): the identity's latent plus the motion of every space, the spaces
        not given taking the identity's own weights. Shared by `render` and the inference FastRenderer."""
        full = self._complete_weights(identity, weights)
        motion = self.navigation.motion(full)
        n = next(iter(full.values())).shape[0]
        latent = identity.latent
        if latent.shape[0] != n:
            latent = latent.expand(n, -1)
        return latent + torch.stack(list(motion.values())).sum(0), motion

    def _eem_features(self, identity: Identity, f_e: torch.Tensor) -> list[torch.Tensor]:
        """EEM(f^id, f^{r->e}); without autograd, the identity-only part (and the whole result for a repeated
        expression) is memoised on the Identity."""
        if torch.is_grad_enabled() or identity.batch_size != 1:
            return self.eem(identity.features, f_e)
        key = (tuple(p._version for p in self.eem.parameters()), f_e.dtype, f_e.device)
        cache = identity.cache
        if cache.get("eem_key") != key:
            cache.clear()
            cache["eem_key"] = key
            cache["eem_prepared"] = self.eem.prepare(identity.features)
        constant = bool((f_e == f_e[:1]).all())
        last = cache.get("eem_last")
        if constant and last is not None and torch.equal(last[0], f_e[:1]):
            return [f.expand(f_e.shape[0], -1, -1, -1) for f in last[1]]
        out = self.eem(identity.features, f_e, cache["eem_prepared"])
        if constant:
            cache["eem_last"] = (f_e[:1].clone(), [f[:1] for f in out])
        return out

    def fast_renderer(self, **options: Any):
        """The inference fast path for this model (edtalk/fast.py): `.render(identity, weights)` equals
        `self.render` within float rounding, several times faster on CPU. Built on first use and cached (the
        options are those of FastRenderer; passing different ones rebuilds it). It rebuilds itself when the
        weights change; training and `self.render` are unaffected."""
        from edtalk.fast import FastRenderer

        cached = self.__dict__.get("_fast_renderer")
        if cached is None or cached[0] != options:
            cached = (dict(options), FastRenderer(self, **options))
            self.__dict__["_fast_renderer"] = cached
        return cached[1]

    def reconstruct_lia(
        self,
        src: torch.Tensor,
        drv: torch.Tensor,
        return_weights: bool = False,
        start_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Autoencoder stage: render src's identity with drv's motion through the single LIA bank (and, with
        `return_weights`, also drv's LIA weights (B, lia_bases)). With `start_weights` (the LIA weights of the
        driving video's first frame), LIA's relative mode: motion = D(drv) - D(start) + D(src)."""
        self._check_images(src, "source image")
        self._check_images(drv, "driving image")
        latent, feats = self.encoder(src)
        drv_latent, _ = self.encoder(drv)
        weights = self.lia.weights(drv_latent)
        motion = self.lia.motion(weights)
        if start_weights is not None:
            motion = (motion - self.lia.motion(start_weights)) + self.lia.motion(self.lia.weights(latent))
        if latent.shape[0] != motion.shape[0]:
            latent = latent.expand(motion.shape[0], -1)
        out = self.generator(latent + motion, feats)
        return (out, weights) if return_weights else out

    def forward(
        self, identity_img: torch.Tensor, driving: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Video-driven pass. `driving` is one frame batch for all active spaces, or {space: frames}, each space
        from its own driving source (e.g. mouth from one video, pose from another).
        """
        identity = self.encode_identity(identity_img)
        if isinstance(driving, torch.Tensor):
            weights = self.extract(driving, self.active_spaces)
        else:
            weights = {}
            for s, frames in driving.items():
                weights.update(self.extract(frames, (s,)))
        return self.render(identity, weights)

    def orthogonality_error(self) -> float:
        """max |QᵀQ - I| over the four banks (the metric of the design)."""
        return self.navigation.orthogonality_error()

    def fixed_parameter_names(self) -> list[str]:
        """Parameters no stage trains, by this config: HuBERT's CNN feature encoder when
        `freeze_feature_encoder`, and the expression predictor's mask vectors when they are fixed zeros.
        """
        ep = self.expression_predictor
        if ep is None:
            return []
        names = []
        if ep.config.freeze_feature_encoder:
            prefix = "expression_predictor.speech_encoder.feature_extractor."
            names += [prefix + n for n, _ in ep.speech_encoder.feature_extractor.named_parameters()]
        if ep.config.mask_embedding != "learned":
            names += ["expression_predictor.speech_mask", "expression_predictor.text_mask"]
        return names

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per network, and the groupings the reference reports.

        generator_with_eem = E + G + navigation + EEM (what inference needs; reference 64.2M);
        decoder_with_eem = G + EEM (reference 39.9M).
        """
        names = ["encoder", "generator", "navigation", "eem", "lia", "discriminator"]
        names += [attr for attr, _, _ in AUDIO_MODULES]
        counts = {n: count_parameters(getattr(self, n)) for n in names}
        counts["decoder_with_eem"] = counts["generator"] + counts["eem"]
        counts["generator_with_eem"] = counts["encoder"] + counts["navigation"] + counts["decoder_with_eem"]
        counts["total"] = count_parameters(self)
        return counts

    # ---- persistence ----------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {
            "format": "edtalk",
            "version": FORMAT_VERSION,
            "active_spaces": list(self.active_spaces),
            "emotion_means": self.emotion_means,
        }

    def save_pretrained(self, path: str | Path) -> Path:
        """Write model.safetensors, config.json, meta.json (and expression_predictor/) into folder `path`."""
        from safetensors.torch import save_model

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        if self.expression_predictor is not None:
            # Encoder configs + tokenizer (JSON), so loading needs no HuBERT/RoBERTa checkpoint.
            self.expression_predictor.save_components(folder / EXPRESSION_COMPONENTS)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        (folder / META_NAME).write_text(json.dumps(self.meta(), indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> EDTalk:
        """Load a folder written by save_pretrained. Reads safetensors and JSON only: nothing is unpickled."""
        from safetensors.torch import load_model

        folder = Path(path)
        missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"EDTalk.from_pretrained: folder {folder} lacks {missing}; expected a folder written by "
                f"EDTalk.save_pretrained ({WEIGHTS_NAME} + {CONFIG_NAME})"
            )
        try:
            config = ModelConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"EDTalk.from_pretrained: invalid {folder / CONFIG_NAME}: {exc}") from exc
        components = folder / EXPRESSION_COMPONENTS
        model = cls(config, expression_components=components if components.is_dir() else None)
        try:
            load_model(model, str(folder / WEIGHTS_NAME), strict=True, device=str(device))
        except RuntimeError as exc:
            raise ValueError(
                f"EDTalk.from_pretrained: {folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: {exc}"
            ) from exc
        meta_path = folder / META_NAME
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError as exc:
                raise ValueError(f"EDTalk.from_pretrained: invalid JSON in {meta_path}: {exc}") from exc
            spaces = tuple(meta.get("active_spaces", model.navigation.spaces))
            bad = [s for s in spaces if s not in model.navigation.spaces]
            if bad:
                raise ValueError(f"EDTalk.from_pretrained: {meta_path} names unknown spaces {bad}")
            model.active_spaces = spaces
            model.emotion_means = dict(meta.get("emotion_means", {}))
        return model.to(device)
