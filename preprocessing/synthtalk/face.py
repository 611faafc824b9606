"""Drawing one face from its projected points with OpenCV, back to front.

Points arrive quantised to 1/16 pixel (OpenCV's `shift=4` sub-pixel drawing), so the landmarks written to the
sidecar are exactly the ones drawn. Curves between landmarks are smoothed by corner cutting, which keeps every
drawn curve inside the convex hull of its landmarks.
"""

from __future__ import annotations

import cv2
import numpy as np

from preprocessing.synthtalk.identity import Identity
from preprocessing.synthtalk.template import (
    BROW_L,
    BROW_R,
    BROW_TOP,
    EAR_L,
    EAR_R,
    EYE_L,
    EYE_R,
    FOREHEAD,
    HAIRLINE,
    JAW,
    NECK,
    SKULL,
)

SHIFT = 4  # OpenCV sub-pixel bits
ONE = 1 << SHIFT
AA = cv2.LINE_AA


def quantise(xy: np.ndarray) -> np.ndarray:
    """Round points to the 1/16 pixel grid that drawing uses."""
    return np.round(xy * ONE) / ONE


def _fx(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * ONE).astype(np.int32)


def chaikin(pts: np.ndarray, closed: bool, iters: int = 2) -> np.ndarray:
    """Corner-cutting smoothing; an open curve keeps its end points. Never leaves the points' convex hull."""
    for _ in range(iters):
        p = pts
        q = np.roll(p, -1, axis=0) if closed else p[1:]
        p = p if closed else p[:-1]
        mid = np.empty((2 * len(p), 2))
        mid[0::2] = 0.75 * p + 0.25 * q
        mid[1::2] = 0.25 * p + 0.75 * q
        pts = mid if closed else np.concatenate([pts[:1], mid, pts[-1:]])
    return pts


def _poly(img: np.ndarray, pts: np.ndarray, color) -> None:
    cv2.fillPoly(img, [_fx(pts)], color, AA, SHIFT)


def _line(img: np.ndarray, pts: np.ndarray, color, thickness: int, closed: bool = False) -> None:
    cv2.polylines(img, [_fx(pts)], closed, color, thickness, AA, SHIFT)


def _shade(color, k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * k))) for c in color)


def _outline(p: np.ndarray, upper: list[int], lower: list[int]) -> np.ndarray:
    """A closed shape from an upper open curve (left to right) and a lower one (right to left), corners kept."""
    return np.concatenate([chaikin(p[upper], False)[:-1], chaikin(p[lower], False)[:-1]])


def _clipped(img: np.ndarray, shape: np.ndarray, draw) -> None:
    """Run `draw(roi, offset)` on a copy of the shape's box, then blend it in under the shape's antialiased mask."""
    h, w = img.shape[:2]
    x0, y0 = np.floor(shape.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(shape.max(axis=0)).astype(int) + 3
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    roi = img[y0:y1, x0:x1]
    layer = roi.copy()
    draw(layer, np.array([x0, y0], float))
    mask = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(mask, [_fx(shape - [x0, y0])], 255, AA, SHIFT)
    a = mask[..., None].astype(np.float32) / 255.0
    roi[:] = (layer * a + roi * (1 - a)).astype(np.uint8)


def draw_head(
    img: np.ndarray,
    p: np.ndarray,
    ident: Identity,
    scale: float,
    gaze_x: float,
    gaze_y: float,
    mouth_open: float,
) -> None:
    """Draw the whole head (hair, neck, ears, face, features) for one frame's projected points p (N, 2)."""
    skin = ident.skin
    hair = ident.hair
    lw = max(1, int(round(scale / 28)))  # line width that reads at any image size

    # Body and hair behind the head.
    neck = p[NECK]
    chest_c = neck[2:].mean(axis=0)
    axes = (int(scale * 1.5), int(scale * 0.9))
    cv2.ellipse(img, (int(chest_c[0]), int(chest_c[1] + scale * 0.55)), axes, 0, 0, 360, ident.shirt, -1, AA)
    style = ident.hair_style
    skull = p[SKULL]
    if style in ("long", "bob"):
        drop = scale * (1.5 if style == "long" else 0.75)
        ends = np.array([skull[-1] + [-0.05 * scale, drop], skull[0] + [0.05 * scale, drop]])
        _poly(img, chaikin(np.concatenate([skull, ends]), True), _shade(hair, 0.85))
    elif style == "curly":
        for q in chaikin(skull, False, 1):
            cv2.circle(img, _fx(q), int(scale * 0.23 * ONE), _shade(hair, 0.9), -1, AA, SHIFT)
    elif style == "short":
        _poly(img, chaikin(skull, True), hair)
    _poly(img, neck, _shade(skin, 0.82))

    for ear in (EAR_L, EAR_R):
        cv2.ellipse(img, (_fx(p[ear])[0], _fx(p[ear])[1]), (int(scale * 0.12 * ONE), int(scale * 0.2 * ONE)),
                    0, 0, 360, _shade(skin, 0.9), -1, AA, SHIFT)  # fmt: skip

    # Face: a darker rim, the skin, a lit centre; then the fringe.
    face = chaikin(np.concatenate([p[JAW], p[FOREHEAD]]), True)
    centre = p[[27, 28, 29, 30, 33]].mean(axis=0)
    _poly(img, face, _shade(skin, 0.9))
    _poly(img, centre + (face - centre) * 0.93, skin)
    _poly(img, centre + (face - centre) * 0.62 - [0, 0.1 * scale], _shade(skin, 1.05))
    if style != "bald":
        fringe = chaikin(np.concatenate([p[FOREHEAD], p[HAIRLINE]]), True)
        _poly(img, fringe, hair)
    # Cheek shadow under the cheekbones, following the head.
    for a, b in ((2, 48), (14, 54)):
        c = 0.55 * p[a] + 0.45 * p[b]
        cv2.circle(img, _fx(c), int(scale * 0.16 * ONE), _shade(skin, 0.985), -1, AA, SHIFT)

    # Brows.
    for brow, top in ((BROW_L, BROW_TOP[:5]), (BROW_R, BROW_TOP[5:])):
        _poly(img, chaikin(np.concatenate([p[brow], p[top][::-1]]), True, 1), _shade(hair, 0.7))

    # Eyes: sclera, iris, pupil and glint clipped to the lids; lashes on the upper lid.
    for eye in (EYE_L, EYE_R):
        e = p[eye]
        shape = _outline(e, [0, 1, 2, 3], [3, 4, 5, 0])
        width = np.linalg.norm(e[3] - e[0])
        centre_e = e.mean(axis=0)
        ax = (e[3] - e[0]) / max(width, 1e-6)
        ay = np.array([-ax[1], ax[0]])
        iris_c = centre_e + ax * gaze_x * 0.28 * width + ay * gaze_y * 0.12 * width
        r = 0.3 * width

        def iris(layer, off, iris_c=iris_c, r=r):
            c = iris_c - off
            layer[:] = (238, 234, 228)
            cv2.circle(layer, _fx(c), int(r * ONE), _shade(ident.eyes, 0.6), -1, AA, SHIFT)
            cv2.circle(layer, _fx(c), int(r * 0.85 * ONE), ident.eyes, -1, AA, SHIFT)
            cv2.circle(layer, _fx(c), int(r * 0.45 * ONE), (15, 12, 12), -1, AA, SHIFT)
            cv2.circle(
                layer,
                _fx(c - [0.3 * r, 0.3 * r]),
                int(max(r * 0.2, 0.6) * ONE),
                (250, 250, 250),
                -1,
                AA,
                SHIFT,
            )

        _clipped(img, shape, iris)
        _line(img, chaikin(e[[0, 1, 2, 3]], False), (35, 25, 22), lw)
        _line(img, chaikin(e[[3, 4, 5, 0]], False), _shade(skin, 0.75), 1)

    # Nose: side shadow, tip light, nostrils.
    _line(img, chaikin(p[[31, 32, 33, 34, 35]], False, 1), _shade(skin, 0.78), 1)
    _line(img, chaikin(p[[28, 29, 30]] * 0.7 + p[[31, 31, 31]] * 0.3, False, 1), _shade(skin, 0.88), 1)
    tip = p[30]
    cv2.circle(img, _fx(tip - [0, 0.02 * scale]), int(scale * 0.06 * ONE), _shade(skin, 1.08), -1, AA, SHIFT)
    for k in (32, 34):
        c = p[k] * 0.8 + p[33] * 0.2 - [0, 0.01 * scale]
        axes_n = (int(scale * 0.035 * ONE), int(scale * 0.02 * ONE))
        cv2.ellipse(img, (_fx(c)[0], _fx(c)[1]), axes_n, 0, 0, 360, _shade(skin, 0.45), -1, AA, SHIFT)

    # Mouth: lips, then the dark inside with teeth and tongue when open, then the line between the lips.
    lips = _outline(p, [48, 49, 50, 51, 52, 53, 54], [54, 55, 56, 57, 58, 59, 48])
    _poly(img, lips, ident.lips)
    inner = _outline(p, [60, 61, 62, 63, 64], [64, 65, 66, 67, 60])
    gap = p[66, 1] - p[62, 1]
    if gap > 0.8:
        top_c, bottom_c = p[62], p[66]

        def mouth_inside(layer, off, top_c=top_c, bottom_c=bottom_c, gap=gap):
            layer[:] = (70, 22, 28)
            t = top_c - off
            teeth = np.array(
                [
                    [-scale * 0.25, -2],
                    [scale * 0.25, -2],
                    [scale * 0.22, 0.35 * gap],
                    [-scale * 0.22, 0.35 * gap],
                ]
            )
            _poly(layer, t + teeth, (242, 240, 232))
            b = bottom_c - off
            cv2.ellipse(layer, (_fx(b)[0], _fx(b)[1]), (int(scale * 0.16 * ONE), int(max(gap * 0.35, 1) * ONE)),
                        0, 180, 360, (170, 70, 80), -1, AA, SHIFT)  # fmt: skip

        _clipped(img, inner, mouth_inside)
    _line(img, chaikin(p[[60, 61, 62, 63, 64]], False), _shade(ident.lips, 0.55), 1)
