"""Mouth-swap and eye-swap pairs (EDTalk's mouth-pose / eye decoupling data, DESIGN 3.6).

For frames a and b of one segment: align a to b by the similarity transform that maps a's eye and mouth centres
onto b's, cut a's region (mouth, or both eyes with brows) with a feathered mask that follows a's landmarks, and paste
it onto b -> `a_on_b` (I^{m_a}_{p_b}); and the same the other way round -> `b_on_a`.
"""

from __future__ import annotations

import cv2
import numpy as np

MOUTH = list(range(48, 60))  # outer lip contour
LEFT_EYE = list(range(36, 42))
RIGHT_EYE = list(range(42, 48))
LEFT_BROW = list(range(17, 22))
RIGHT_BROW = list(range(22, 27))
KINDS = ("mouth", "eye")
GROW = {
    "mouth": 1.35,
    "eye": 1.25,
}  # region hull grown around its centre so lips' and lids' surroundings come along


def anchors(landmarks: np.ndarray) -> np.ndarray:
    """Left eye, right eye and mouth centres (3, 2): the points the similarity transform aligns."""
    return np.stack(
        [landmarks[LEFT_EYE].mean(0), landmarks[RIGHT_EYE].mean(0), landmarks[MOUTH].mean(0)]
    ).astype(np.float64)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src points to dst: 2x3 matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    # complex-number form: d ~ z * s with z = a + ib
    den = (s**2).sum()
    if den < 1e-9:
        return np.array([[1, 0, mu_d[0] - mu_s[0]], [0, 1, mu_d[1] - mu_s[1]]], np.float64)
    a = (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum() / den
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / den
    rot = np.array([[a, -b], [b, a]])
    t = mu_d - rot @ mu_s
    return np.hstack([rot, t[:, None]])


def region_mask(landmarks: np.ndarray, kind: str, size: int, feather: float) -> np.ndarray:
    """Feathered mask (size, size) float32 in [0, 1] of the mouth or eye region of `landmarks` (crop px)."""
    if kind == "mouth":
        groups = [MOUTH]
    elif kind == "eye":
        groups = [LEFT_EYE + LEFT_BROW, RIGHT_EYE + RIGHT_BROW]
    else:
        raise ValueError(f"unknown swap kind {kind!r}; use one of {KINDS}")
    mask = np.zeros((size, size), np.float32)
    hulls = []
    for group in groups:
        pts = landmarks[group].astype(np.float64)
        c = pts.mean(0)
        hulls.append(cv2.convexHull(np.round(c + (pts - c) * GROW[kind]).astype(np.int32)))
        cv2.fillConvexPoly(mask, hulls[-1], 1.0)
    allpts = np.concatenate(hulls).reshape(-1, 2)
    x0, y0 = allpts.min(0)
    x1, y1 = allpts.max(0)
    # feather width follows the region (one mouth, one eye with its brow), not the crop
    extent = np.mean([max(np.ptp(h[:, 0, 0]), np.ptp(h[:, 0, 1]), 1) for h in hulls])
    sigma = feather * float(extent)
    if sigma > 0.3:
        # blur only the region's neighbourhood: a wide Gaussian over the whole crop costs ~15 ms
        m = int(3 * sigma) + 2
        xa, ya, xb, yb = max(0, x0 - m), max(0, y0 - m), min(size, x1 + m + 1), min(size, y1 + m + 1)
        if xb > xa and yb > ya:
            mask[ya:yb, xa:xb] = cv2.GaussianBlur(mask[ya:yb, xa:xb], (0, 0), sigma)
    return np.clip(mask, 0.0, 1.0)


def paste(
    img_a: np.ndarray, lm_a: np.ndarray, img_b: np.ndarray, lm_b: np.ndarray, kind: str, feather: float
) -> tuple[np.ndarray, np.ndarray]:
    """b with a's region pasted (aligned): returns (image uint8, mask uint8) in b's frame."""
    size = img_b.shape[0]
    m = similarity(anchors(lm_a), anchors(lm_b))
    warped = cv2.warpAffine(img_a, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    lm_a_in_b = lm_a @ m[:, :2].T + m[:, 2]
    mask = region_mask(lm_a_in_b, kind, size, feather)
    out = img_b.astype(np.float32) * (1 - mask[..., None]) + warped.astype(np.float32) * mask[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), np.round(mask * 255).astype(np.uint8)


def choose_frames(num_frames: int, count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """`count` triples (a, b, id) of distinct frame indices, a and b at least a quarter of the segment apart when
    possible (different mouth/eye states are more likely)."""
    if num_frames < 3:
        return []
    gap = max(1, num_frames // 4)
    out = []
    for _ in range(count):
        a = int(rng.integers(num_frames))
        far = [i for i in range(num_frames) if abs(i - a) >= gap] or [i for i in range(num_frames) if i != a]
        b = int(rng.choice(far))
        rest = [i for i in range(num_frames) if i not in (a, b)]
        out.append((a, b, int(rng.choice(rest))))
    return out


def make_pairs(
    frames: np.ndarray, landmarks: np.ndarray, kind: str, count: int, feather: float, rng: np.random.Generator
) -> list[dict]:
    """Pairs of one kind for a segment: dicts with index_a/index_b/index_id and uint8 a_on_b, b_on_a, masks."""
    pairs = []
    for a, b, i in choose_frames(len(frames), count, rng):
        a_on_b, mask_on_b = paste(frames[a], landmarks[a], frames[b], landmarks[b], kind, feather)
        b_on_a, mask_on_a = paste(frames[b], landmarks[b], frames[a], landmarks[a], kind, feather)
        pairs.append(
            {
                "kind": kind,
                "index_a": a,
                "index_b": b,
                "index_id": i,
                "a_on_b": a_on_b,
                "b_on_a": b_on_a,
                "mask_on_b": mask_on_b,
                "mask_on_a": mask_on_a,
            }
        )
    return pairs
