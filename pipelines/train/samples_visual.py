"""Sample builders of the visual stages that the shared ones in data.py do not cover.

`expression_windows`: segments -> (identity frame, driving frame d, the K frames centred on d, d's landmarks) for
the expression stage. Landmarks are stored as fractions of the crop side, so the motion loss can place them on
images of any size.
"""

from __future__ import annotations

import logging

import numpy as np

from pipelines.train import data
from preprocessing.schema import decode_jpeg, f32_array

log = logging.getLogger(__name__)


def window_indices(centre: int, window: int, num_frames: int) -> np.ndarray:
    """The K frame indices centred on `centre`, clamped to the segment (edge frames repeat)."""
    start = centre - window // 2
    return np.clip(np.arange(start, start + window), 0, num_frames - 1)


def expression_windows(window: int, per_segment: int, seed: int) -> data.RowFn:
    """Segments -> `per_segment` samples each: identity (S,S,3), driving (S,S,3), window (K,S,S,3) uint8 and
    landmarks (68,2) float32 in [0,1] of the driving frame. Identity and driving are two different frames of the
    segment; the same seed and segment give the same samples."""
    if window < 1 or per_segment < 1:
        raise ValueError(
            f"expression_windows: window and per_segment must be >= 1, got {window}, {per_segment}"
        )

    def build(row: dict) -> list[dict]:
        key = row.get("segment_id", "?")
        try:
            t = int(row["num_frames"])
            if t < 2:
                return []
            size = float(row["size"])
            marks = f32_array(row["landmarks"], (t, 68, 2))
            rng = data.rng_for(seed, key)
            out = []
            for _ in range(per_segment):
                i, d = (int(x) for x in rng.choice(t, size=2, replace=False))
                idx = window_indices(d, window, t)
                out.append(
                    {
                        "identity": decode_jpeg(row["frames"][i]),
                        "driving": decode_jpeg(row["frames"][d]),
                        "window": np.stack([decode_jpeg(row["frames"][int(k)]) for k in idx]),
                        "landmarks": (marks[d] / size).astype(np.float32),
                    }
                )
            return out
        except Exception as exc:  # one bad row must not abort the dataset; say which and why
            log.warning("expression_windows: skipping segment %s: %s: %s", key, type(exc).__name__, exc)
            return []

    return build
