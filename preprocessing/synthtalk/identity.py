"""Identities: face proportions, colours, hair and background, drawn from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocessing.synthtalk.template import FaceShape

# Skin tones (RGB) from light to dark; an identity interpolates between two neighbours.
_SKIN = np.array(
    [[246, 214, 190], [234, 192, 160], [212, 160, 120], [176, 122, 86], [128, 84, 58], [92, 60, 42]]
)
_HAIR = np.array(
    [[25, 20, 18], [70, 45, 30], [120, 80, 45], [200, 160, 90], [150, 60, 30], [160, 160, 165], [60, 60, 70]]
)
_EYES = np.array([[90, 55, 30], [60, 100, 160], [70, 120, 80], [120, 95, 50], [100, 110, 120], [40, 30, 25]])
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bob", "curly", "bald")
_HAIR_STYLE_P = (0.3, 0.25, 0.2, 0.15, 0.1)
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "dots", "checker", "blobs")


@dataclass(frozen=True)
class Identity:
    """Everything that makes one synthetic speaker look and sound like themself."""

    index: int  # position in the generated set
    shape: FaceShape  # face proportions
    skin: tuple[int, int, int]  # RGB
    lips: tuple[int, int, int]  # RGB, clearly apart from the skin
    hair: tuple[int, int, int]  # RGB
    hair_style: str  # one of HAIR_STYLES
    eyes: tuple[int, int, int]  # iris RGB
    background: str  # one of BACKGROUNDS
    bg_colors: tuple[tuple[int, int, int], tuple[int, int, int]]  # two RGB colours of the background pattern
    shirt: tuple[int, int, int]  # RGB
    f0: float  # speaking pitch in Hz (before emotion)
    formant_scale: float  # vocal tract length: scales every formant
    head_scale: float  # face half-width as a fraction of the image side

    @property
    def speaker(self) -> str:
        return f"synth{self.index:03d}"


def _rgb(a) -> tuple[int, int, int]:
    return tuple(int(round(float(v))) for v in np.clip(a, 0, 255))


def lip_color(skin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lip colour: redder and darker than the skin, kept at a clear distance from it."""
    lips = skin * np.array([0.78, 0.48, 0.5]) + np.array([30, 0, 8]) + rng.uniform(-8, 8, 3)
    if np.linalg.norm(lips - skin) < 70:  # dark skin: push the lips further towards red
        lips = lips + np.array([50, -10, -5])
    return lips


def sample_identity(seed: int, index: int) -> Identity:
    """The identity `index` of the set generated with `seed` (independent of how many identities there are)."""
    rng = np.random.default_rng([seed, index, 1])
    shape = FaceShape(
        width=rng.uniform(0.9, 1.08),
        jaw_length=rng.uniform(0.9, 1.12),
        jaw_square=rng.uniform(0.65, 1.0),
        eye_spacing=rng.uniform(0.92, 1.08),
        eye_size=rng.uniform(0.85, 1.2),
        nose_length=rng.uniform(0.88, 1.12),
        nose_width=rng.uniform(0.85, 1.2),
        mouth_width=rng.uniform(0.88, 1.12),
        lip_thickness=rng.uniform(0.8, 1.3),
        brow_height=rng.uniform(0.85, 1.15),
        brow_thickness=rng.uniform(0.7, 1.3),
        hairline=rng.uniform(0.45, 0.8),
    )
    t = rng.uniform(0, len(_SKIN) - 1)
    lo = int(np.floor(t))
    hi = min(lo + 1, len(_SKIN) - 1)
    skin = _SKIN[lo] + (t - lo) * (_SKIN[hi] - _SKIN[lo])
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.uniform(-12, 12, 3)
    eyes = _EYES[rng.integers(len(_EYES))] + rng.uniform(-10, 10, 3)
    hue = rng.uniform(0, 1, 2)
    bg1 = 255 * _hsv(hue[0], rng.uniform(0.15, 0.5), rng.uniform(0.45, 0.9))
    bg2 = 255 * _hsv((hue[0] + rng.uniform(0.05, 0.3)) % 1, rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.95))
    shirt = 255 * _hsv(hue[1], rng.uniform(0.3, 0.8), rng.uniform(0.25, 0.8))
    return Identity(
        index=index,
        shape=shape,
        skin=_rgb(skin),
        lips=_rgb(lip_color(skin, rng)),
        hair=_rgb(hair),
        hair_style=str(rng.choice(HAIR_STYLES, p=_HAIR_STYLE_P)),
        eyes=_rgb(eyes),
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        bg_colors=(_rgb(bg1), _rgb(bg2)),
        shirt=_rgb(shirt),
        f0=float(rng.choice([rng.uniform(95, 135), rng.uniform(170, 230)])),
        formant_scale=float(rng.uniform(0.9, 1.15)),
        head_scale=float(rng.uniform(0.24, 0.27)),
    )


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] -> RGB in [0, 1]."""
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])
