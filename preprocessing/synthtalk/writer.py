"""Writing one clip: H.264 + AAC mp4 through PyAV, a transcript `.txt` and the `.json` sidecar.

Output is byte-for-byte reproducible: one encoder thread, fixed encoder options, no creation time in the container.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from preprocessing.synthtalk.audio import FPS, SAMPLE_RATE

AAC_FRAME = 1024  # samples per AAC frame


def write_mp4(
    path: Path,
    frames: Iterable[np.ndarray],
    size: int,
    waveform: np.ndarray,
    crf: int = 20,
    preset: str = "veryfast",
) -> int:
    """Encode RGB frames at 25 fps and a 16 kHz mono waveform into `path`; returns the number of frames written."""
    tmp = path.with_name(path.name + ".part")
    n = 0
    with av.open(str(tmp), mode="w", format="mp4") as container:
        container.metadata.clear()
        video = container.add_stream("libx264", rate=FPS)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        video.thread_count = 1  # x264 with one thread is deterministic
        video.options = {"crf": str(crf), "preset": preset, "threads": "1", "bframes": "2"}
        audio = container.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "mono"
        audio.bit_rate = 64000
        audio.thread_count = 1
        # The default two-loop AAC search costs more than drawing the frames.
        audio.options = {"aac_coder": "fast"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            for packet in video.encode(frame):
                container.mux(packet)
            n += 1
        for packet in video.encode():
            container.mux(packet)
        samples = np.ascontiguousarray(waveform, dtype=np.float32)
        for start in range(0, len(samples), AAC_FRAME):
            chunk = samples[start : start + AAC_FRAME]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = start
            frame.time_base = Fraction(1, SAMPLE_RATE)
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return n


def write_sidecars(
    video_path: Path,
    *,
    speaker: str,
    emotion: str,
    split: str,
    landmarks: np.ndarray,
    factors: dict[str, np.ndarray],
    transcript: str,
) -> tuple[Path, Path]:
    """Write NAME.txt and NAME.json next to NAME.mp4 in the format of docs/contracts.md."""
    txt = video_path.with_suffix(".txt")
    js = video_path.with_suffix(".json")
    txt.write_text(transcript + "\n", encoding="utf-8")
    doc = {
        "speaker": speaker,
        "emotion": emotion,
        "split": split,
        "fps": float(FPS),
        # Multiples of 1/16 px (the drawing grid), exact in JSON.
        "landmarks": [[[float(x), float(y)] for x, y in frame] for frame in landmarks],
        "factors": {
            name: [int(v) for v in vals] if vals.dtype.kind in "iu" else [round(float(v), 6) for v in vals]
            for name, vals in factors.items()
        },
        "transcript": transcript,
    }
    tmp = js.with_name(js.name + ".part")
    tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, js)
    return txt, js
