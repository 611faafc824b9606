"""Video decoding onto the project's 25 fps timeline, by timestamps (variable frame rate included).

decord first (fast, random access); PyAV where decord cannot open or read the file. Failures become RejectErrors
with a reason code: unreadable, no_video_stream, decode_timeout.

Frames come out as they are meant to be shown: a phone clip stored turned, with a display matrix saying how to turn
it back, is turned back. PyAV reports the matrix's rotation on each frame; decord turns some containers' frames
itself (mp4/mov) but not others (mkv), so `decord_turns` compares its first frame with PyAV's to know what is left.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from preprocessing.schema import DECODE_TIMEOUT, NO_VIDEO_STREAM, UNREADABLE, RejectError

STEP = "decode"
CHUNK = 32  # frames decoded between two checks of the time limit
# PyAV demuxers that read still images: a picture renamed to .mp4 is not a video.
IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "gif", "tiff_pipe", "mjpeg")
# A file whose frames end this far before the duration its container declares is truncated (its index survived
# but its data did not): rejected as unreadable instead of kept as a shorter clip.
TRUNCATED_SHORTFALL = 0.1  # share of the declared duration
TRUNCATED_MIN_S = 0.5  # and at least this many seconds


@dataclass
class Video:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB on the output timeline
    fps: float  # output frame rate
    source_fps: float  # the container's average frame rate
    duration: float  # seconds of video in the source (before any max_seconds cap)
    decoder: str  # "decord" or "pyav"


def target_count(duration: float, fps: float, max_seconds: float) -> int:
    """Frames on the output timeline: round(duration x fps), capped by max_seconds (0 = no cap)."""
    if max_seconds > 0:
        duration = min(duration, max_seconds)
    return int(round(duration * fps))


def pick_indices(starts: np.ndarray, count: int, fps: float) -> np.ndarray:
    """For each output time k/fps, the source frame shown at that time (last frame starting at or before it)."""
    times = np.arange(count) / fps
    idx = np.searchsorted(starts, times + 1e-6, side="right") - 1
    return np.clip(idx, 0, len(starts) - 1)


def _timed_out(t0: float, timeout_s: float, path: str) -> None:
    if time.monotonic() - t0 > timeout_s:
        raise RejectError(
            DECODE_TIMEOUT,
            STEP,
            f"{path}: decoding took longer than decode_timeout_s={timeout_s:g} s; raise preprocess.decode_timeout_s "
            "or re-encode the file",
        )


def quarter_turns(rotation: float) -> int:
    """A display rotation (degrees counter-clockwise, as PyAV's frame.rotation) -> np.rot90 turns that show the
    stored frame upright (0-3)."""
    return int(round(rotation / 90.0)) % 4


def first_frame_pyav(path: str) -> tuple[np.ndarray, int] | None:
    """The first frame as stored and its quarter turns to upright (PyAV), None when PyAV cannot read one."""
    import av

    try:
        with av.open(path) as container:
            frame = next(container.decode(video=0))
            return frame.to_ndarray(format="rgb24"), quarter_turns(frame.rotation or 0)
    except Exception:
        return None


def decord_turns(reader, path: str) -> int:
    """Quarter turns still to apply to the frames of a decord VideoReader of `path` to show them upright: 0 when
    the file has no rotation or decord already applied it."""
    probe = first_frame_pyav(path)
    if probe is None or probe[1] == 0:
        return 0
    stored, turns = probe
    first = reader[0].asnumpy()
    reader.seek(0)
    upright = np.rot90(stored, turns)
    if first.shape != upright.shape:
        return turns if first.shape == stored.shape else 0
    if first.shape != stored.shape:  # a quarter turn, and decord's frame already has the upright shape
        return 0
    diff = np.abs(first.astype(np.int16) - upright).mean(), np.abs(first.astype(np.int16) - stored).mean()
    return 0 if diff[0] <= diff[1] else turns  # half turn: the closer of the two


def _decode_decord(path: str, fps: float, max_seconds: float, timeout_s: float, t0: float) -> Video:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    if n == 0:
        raise ValueError("no frames")
    turns = decord_turns(vr, path)
    stamps = vr.get_frame_timestamp(range(n))
    starts = stamps[:, 0].astype(np.float64)
    duration = float(stamps[-1, 1])
    count = target_count(duration, fps, max_seconds)
    idx = pick_indices(starts, count, fps)
    uniq, inverse = np.unique(idx, return_inverse=True)
    chunks = []
    for i in range(0, len(uniq), CHUNK):
        chunks.append(vr.get_batch(uniq[i : i + CHUNK].tolist()).asnumpy())
        _timed_out(t0, timeout_s, path)
    frames = np.concatenate(chunks)[inverse] if chunks else np.zeros((0, 1, 1, 3), np.uint8)
    if turns:
        frames = np.ascontiguousarray(np.rot90(frames, turns, axes=(1, 2)))
    return Video(frames, fps, float(vr.get_avg_fps()), duration, "decord")


def _decode_pyav(path: str, fps: float, max_seconds: float, timeout_s: float, t0: float) -> Video:
    import av

    try:
        container = av.open(path)
    except Exception as exc:
        raise RejectError(
            UNREADABLE, STEP, f"{path}: not a readable media file ({exc}); check or re-encode it"
        ) from exc
    with container:
        if container.format.name in IMAGE_FORMATS or any(n in container.format.name for n in ("_pipe",)):
            raise RejectError(
                UNREADABLE,
                STEP,
                f"{path}: is a still image ({container.format.name}), not a video; remove it",
            )
        if not container.streams.video:
            raise RejectError(
                NO_VIDEO_STREAM, STEP, f"{path}: has no video stream; remove it or give the video file"
            )
        stream = container.streams.video[0]
        avg = float(stream.average_rate) if stream.average_rate else fps
        cap = max_seconds if max_seconds > 0 else float("inf")
        out: list[np.ndarray] = []
        prev = None
        last_start = 0.0
        try:
            for k, frame in enumerate(container.decode(stream)):
                start = float(frame.time) if frame.time is not None else k / avg
                img = frame.to_ndarray(format="rgb24")
                if frame.rotation:
                    img = np.ascontiguousarray(np.rot90(img, quarter_turns(frame.rotation)))
                # emit every output time that falls before this frame starts
                while len(out) / fps < min(start, cap) - 1e-6:
                    out.append(prev if prev is not None else img)
                prev, last_start = img, start
                if k % CHUNK == 0:
                    _timed_out(t0, timeout_s, path)
                if len(out) / fps >= cap:
                    break
        except RejectError:
            raise
        except Exception as exc:
            if prev is None:
                raise RejectError(
                    UNREADABLE, STEP, f"{path}: the video stream cannot be decoded ({exc})"
                ) from exc
        if prev is None:
            raise RejectError(UNREADABLE, STEP, f"{path}: the video stream holds no decodable frame")
        duration = last_start + 1.0 / avg
        if len(out) / fps < cap:  # decoding ran to the stream's end (or to an error): all of it is here
            _check_complete(path, duration, _declared_duration(container, stream))
        count = target_count(duration, fps, max_seconds)
        while len(out) < count:
            out.append(prev)
        frames = np.stack(out[:count]) if count else np.zeros((0,) + prev.shape, np.uint8)
        return Video(frames, fps, avg, duration, "pyav")


def _declared_duration(container, stream) -> float | None:
    """Seconds of video the file's index declares (the stream's, else the container's), None when unknown."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None


def _check_complete(path: str, decoded: float, declared: float | None) -> None:
    if declared and decoded < declared - max(TRUNCATED_MIN_S, TRUNCATED_SHORTFALL * declared):
        raise RejectError(
            UNREADABLE,
            STEP,
            f"{path}: truncated: its frames end at {decoded:.2f} s but its index declares {declared:.2f} s; "
            "copy or download the file again",
        )


def decode_video(path: str, fps: float = 25.0, max_seconds: float = 0.0, timeout_s: float = 120.0) -> Video:
    """Decode a local video file to RGB frames at `fps`, choosing source frames by their timestamps."""
    t0 = time.monotonic()
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise RejectError(
            UNREADABLE, STEP, f"{path}: empty file (0 bytes); copy or download it again, or remove it"
        )
    try:
        return _decode_decord(path, fps, max_seconds, timeout_s, t0)
    except RejectError:
        raise
    except Exception:
        pass  # decord cannot read it: PyAV decides (and names the real problem)
    return _decode_pyav(path, fps, max_seconds, timeout_s, t0)
