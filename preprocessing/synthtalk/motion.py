"""Per-frame factors of one clip: mouth (from the speech), head pose, blinks, gaze and expression.

Factors of different groups are drawn from separate random streams so they are independent, except for one
weak, deliberate link: the head nods a little with the loudness of speech, as people do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocessing.synthtalk.audio import FPS, Speech

FACTOR_NAMES: tuple[str, ...] = (
    "mouth_open", "mouth_width", "yaw", "pitch", "roll", "tx", "ty",
    "blink_left", "blink_right", "gaze_x", "gaze_y", "emotion", "intensity",
)  # fmt: skip


@dataclass
class MotionConfig:
    """Ranges of the visual factors."""

    yaw_deg: float = 18.0  # largest head yaw, degrees
    pitch_deg: float = 10.0  # largest head pitch, degrees
    roll_deg: float = 8.0  # largest head roll, degrees
    shift: float = 0.04  # largest head translation, fraction of the image side
    audio_nod: float = 0.2  # share of the pitch motion that follows speech loudness (weak on purpose)
    blink_every_s: tuple[float, float] = (2.0, 6.0)  # interval between blinks, seconds
    blink_len_s: tuple[float, float] = (0.1, 0.25)  # blink duration, seconds

    def __post_init__(self) -> None:
        if not 0 <= self.audio_nod <= 1:
            raise ValueError(f"MotionConfig.audio_nod must be in [0, 1], got {self.audio_nod}")
        if min(self.yaw_deg, self.pitch_deg, self.roll_deg, self.shift) < 0:
            raise ValueError("MotionConfig: pose ranges must be >= 0")


def smooth_noise(rng: np.random.Generator, n: int, cutoff_hz: float) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a sum of a few random sinusoids below cutoff_hz."""
    t = np.arange(n) / FPS
    out = np.zeros(n)
    for _ in range(4):
        f = rng.uniform(0.1, 1.0) * cutoff_hz
        out += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return out / (np.abs(out).max() + 1e-9) * rng.uniform(0.6, 1.0)


def blinks(rng: np.random.Generator, n: int, cfg: MotionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Blink curves (1 = closed): a fast close and a slower open, every few seconds, both eyes nearly together."""
    left, right = np.zeros(n), np.zeros(n)
    t = rng.uniform(0.2, cfg.blink_every_s[1])
    fine = 8  # sub-frame resolution: a 100 ms blink spans only 2.5 frames
    while t < n / FPS:
        dur = rng.uniform(*cfg.blink_len_s)
        depth = rng.uniform(0.85, 1.0)
        f0, f1 = int(t * FPS), min(n, int((t + dur) * FPS) + 1)
        ts = (f0 * fine + np.arange((f1 - f0) * fine) + 0.5) / (FPS * fine)
        u = (ts - t) / dur
        close = 0.35  # share of the blink spent closing
        curve = np.where(
            u < close, np.sin(0.5 * np.pi * u / close), np.cos(0.5 * np.pi * (u - close) / (1 - close))
        )
        curve = np.where((u >= 0) & (u <= 1), np.clip(curve, 0, 1), 0.0) * depth
        frame_curve = curve.reshape(f1 - f0, fine).mean(axis=1)
        lag = rng.uniform(0.9, 1.0)  # the eyes close a touch unequally
        left[f0:f1] = np.maximum(left[f0:f1], frame_curve)
        right[f0:f1] = np.maximum(right[f0:f1], frame_curve * lag)
        t += dur + rng.uniform(*cfg.blink_every_s)
    return left, right


def gaze(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixations with quick saccades between them, in [-1, 1] of the eye's room to move."""
    gx, gy = np.zeros(n), np.zeros(n)
    i, x, y = 0, 0.0, 0.0
    while i < n:
        hold = int(rng.uniform(0.4, 2.0) * FPS)
        nx, ny = rng.uniform(-0.9, 0.9), rng.uniform(-0.7, 0.7)
        ramp = np.linspace(0, 1, 3)[1:]  # a saccade takes about two frames
        seg_x = np.concatenate([x + (nx - x) * ramp, np.full(hold, nx)])
        seg_y = np.concatenate([y + (ny - y) * ramp, np.full(hold, ny)])
        m = min(len(seg_x), n - i)
        gx[i : i + m], gy[i : i + m] = seg_x[:m], seg_y[:m]
        i += m
        x, y = nx, ny
    return gx, gy


def clip_factors(
    pose_rng: np.random.Generator,
    eye_rng: np.random.Generator,
    speech: Speech,
    emotion: int,
    intensity: float,
    cfg: MotionConfig,
) -> dict[str, np.ndarray]:
    """All FACTOR_NAMES per frame for one clip."""
    n = len(speech.mouth_open)
    loud = np.convolve(speech.energy, np.ones(9) / 9, mode="same")  # ~0.36 s of loudness
    loud = (loud - loud.mean()) / (loud.std() + 1e-9)
    nod = np.clip(loud / 2.5, -1, 1)
    a = cfg.audio_nod
    factors = {
        "mouth_open": speech.mouth_open,
        "mouth_width": speech.mouth_width,
        "yaw": cfg.yaw_deg * smooth_noise(pose_rng, n, 0.5),
        "pitch": cfg.pitch_deg * ((1 - a) * smooth_noise(pose_rng, n, 0.6) + a * nod),
        "roll": cfg.roll_deg * smooth_noise(pose_rng, n, 0.4),
        "tx": cfg.shift * smooth_noise(pose_rng, n, 0.3),
        "ty": cfg.shift * smooth_noise(pose_rng, n, 0.3),
    }
    factors["blink_left"], factors["blink_right"] = blinks(eye_rng, n, cfg)
    factors["gaze_x"], factors["gaze_y"] = gaze(eye_rng, n)
    factors["emotion"] = np.full(n, emotion, dtype=np.int64)
    factors["intensity"] = np.full(n, intensity)
    return factors
