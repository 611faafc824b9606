"""Landmark distances between generated and ground-truth videos: M-LMD (mouth) and F-LMD (whole face).

LMD is the Euclidean distance between corresponding 68-point landmarks (iBUG layout), averaged over points and
frames (Chen et al. 2018; the EDTalk paper reports M-LMD on points 48-67 and F-LMD on all 68). Landmarks are
(T, 68, 2) or (68, 2) arrays in pixels of the same image size for both videos.

Normalisation (`normalize`), because raw pixels depend on the resolution:
  None           pixels, as most papers report at 256x256;
  "size"         divided by image_size (the side of the square crop), so 0.01 = 1% of the crop;
  "interocular"  divided per frame by the target's outer-eye-corner distance (points 36 and 45), which also
                 removes the face's scale inside the crop.
No rigid alignment is applied: both videos are expected in the same crop coordinates.
"""

from __future__ import annotations

import numpy as np

MOUTH = tuple(range(48, 68))  # outer (48-59) and inner (60-67) lips
FACE = tuple(range(68))
LEFT_EYE_OUTER = 36
RIGHT_EYE_OUTER = 45
NORMALIZATIONS = (None, "size", "interocular")


def _as_frames(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (68, 2):
        raise ValueError(f"{name} landmarks must be (T, 68, 2) or (68, 2), got {np.shape(x)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} landmarks contain NaN/inf (a frame without a detected face?); drop those frames"
        )
    return arr


def landmark_distances(
    pred, target, points=FACE, normalize: str | None = None, image_size: float | None = None
) -> np.ndarray:
    """Per-frame mean distance over `points` -> (T,) float64, in pixels or the chosen normalisation."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    p = _as_frames(pred, "predicted")
    t = _as_frames(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"predicted and target landmarks differ in shape: {p.shape} vs {t.shape}")
    idx = np.asarray(points, dtype=np.int64)
    dist = np.linalg.norm(p[:, idx] - t[:, idx], axis=-1).mean(axis=1)
    if normalize == "size":
        if not image_size or image_size <= 0:
            raise ValueError("normalize='size' needs image_size (the crop side in pixels)")
        dist = dist / float(image_size)
    elif normalize == "interocular":
        iod = np.linalg.norm(t[:, LEFT_EYE_OUTER] - t[:, RIGHT_EYE_OUTER], axis=-1)
        if np.any(iod <= 0):
            raise ValueError("target landmarks have coincident outer eye corners (36, 45): cannot normalise")
        dist = dist / iod
    return dist


def lmd(pred, target, points=FACE, normalize: str | None = None, image_size: float | None = None) -> float:
    """Mean landmark distance over frames and `points`."""
    return float(landmark_distances(pred, target, points, normalize, image_size).mean())


def m_lmd(pred, target, normalize: str | None = None, image_size: float | None = None) -> float:
    """M-LMD: mean distance of the 20 mouth landmarks (48-67)."""
    return lmd(pred, target, MOUTH, normalize, image_size)


def f_lmd(pred, target, normalize: str | None = None, image_size: float | None = None) -> float:
    """F-LMD: mean distance of all 68 landmarks."""
    return lmd(pred, target, FACE, normalize, image_size)
