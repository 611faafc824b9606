"""Sample builders of the audio stages: one `segments` row -> training samples (Ray Data flat_map functions).

Every builder is seeded by (seed, segment id) like the visual ones in `pipelines/train/data.py`, decodes only the
frames it uses, skips segments that are unusable for audio (`audio_usable` false: no audio or too little speech)
and catches errors per row (a bad row is logged with its id and left out; it must not abort the dataset).

Samples hold images as uint8 HxWx3 (the runner turns them into [-1, 1] tensors and resizes them to the model's
side), landmarks as float32 (K,68,2) in units of the crop side (x/S, y/S: valid at any resize), mel windows as
float32 (K,80,16) (one contract window per video frame) and audio as float32 16 kHz.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from pipelines.train.data import RowFn, rng_for
from preprocessing.schema import MEL_BINS, MEL_WINDOW, SAMPLES_PER_FRAME, decode_jpeg, f32_array

log = logging.getLogger(__name__)


def _frames(row: dict, indices) -> np.ndarray:
    return np.stack([decode_jpeg(row["frames"][int(i)]) for i in indices])


def _mel(row: dict, t: int) -> np.ndarray:
    return f32_array(row["mel"], (t, MEL_BINS, MEL_WINDOW))


def _landmarks(row: dict, t: int) -> np.ndarray:
    """(T,68,2) landmarks as fractions of the crop side (the stored ones are crop pixels)."""
    return f32_array(row["landmarks"], (t, 68, 2)) / np.float32(row["size"])


def _guarded(name: str, row: dict, build: Callable[[], Iterator[dict]]) -> list[dict]:
    try:
        return list(build())
    except Exception as exc:  # one bad row must not abort the dataset; say which and why
        log.warning("%s: skipping segment %s: %s: %s", name, row.get("segment_id"), type(exc).__name__, exc)
        return []


def _usable(row: dict, min_frames: int) -> bool:
    return bool(row["audio_usable"]) and int(row["num_frames"]) >= min_frames


def sync_pairs(n_frames: int, per_segment: int, min_shift: int, seed: int) -> RowFn:
    """SyncNet samples: `n_frames` consecutive frames (+ their landmarks) and ONE mel window, the window of the
    centre frame (label 1) or of a frame at least `min_shift` frames away in the same segment (label 0).

    Samples alternate in-sync / off-sync, so every segment gives a balanced set. Segments too short for a shift
    of `min_shift` both ways around some window are skipped.
    """

    def build(row: dict) -> list[dict]:
        def gen() -> Iterator[dict]:
            t = int(row["num_frames"])
            if not _usable(row, n_frames + min_shift):
                return
            rng = rng_for(seed, "sync:" + row["segment_id"])
            mel, lms = _mel(row, t), _landmarks(row, t)
            c = n_frames // 2
            for k in range(per_segment):
                s = int(rng.integers(0, t - n_frames + 1))
                centre = s + c
                label = k % 2 == 0
                if not label:
                    far = np.flatnonzero(np.abs(np.arange(t) - centre) >= min_shift)
                    if far.size == 0:
                        continue
                    centre = int(rng.choice(far))
                idx = range(s, s + n_frames)
                yield {
                    "frames": _frames(row, idx),
                    "landmarks": lms[s : s + n_frames],
                    "mel": mel[centre],
                    "in_sync": np.float32(label),
                }

        return _guarded("sync_pairs", row, gen)

    return build


def audio_clips(length: int, per_segment: int, seed: int, identity: bool = True) -> RowFn:
    """Runs of `length` consecutive frames with their mel windows and landmarks (audio_lip, audio_pose, audio_eye).

    Keys: frames (L,S,S,3), mel (L,80,16), landmarks (L,68,2), and with `identity` a random frame of the same
    segment (the identity image the GT frames are re-rendered from).
    """

    def build(row: dict) -> list[dict]:
        def gen() -> Iterator[dict]:
            t = int(row["num_frames"])
            if not _usable(row, length):
                return
            rng = rng_for(seed, "clip:" + row["segment_id"])
            mel, lms = _mel(row, t), _landmarks(row, t)
            for _ in range(per_segment):
                s = int(rng.integers(0, t - length + 1))
                sample = {
                    "frames": _frames(row, range(s, s + length)),
                    "mel": mel[s : s + length],
                    "landmarks": lms[s : s + length],
                }
                if identity:
                    sample["identity"] = decode_jpeg(row["frames"][int(rng.integers(0, t))])
                yield sample

        return _guarded("audio_clips", row, gen)

    return build


def encode_text(text: str, max_bytes: int) -> tuple[np.ndarray, np.int32]:
    """A transcript as fixed-size UTF-8 bytes (int32, zero-padded) + its byte count, so it batches like a tensor;
    `decode_text` turns a batch back into strings for the model's own tokenizer."""
    raw = text.encode("utf-8")[:max_bytes]
    out = np.zeros(max_bytes, np.int32)
    out[: len(raw)] = np.frombuffer(raw, np.uint8)
    return out, np.int32(len(raw))


def decode_text(codes, lengths) -> list[str]:
    """Inverse of `encode_text` for a batch ([B,max_bytes], [B]); a multi-byte character cut at the end is dropped."""
    codes, lengths = np.asarray(codes), np.asarray(lengths)
    return [
        bytes(codes[i, : int(lengths[i])].astype(np.uint8)).decode("utf-8", errors="ignore")
        for i in range(len(codes))
    ]


def expression_windows(
    window: int, target_frames: int, per_segment: int, max_text_bytes: int, seed: int
) -> RowFn:
    """audio_expression samples: up to `window` frames of a segment's speech (zero-padded to the window, with the
    real sample count), the segment's transcript, and `target_frames` frames spread evenly over the same span
    (their EXLN weights, averaged, are the target of Eq. 15).
    """

    def build(row: dict) -> list[dict]:
        def gen() -> Iterator[dict]:
            t = int(row["num_frames"])
            if not _usable(row, 1):
                return
            rng = rng_for(seed, "expr:" + row["segment_id"])
            audio = f32_array(row["audio"], (t * SAMPLES_PER_FRAME,))
            text, n_bytes = encode_text(str(row.get("transcript") or ""), max_text_bytes)
            span = min(window, t)
            for _ in range(per_segment):
                s = int(rng.integers(0, t - span + 1))
                wave = np.zeros(window * SAMPLES_PER_FRAME, np.float32)
                wave[: span * SAMPLES_PER_FRAME] = audio[
                    s * SAMPLES_PER_FRAME : (s + span) * SAMPLES_PER_FRAME
                ]
                idx = np.linspace(s, s + span - 1, target_frames).round().astype(int)
                yield {
                    "speech": wave,
                    "speech_samples": np.int64(span * SAMPLES_PER_FRAME),
                    "text": text,
                    "text_bytes": n_bytes,
                    "frames": _frames(row, idx),
                }

        return _guarded("expression_windows", row, gen)

    return build
