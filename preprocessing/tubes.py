"""FOMM-style face tubes: one square box per segment, centred on the face's landmarks with a margin, cropped and
resized; a new tube where the face jumps (a cut); segments of at most `segment_frames`."""

from __future__ import annotations

import math

import cv2
import numpy as np

from preprocessing.landmarks import landmark_box

JUMP = 0.35  # a frame-to-frame move of the face centre larger than this x face side starts a new tube
MIN_PIECE = (
    3  # tube pieces shorter than this many frames (between two cuts) cannot make pairs and are skipped
)


def face_geometry(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T,68,2) -> centres (T,2) of the landmark boxes and their sides (T,) (the larger of width and height)."""
    box = landmark_box(landmarks)
    centres = (box[:, :2] + box[:, 2:]) / 2
    sides = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    return centres, sides


def split_segments(landmarks: np.ndarray, segment_frames: int) -> list[tuple[int, int]]:
    """[start, end) ranges: cut where the face jumps, then split each tube into near-equal pieces of at most
    `segment_frames` (so no tiny tail segment)."""
    t_len = len(landmarks)
    if t_len == 0:
        return []
    centres, sides = face_geometry(landmarks)
    moves = np.linalg.norm(np.diff(centres, axis=0), axis=1) if t_len > 1 else np.zeros(0)
    cuts = [0] + [i + 1 for i, m in enumerate(moves) if m > JUMP * max(sides[i], 1.0)] + [t_len]
    ranges = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        n = b - a
        if n < MIN_PIECE:
            continue
        pieces = math.ceil(n / segment_frames)
        bounds = np.linspace(a, b, pieces + 1).round().astype(int)
        ranges.extend((int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    return ranges


def tube_box(landmarks: np.ndarray, scale: float, shift_up: float) -> np.ndarray:
    """One square box (x0, y0, x1, y1, source px) for a tube: centred on the median landmark centre (raised a little
    so the forehead fits), side = scale x the 90th-percentile landmark-box side. It may extend past the frame: the
    crop pads instead of shifting, so the face stays centred."""
    centres, sides = face_geometry(landmarks)
    side = float(np.percentile(sides, 90)) * scale
    cx, cy = np.median(centres, axis=0)
    cy -= shift_up * float(np.median(sides))
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)


def crop(frames: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crop every frame to `box` and resize to size x size (outside the frame: black)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    s = size / (x1 - x0)
    m = np.array([[s, 0, -x0 * s], [0, s, -y0 * s]], np.float32)
    # area filtering only pays for strong downscaling; below 2x, bilinear is close and several times cheaper
    interp = cv2.INTER_AREA if s < 0.5 else cv2.INTER_LINEAR
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, frame in enumerate(frames):
        if interp == cv2.INTER_AREA:
            # warpAffine has no area filter: cut the region (padded) and resize it with INTER_AREA
            out[i] = _area_crop(frame, x0, y0, x1, y1, size)
        else:
            out[i] = cv2.warpAffine(frame, m, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT)
    return out


def _area_crop(frame: np.ndarray, x0: float, y0: float, x1: float, y1: float, size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    ix0, iy0 = int(round(x0)), int(round(y0))
    side = int(round(x1 - x0))
    pad = max(0, -ix0, -iy0, ix0 + side - w, iy0 + side - h)
    if pad:
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        ix0, iy0 = ix0 + pad, iy0 + pad
    return cv2.resize(frame[iy0 : iy0 + side, ix0 : ix0 + side], (size, size), interpolation=cv2.INTER_AREA)


def to_crop(landmarks: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Source-pixel landmarks -> crop pixels of a size x size crop of `box`."""
    x0, y0, x1, _ = (float(v) for v in box)
    return ((landmarks - np.array([x0, y0], np.float32)) * (size / (x1 - x0))).astype(np.float32)
