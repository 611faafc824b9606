"""The Parquet tables written by `edtalk preprocess`: schemas, encode/decode helpers and reject reason codes.

Array columns are raw little-endian float32 bytes whose shape comes from other columns (see docs/contracts.md);
`decode_segment` / `decode_pair` turn a row (a dict, as Ray Data and pyarrow's `to_pylist` give) into numpy arrays.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow as pa

SAMPLES_PER_FRAME = 640  # 16 kHz audio / 25 fps video
MEL_BINS = 80
MEL_WINDOW = 16

# Reject reason codes (the `reason` column of `rejects`).
UNREADABLE = "unreadable"
NO_VIDEO_STREAM = "no_video_stream"
TOO_SHORT = "too_short"
NO_FACE = "no_face"
MULTIPLE_FACES = "multiple_faces"
FACE_TOO_SMALL = "face_too_small"
DECODE_TIMEOUT = "decode_timeout"
INTERNAL_ERROR = "internal_error"
REASONS = (
    UNREADABLE,
    NO_VIDEO_STREAM,
    TOO_SHORT,
    NO_FACE,
    MULTIPLE_FACES,
    FACE_TOO_SMALL,
    DECODE_TIMEOUT,
    INTERNAL_ERROR,
)

# Segment flags (the `flags` column of `segments`): the segment stays usable for the visual stages.
FLAG_NO_AUDIO = "no_audio"
FLAG_NO_SPEECH = "no_speech"
FLAG_SIDECAR_AUDIO = "sidecar_audio"


class RejectError(Exception):
    """Raised inside a per-source step to reject the source with a reason code (never a crash, never a drop)."""

    def __init__(self, reason: str, step: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; known: {REASONS}")
        super().__init__(message)
        self.reason = reason
        self.step = step
        self.message = message


SEGMENTS = pa.schema(
    [
        ("segment_id", pa.string()),
        ("source", pa.string()),
        ("source_hash", pa.string()),
        ("speaker", pa.string()),
        ("emotion", pa.string()),
        ("split", pa.string()),
        ("start_frame", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("size", pa.int32()),
        ("frames", pa.list_(pa.binary())),
        ("landmarks", pa.binary()),
        ("box", pa.list_(pa.float32())),
        ("audio", pa.binary()),
        ("mel", pa.binary()),
        ("has_audio", pa.bool_()),
        ("speech_ratio", pa.float32()),
        ("audio_usable", pa.bool_()),
        ("flags", pa.list_(pa.string())),
        ("transcript", pa.string()),
        pa.field("speech_states", pa.binary(), nullable=True),
        ("speech_states_dim", pa.int32()),
        pa.field("factors", pa.string(), nullable=True),
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("segment_id", pa.string()),
        ("kind", pa.string()),
        ("index_a", pa.int32()),
        ("index_b", pa.int32()),
        ("index_id", pa.int32()),
        ("frame_a", pa.binary()),
        ("frame_b", pa.binary()),
        ("frame_id", pa.binary()),
        ("a_on_b", pa.binary()),
        ("b_on_a", pa.binary()),
        ("mask_on_b", pa.binary()),
        ("mask_on_a", pa.binary()),
    ]
)

REJECTS = pa.schema(
    [
        ("source", pa.string()),
        ("source_hash", pa.string()),
        ("step", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)

TABLES = {"segments": SEGMENTS, "pairs": PAIRS, "rejects": REJECTS}


# ---- encoding -------------------------------------------------------------------------------------------------


def f32_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def f32_array(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> HxWx3 uint8 RGB."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable JPEG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def encode_png(gray: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(gray, dtype=np.uint8))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> HxW uint8."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError("not a decodable PNG")
    return img


def decode_segment(row: dict) -> dict:
    """A `segments` row -> dict with numpy arrays.

    frames (T,S,S,3) uint8 RGB, landmarks (T,68,2) float32 crop px, box (4,), audio (T*640,), mel (T,80,16),
    speech_states (T,D) or None, factors {name: list} or None; scalar columns are passed through.
    """
    t = int(row["num_frames"])
    out = {k: v for k, v in row.items() if k not in ("frames", "landmarks", "audio", "mel", "speech_states")}
    out["frames"] = (
        np.stack([decode_jpeg(b) for b in row["frames"]]) if t else np.zeros((0, 0, 0, 3), np.uint8)
    )
    out["landmarks"] = f32_array(row["landmarks"], (t, 68, 2))
    out["box"] = np.asarray(row["box"], np.float32)
    out["audio"] = f32_array(row["audio"], (t * SAMPLES_PER_FRAME,))
    out["mel"] = f32_array(row["mel"], (t, MEL_BINS, MEL_WINDOW))
    dim = int(row.get("speech_states_dim") or 0)
    states = row.get("speech_states")
    out["speech_states"] = f32_array(states, (t, dim)) if states is not None and dim else None
    factors = row.get("factors")
    out["factors"] = json.loads(factors) if factors else None
    out["flags"] = list(row.get("flags") or [])
    return out


def decode_pair(row: dict) -> dict:
    """A `pairs` row -> dict: frame_a/frame_b/frame_id/a_on_b/b_on_a (S,S,3) uint8, mask_on_b/mask_on_a (S,S) uint8."""
    out = {k: v for k, v in row.items()}
    for key in ("frame_a", "frame_b", "frame_id", "a_on_b", "b_on_a"):
        out[key] = decode_jpeg(row[key])
    for key in ("mask_on_b", "mask_on_a"):
        out[key] = decode_png(row[key])
    return out


def empty_table(name: str) -> pa.Table:
    return TABLES[name].empty_table()


def reject_row(source: str, source_hash: str, step: str, reason: str, message: str) -> dict:
    return {"source": source, "source_hash": source_hash, "step": step, "reason": reason, "message": message}
