"""The 3D 68-landmark face template (iBUG layout) and the deformations that animate it.

Coordinates are in face units: x to the image right, y down, z towards the camera; the face is about 2 units wide.
Points follow the iBUG 68 layout the landmark backends use: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47 (36-41
the eye on the image left), outer lips 48-59, inner lips 60-67. A few extra points (forehead, skull, neck, ears)
outline the head for drawing; they are not landmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "surprised")

JAW = np.arange(0, 17)
BROW_L, BROW_R = np.arange(17, 22), np.arange(22, 27)
NOSE_BRIDGE, NOSE_BASE = np.arange(27, 31), np.arange(31, 36)
EYE_L, EYE_R = np.arange(36, 42), np.arange(42, 48)
LIPS_OUTER, LIPS_INNER = np.arange(48, 60), np.arange(60, 68)

# Extra outline points, appended after the 68 landmarks.
N_FOREHEAD = 9  # arc from above jaw 16 over the top of the forehead to above jaw 0
N_SKULL = 13  # larger arc: the back of the head, outline for hair
FOREHEAD = np.arange(68, 68 + N_FOREHEAD)
SKULL = np.arange(FOREHEAD[-1] + 1, FOREHEAD[-1] + 1 + N_SKULL)
EAR_L, EAR_R = SKULL[-1] + 1, SKULL[-1] + 2
NECK = np.arange(EAR_R + 1, EAR_R + 5)  # left top, right top, right bottom, left bottom
N_HAIRLINE = 7
HAIRLINE = np.arange(
    NECK[-1] + 1, NECK[-1] + 1 + N_HAIRLINE
)  # where the fringe meets the forehead, left to right
BROW_TOP = np.arange(HAIRLINE[-1] + 1, HAIRLINE[-1] + 11)  # upper edge of the brows, same order as 17-26
N_POINTS = int(BROW_TOP[-1] + 1)


@dataclass(frozen=True)
class FaceShape:
    """Identity proportions, each a multiplier or offset around the average face."""

    width: float = 1.0  # face half-width multiplier
    jaw_length: float = 1.0  # chin distance below the eyes
    jaw_square: float = 0.85  # superellipse exponent of the jaw line (<1 squarer)
    eye_spacing: float = 1.0  # distance between the eye centres
    eye_size: float = 1.0  # eye opening size
    nose_length: float = 1.0  # nose bridge length
    nose_width: float = 1.0  # nostril spread
    mouth_width: float = 1.0  # lip half-width
    lip_thickness: float = 1.0  # lip height
    brow_height: float = 1.0  # distance of the brows above the eyes
    brow_thickness: float = 1.0  # brow height
    hairline: float = 0.6  # fringe line height above the brows, fraction of the forehead


def _depth(x: np.ndarray) -> np.ndarray:
    """Face surface depth: a rounded front, receding to the sides."""
    return 0.3 - 0.45 * np.clip(x, -1.2, 1.2) ** 2


def neutral_points(shape: FaceShape) -> np.ndarray:
    """The identity's neutral 3D points (N_POINTS, 3), mouth closed, eyes open, no expression."""
    p = np.zeros((N_POINTS, 3), np.float64)
    w = 0.95 * shape.width
    top = -0.12  # jaw starts at ear height, a little below the eyes
    h = 0.95 * shape.jaw_length
    theta = np.linspace(0.0, np.pi, 17)
    c, s = np.cos(theta), np.sin(theta)
    p[JAW, 0] = -np.sign(c) * np.abs(c) ** shape.jaw_square * w
    p[JAW, 1] = top + s**1.15 * h
    p[JAW, 2] = -0.55 + 0.65 * s

    # Brows: outer to inner on the image left, inner to outer on the right, arched.
    u = np.linspace(0.0, 1.0, 5)
    bx = -0.8 + 0.62 * u
    by = -0.25 - 0.2 * shape.brow_height - 0.07 * np.sin(np.pi * (0.3 + 0.7 * u))
    p[BROW_L, 0], p[BROW_L, 1] = bx * shape.width, by
    p[BROW_R, 0], p[BROW_R, 1] = -bx[::-1] * shape.width, by[::-1]
    p[17:27, 2] = _depth(p[17:27, 0]) + 0.08

    nl = shape.nose_length
    p[NOSE_BRIDGE, 1] = np.array([-0.32, -0.17, -0.02, 0.13]) * nl
    p[NOSE_BRIDGE, 2] = np.array([0.3, 0.38, 0.47, 0.58])
    p[NOSE_BASE, 0] = np.array([-0.17, -0.09, 0.0, 0.09, 0.17]) * shape.nose_width
    p[NOSE_BASE, 1] = 0.22 * nl
    p[NOSE_BASE, 2] = np.array([0.33, 0.4, 0.45, 0.4, 0.33])

    ecx, ecy = 0.38 * shape.eye_spacing, -0.22
    ew, eu, el = 0.175, 0.085 * shape.eye_size, 0.065 * shape.eye_size
    # 36 outer, 37-38 upper lid, 39 inner, 40-41 lower lid (image-left eye); mirrored order on the right eye.
    left = np.array([[-ew, 0], [-ew / 3, -eu], [ew / 3, -eu], [ew, 0.01], [ew / 3, el], [-ew / 3, el]])
    p[EYE_L, 0], p[EYE_L, 1] = -ecx + left[:, 0], ecy + left[:, 1]
    right = np.array([[-ew, 0.01], [-ew / 3, -eu], [ew / 3, -eu], [ew, 0], [ew / 3, el], [-ew / 3, el]])
    p[EYE_R, 0], p[EYE_R, 1] = ecx + right[:, 0], ecy + right[:, 1]
    p[36:48, 2] = _depth(p[36:48, 0]) + 0.02

    mw, ut, lt = 0.3 * shape.mouth_width, 0.09 * shape.lip_thickness, 0.11 * shape.lip_thickness
    my = 0.3 + 0.2 * shape.jaw_length
    outer = np.array(
        [
            [-1.0, 0.0], [-0.55, -0.9], [-0.2, -1.0], [0.0, -0.82], [0.2, -1.0], [0.55, -0.9],
            [1.0, 0.0], [0.55, 0.85], [0.25, 1.0], [0.0, 1.05], [-0.25, 1.0], [-0.55, 0.85],
        ]
    )  # fmt: skip
    p[LIPS_OUTER, 0] = outer[:, 0] * mw
    p[LIPS_OUTER, 1] = my + np.where(outer[:, 1] < 0, outer[:, 1] * ut, outer[:, 1] * lt)
    inner = np.array(
        [[-0.82, 0], [-0.35, -0.1], [0, -0.1], [0.35, -0.1], [0.82, 0], [0.35, 0.1], [0, 0.1], [-0.35, 0.1]]
    )
    p[LIPS_INNER, 0] = inner[:, 0] * mw
    p[LIPS_INNER, 1] = my + inner[:, 1] * 0.1
    p[48:68, 2] = _depth(p[48:68, 0] * 0.8) + 0.1

    phi = np.linspace(0.0, np.pi, N_FOREHEAD + 2)[1:-1]
    p[FOREHEAD, 0] = np.cos(phi) * w * 0.97
    p[FOREHEAD, 1] = top - np.sin(phi) ** 0.8 * 0.98
    p[FOREHEAD, 2] = -0.55 + 0.6 * np.sin(phi)
    psi = np.linspace(-0.12 * np.pi, 1.12 * np.pi, N_SKULL)
    p[SKULL, 0] = np.cos(psi) * w * 1.12
    p[SKULL, 1] = top - 0.05 - np.sin(psi) * 1.12
    p[SKULL, 2] = -0.7
    p[EAR_L] = [-w * 1.0, -0.05, -0.5]
    p[EAR_R] = [w * 1.0, -0.05, -0.5]
    hx = np.linspace(-0.92, 0.92, N_HAIRLINE) * w
    top_y = top - 0.98
    brow_y = by.min()
    p[HAIRLINE, 0] = hx
    p[HAIRLINE, 1] = top_y + (1 - shape.hairline) * (brow_y - top_y) + 0.25 * (hx / w) ** 2 * (brow_y - top_y)
    p[HAIRLINE, 2] = _depth(hx) - 0.05
    thick = 0.055 * shape.brow_thickness * np.array([0.45, 0.8, 1.0, 1.0, 0.9])
    p[BROW_TOP[:5]] = p[BROW_L] - np.stack([np.zeros(5), thick, np.zeros(5)], axis=1)
    p[BROW_TOP[5:]] = p[BROW_R] - np.stack([np.zeros(5), thick[::-1], np.zeros(5)], axis=1)
    p[NECK] = [[-0.45 * w, 0.5, -0.5], [0.45 * w, 0.5, -0.5], [0.5 * w, 1.6, -0.5], [-0.5 * w, 1.6, -0.5]]
    return p


# Expression offsets at full intensity: point index -> (dx, dy) in face units; dx > 0 moves away from the
# face's midline for points given on the image-left side and is mirrored for the right side.
def _sym(pairs: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]]:
    """Mirror offsets given for the image-left half of the face onto the right half."""
    mirror = {17: 26, 18: 25, 19: 24, 20: 23, 21: 22, 36: 45, 37: 44, 38: 43, 39: 42, 40: 47, 41: 46, 31: 35,
              32: 34, 48: 54, 49: 53, 50: 52, 59: 55, 58: 56, 60: 64, 61: 63, 67: 65}  # fmt: skip
    out = {}
    for i, (dx, dy) in pairs.items():
        out[i] = (-dx, dy)  # image-left half: outward is -x
        if i in mirror:
            out[mirror[i]] = (dx, dy)
    return out


EXPRESSIONS: dict[str, dict[int, tuple[float, float]]] = {
    "neutral": {},
    "happy": _sym({48: (0.04, -0.1), 60: (0.03, -0.07), 49: (0.01, -0.035), 59: (0.01, -0.03), 40: (0, -0.025),
                   41: (0, -0.025), 17: (0, -0.02), 18: (0, -0.03), 19: (0, -0.03), 20: (0, -0.025), 21: (0, -0.02),
                   31: (0.015, -0.01)}),
    "sad": _sym({21: (0.0, -0.09), 20: (0, -0.05), 19: (0, -0.01), 18: (0, 0.02), 17: (0, 0.04), 48: (-0.01, 0.08),
                 60: (-0.01, 0.06), 49: (0, 0.02), 59: (0, 0.03), 37: (0, 0.02), 38: (0, 0.025)}),
    "angry": _sym({21: (-0.05, 0.1), 20: (-0.03, 0.08), 19: (-0.01, 0.06), 18: (0, 0.04), 17: (0, 0.03),
                   37: (0, 0.02), 38: (0, 0.025), 40: (0, -0.02), 41: (0, -0.02), 48: (-0.04, 0.025),
                   60: (-0.035, 0.02), 31: (0.02, -0.01)}),
    "surprised": _sym({17: (0, -0.1), 18: (0, -0.13), 19: (0, -0.14), 20: (0, -0.13), 21: (0, -0.11),
                       37: (0, -0.035), 38: (0, -0.035), 40: (0, 0.01), 41: (0, 0.01), 48: (-0.06, 0.02),
                       60: (-0.05, 0.02), 49: (-0.02, 0), 59: (-0.02, 0.03)}),
}  # fmt: skip


def _expression_table() -> np.ndarray:
    table = np.zeros((len(EMOTIONS), 68, 2))
    for k, name in enumerate(EMOTIONS):
        for i, d in EXPRESSIONS[name].items():
            table[k, i] = d
    return table


EXPRESSION_TABLE = _expression_table()

# How far each lower-mouth point follows the jaw drop (1 = fully).
_DROP = np.zeros(N_POINTS)
_DROP[[55, 59]] = 0.6
_DROP[[56, 58, 65, 67]] = 0.88
_DROP[[57, 66]] = 1.0
_DROP[[48, 54, 60, 64]] = 0.42
_DROP[JAW] = 0.75 * np.sin(np.linspace(0, np.pi, 17)) ** 3
_DROP[NECK[:2]] = 0.2


def animate(
    base: np.ndarray,
    mouth_open: np.ndarray,
    mouth_width: np.ndarray,
    blink_left: np.ndarray,
    blink_right: np.ndarray,
    emotion: int,
    intensity: float,
) -> np.ndarray:
    """Deform the neutral points for every frame -> (T, N_POINTS, 3).

    mouth_open in [0, 1] drops the jaw and lower lip; mouth_width in [-1, 1] stretches (+) or rounds (-) the lips;
    blink_* in [0, 1] closes the upper lid onto the lower; the emotion's offsets are scaled by intensity.
    """
    t = len(mouth_open)
    pts = np.repeat(base[None], t, axis=0)
    mouth_c = base[LIPS_OUTER].mean(axis=0)
    lip_h = base[57, 1] - base[51, 1]

    # Expression first, so lip-corner raising rides on the neutral lip line.
    pts[:, :68, :2] += intensity * EXPRESSION_TABLE[emotion][None]
    pts[:, BROW_TOP, :2] += intensity * EXPRESSION_TABLE[emotion][None, 17:27]  # brow tops follow the brows
    if EMOTIONS[emotion] == "surprised":  # a slack jaw, part of the expression, not of speech
        pts[:, :, 1] += (0.05 * intensity * _DROP)[None]

    lips = np.arange(48, 68)
    scale = 1.0 + 0.22 * np.asarray(mouth_width)[:, None]
    pts[:, lips, 0] = mouth_c[0] + (pts[:, lips, 0] - mouth_c[0]) * scale
    pts[:, lips, 2] += 0.06 * np.clip(-np.asarray(mouth_width), 0, None)[:, None]  # rounded lips protrude

    drop = 0.34 * np.asarray(mouth_open)[:, None] * _DROP[None]
    pts[:, :, 1] += drop
    # The inner upper lip lifts a little as the mouth opens, showing the teeth.
    pts[:, [61, 62, 63], 1] -= 0.08 * lip_h * np.asarray(mouth_open)[:, None]
    pts[:, [50, 51, 52], 1] -= 0.05 * lip_h * np.asarray(mouth_open)[:, None]

    for eye, blink in ((EYE_L, blink_left), (EYE_R, blink_right)):
        b = np.asarray(blink)[:, None]
        upper, lower = eye[[1, 2]], eye[[5, 4]]
        target = pts[:, lower, 1] - 0.012
        pts[:, upper, 1] = pts[:, upper, 1] + (target - pts[:, upper, 1]) * b
        pts[:, lower, 1] -= 0.012 * b
    return pts


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix for angles in degrees: yaw about y, pitch about x, roll about z (applied roll last)."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def project(
    points: np.ndarray, yaw: float, pitch: float, roll: float, tx: float, ty: float, size: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pose and project one frame's 3D points -> (image px (N, 2), depth (N,)); a mild perspective.

    tx, ty shift the head by that fraction of the image side; `scale` is the face half-width in pixels.
    """
    rot = rotation(yaw, pitch, roll)
    cam = points @ rot.T
    dist = 7.0  # camera distance in face units: enough perspective to read depth, not to distort
    k = dist / (dist - cam[:, 2])
    xy = np.empty((len(points), 2))
    xy[:, 0] = size * (0.5 + tx) + scale * cam[:, 0] * k
    xy[:, 1] = size * (0.47 + ty) + scale * cam[:, 1] * k
    return xy, cam[:, 2]
