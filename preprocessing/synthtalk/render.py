"""Frames of one clip: a textured background, then the posed and animated head drawn on top."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from preprocessing.synthtalk.face import draw_head, quantise
from preprocessing.synthtalk.identity import Identity
from preprocessing.synthtalk.template import animate, neutral_points, project


def background(ident: Identity, size: int, rng: np.random.Generator) -> np.ndarray:
    """A static textured background (size, size, 3) RGB uint8 in the identity's colours and pattern."""
    c1 = np.array(ident.bg_colors[0], np.float32)
    c2 = np.array(ident.bg_colors[1], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = ident.background
    if kind == "gradient":
        t = np.clip(yy * 0.8 + 0.2 * xx, 0, 1)
    elif kind == "stripes":
        period = rng.uniform(0.08, 0.2)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + yy * rng.uniform(-0.6, 0.6)) / period)
        t = 0.25 + 0.5 * (t > 0.5) + 0.1 * yy
    elif kind == "dots":
        period = rng.uniform(0.1, 0.2)
        d = np.hypot((xx % period) / period - 0.5, (yy % period) / period - 0.5)
        t = np.clip((0.32 - d) * 12, 0, 1)
    elif kind == "checker":
        period = rng.uniform(0.12, 0.25)
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2) * 0.7 + 0.15 * yy
    else:  # blobs
        t = np.zeros_like(xx)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            t = np.maximum(t, np.clip(1 - np.hypot(xx - cx, yy - cy) / r, 0, 1))
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    vignette = 1 - 0.25 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    img = img * vignette[..., None] + rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_frames(
    ident: Identity, factors: dict[str, np.ndarray], size: int, bg: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (frame RGB uint8 (size, size, 3), landmarks (68, 2) in pixels, exactly as drawn) per frame."""
    base = neutral_points(ident.shape)
    pts3 = animate(
        base,
        factors["mouth_open"],
        factors["mouth_width"],
        factors["blink_left"],
        factors["blink_right"],
        int(factors["emotion"][0]),
        float(factors["intensity"][0]),
    )
    scale = ident.head_scale * size
    frame = np.empty_like(bg)
    for t in range(len(pts3)):
        xy, _ = project(
            pts3[t],
            float(factors["yaw"][t]),
            float(factors["pitch"][t]),
            float(factors["roll"][t]),
            float(factors["tx"][t]),
            float(factors["ty"][t]),
            size,
            scale,
        )
        xy = quantise(xy)
        np.copyto(frame, bg)
        draw_head(frame, xy, ident, scale, float(factors["gaze_x"][t]), float(factors["gaze_y"][t]),
                  float(factors["mouth_open"][t]))  # fmt: skip
        yield frame, xy[:68].copy()


def draw_landmarks(img: np.ndarray, landmarks: np.ndarray, color=(0, 255, 0)) -> np.ndarray:
    """A copy of img with the 68 landmarks as small dots (for previews)."""
    out = img.copy()
    r = max(1, img.shape[0] // 160)
    for x, y in landmarks:
        cv2.circle(out, (int(round(x * 16)), int(round(y * 16))), r * 16, color, -1, cv2.LINE_AA, 4)
    return out
