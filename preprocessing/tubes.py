"""FOMM-style face tubes: one square box per segment, centred on the face's landmarks with a margin, cropped and
resized; a new tube where the face jumps (a cut) or drifts far from where the tube began; segments of at most
`segment_frames`."""

from __future__ import annotations

import math

import cv2
import numpy as np

from preprocessing.landmarks import landmark_box

# a frame-to-frame move of the face centre larger than this x face side is a cut: a new tube
JUMP = 0.35
# tubes shorter than this many frames (~0.5 s) are too short to train on: left out and counted
MIN_PIECE = 13
# a tube is cut for drift (not for a jump) only once it is this long (1 s)
MIN_TUBE = 25
# default: a new tube when the face box's IoU with the tube's first box falls below this
TUBE_MIN_IOU = 0.5


def face_geometry(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T,68,2) -> centres (T,2) of the landmark boxes and their sides (T,) (the larger of width and height)."""
    box = landmark_box(landmarks)
    centres = (box[:, :2] + box[:, 2:]) / 2
    sides = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    return centres, sides


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def rigid_box(landmarks: np.ndarray) -> np.ndarray:
    """(T,68,2) -> (T,4) square boxes from the brows, eyes and nose only, so talking (the jaw and lips move) does not
    change them; side = 1.5 x brow-to-brow width (about the face's size)."""
    pts = landmarks[:, 17:48]
    lo, hi = pts.min(1), pts.max(1)
    centre = (lo + hi) / 2
    half = 0.75 * (hi[:, :1] - lo[:, :1])
    return np.concatenate([centre - half, centre + half], axis=1)


def split_tubes(landmarks: np.ndarray, min_iou: float = TUBE_MIN_IOU) -> list[tuple[int, int]]:
    """[start, end) face tubes: a new tube at a cut (the face jumps between two frames) or when the face's landmark
    box has moved or grown so much that its IoU with the tube's first box falls below `min_iou` (as FOMM's crop
    script does), so one fixed crop box per tube keeps the face near its centre."""
    t_len = len(landmarks)
    if t_len == 0:
        return []
    boxes = rigid_box(landmarks)
    centres, sides = face_geometry(landmarks)
    tubes, start = [], 0
    for t in range(1, t_len):
        jump = np.linalg.norm(centres[t] - centres[t - 1]) > JUMP * max(sides[t - 1], 1.0)
        # a drift cut only after MIN_TUBE frames: a head that shakes fast would otherwise give a pile of slivers
        if jump or (t - start >= MIN_TUBE and _iou(boxes[start], boxes[t]) < min_iou):
            tubes.append((start, t))
            start = t
    tubes.append((start, t_len))
    return tubes


def split_segments(
    landmarks: np.ndarray, segment_frames: int, min_iou: float = TUBE_MIN_IOU
) -> list[tuple[int, int]]:
    """[start, end) segments: face tubes (see split_tubes) split into near-equal pieces of at most
    `segment_frames` (so no tiny tail). Tubes shorter than MIN_PIECE frames are left out (counted by the caller)."""
    ranges = []
    for a, b in split_tubes(landmarks, min_iou):
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
