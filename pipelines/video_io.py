"""Video in and out for generation and evaluation: a streaming H.264 + AAC mp4 writer (PyAV) and a chunked
25 fps reader of driving videos (decord).

Both stream: the writer muxes frames and their audio as they come, the reader decodes only the frames asked for,
so memory does not grow with the length of a video.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from preprocessing.decode import decord_turns, quarter_turns

FPS = 25  # the project's video timeline
SAMPLE_RATE = 16000  # the project's audio rate
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv")


class MediaError(ValueError):
    """A video or image input that cannot be used (unreadable, no video stream, empty)."""


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


FRAGMENTED = {
    "movflags": "empty_moov+default_base_moof+frag_keyframe",
    "frag_duration": "1000000",
    "flush_packets": "1",
}


class VideoWriter:
    """Writes an mp4 (H.264 video at 25 fps, optional AAC audio) frame chunk by frame chunk.

    Audio is timed by sample count and video by frame count from the same origin, so the mux is aligned to the
    sample: frame t starts at sample t*640 (ffmpeg's mp4 edit list hides the AAC encoder's priming delay).
    Call `write(frames, audio)` with the audio belonging to those frames so the muxer interleaves the streams.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        sample_rate: int | None = SAMPLE_RATE,
        crf: int = 18,
        preset: str = "veryfast",
        audio_bitrate: int = 128_000,
        fps: int = FPS,
        fragmented: bool = False,
    ):
        if width % 2 or height % 2:
            raise MediaError(f"{path}: H.264 (yuv420p) needs even frame sides, got {width}x{height}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        # fragmented: a fragmented MP4 (moov first, then a fragment per second, each flushed to the file as it is
        # muxed), playable while it is written (`edtalk serve`'s streaming route)
        self.container = av.open(str(path), mode="w", options=FRAGMENTED if fragmented else {})
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = "yuv420p"
        # one encoder thread: x264's frame threads made the bitstream vary from run to run under CPU load
        # (measured here), and a generated video should be reproducible; encoding is a small share of the time
        self.video.options = {"crf": str(crf), "preset": preset, "threads": "1"}
        self.video.codec_context.time_base = Fraction(1, fps)
        self.audio = None
        if sample_rate:
            self.audio = self.container.add_stream("aac", rate=sample_rate)
            self.audio.layout = "mono"
            self.audio.bit_rate = audio_bitrate
        self.sample_rate = sample_rate
        self.frames_written = 0
        self.samples_written = 0
        self.encode_s = 0.0  # seconds spent in the video and audio encoders (for benchmarks)
        self.mux_s = 0.0  # seconds spent writing packets into the container

    def write(self, frames: np.ndarray, audio: np.ndarray | None = None) -> None:
        """frames: uint8 [N,H,W,3] RGB; audio: float32 mono samples at `sample_rate` (any length, usually N*640)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise MediaError(
                f"{self.path}: frames must be uint8 [N,{self.height},{self.width},3], got {frames.dtype} "
                f"{list(frames.shape)}"
            )
        for frame in frames:
            t0 = time.perf_counter()
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self.frames_written
            self.frames_written += 1
            packets = self.video.encode(vf)
            t1 = time.perf_counter()
            self.container.mux(packets)
            self.encode_s += t1 - t0
            self.mux_s += time.perf_counter() - t1
        if audio is not None and len(audio):
            if self.audio is None:
                raise MediaError(f"{self.path}: audio given to a writer opened without an audio stream")
            samples = np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)[None, :]
            af = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            af.sample_rate = self.sample_rate
            af.pts = self.samples_written
            af.time_base = Fraction(1, self.sample_rate)
            self.samples_written += samples.shape[1]
            t0 = time.perf_counter()
            packets = self.audio.encode(af)
            t1 = time.perf_counter()
            self.container.mux(packets)
            self.encode_s += t1 - t0
            self.mux_s += time.perf_counter() - t1

    def close(self) -> None:
        if self.container is None:
            return
        t0 = time.perf_counter()
        packets = self.video.encode(None) + (self.audio.encode(None) if self.audio is not None else [])
        t1 = time.perf_counter()
        self.container.mux(packets)
        self.container.close()
        self.encode_s += t1 - t0
        self.mux_s += time.perf_counter() - t1
        self.container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not leave a half-written file that looks finished
            try:
                self.container.close()
            finally:
                self.container = None
                self.path.unlink(missing_ok=True)


class DrivingVideo:
    """A video resampled to 25 fps by timestamps, read in chunks (decord decodes only what is asked for).

    `frames(start, stop)` returns uint8 RGB [N,H,W,3] for output frames start..stop-1; indices past the end of a
    shorter video run back and forth through it (ping-pong), so a short driving clip never jumps.
    """

    def __init__(self, path: str | Path):
        import decord

        self.path = Path(path)
        if not self.path.is_file():
            raise MediaError(f"driving video {path} does not exist; pass an existing video file")
        try:
            self.reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except Exception as exc:  # decord raises DECORDError or RuntimeError for unreadable files
            raise MediaError(
                f"driving video {path} cannot be decoded ({exc}); pass an mp4/mov/avi/mkv with a video stream"
            ) from exc
        self.source_frames = len(self.reader)
        if self.source_frames == 0:
            raise MediaError(f"driving video {path} has no frames; pass a video with at least one frame")
        self.source_fps = float(self.reader.get_avg_fps()) or FPS
        # frames of the 25 fps timeline covered by the source
        self.num_frames = max(1, int(round(self.source_frames * FPS / self.source_fps)))
        # a clip stored turned with a display matrix is shown upright (decord turns only some containers' frames)
        self.turns = decord_turns(self.reader, str(path))
        first = self.frames(0, 1)[0]
        self.height, self.width = first.shape[:2]

    def source_index(self, t: np.ndarray) -> np.ndarray:
        """Output frame indices (25 fps, any length) -> source frame indices (ping-pong past the end)."""
        n = self.num_frames
        period = max(1, 2 * n - 2)
        t = np.asarray(t) % period if n > 1 else np.zeros_like(np.asarray(t))
        t = np.where(t >= n, period - t, t)
        src = np.floor(t * self.source_fps / FPS + 1e-6).astype(np.int64)
        return np.clip(src, 0, self.source_frames - 1)

    def frames(self, start: int, stop: int) -> np.ndarray:
        idx = self.source_index(np.arange(start, stop))
        frames = self.reader.get_batch(idx.tolist()).asnumpy()
        return np.ascontiguousarray(np.rot90(frames, self.turns, axes=(1, 2))) if self.turns else frames

    def chunks(self, chunk: int, total: int | None = None) -> Iterator[np.ndarray]:
        total = self.num_frames if total is None else total
        for start in range(0, total, chunk):
            yield self.frames(start, min(total, start + chunk))


def read_image(path: str | Path) -> np.ndarray:
    """Any image file -> uint8 RGB [H,W,3]; a clear error for a missing, empty or undecodable file."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"image {path} does not exist; pass an existing image file")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise MediaError(f"image {path} cannot be decoded; pass a PNG/JPEG/BMP/WebP image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def probe(path: str | Path) -> dict:
    """Stream facts of a media file: frame count, fps, duration and audio rate/channels (for tests and reports)."""
    with av.open(str(path)) as container:
        info: dict = {"video": None, "audio": None}
        for stream in container.streams:
            if stream.type == "video" and info["video"] is None:
                info["video"] = {
                    "codec": stream.codec_context.name,
                    "frames": stream.frames,
                    "fps": float(stream.average_rate or 0),
                    "width": stream.codec_context.width,
                    "height": stream.codec_context.height,
                    "duration_s": float(stream.duration * stream.time_base) if stream.duration else None,
                }
            elif stream.type == "audio" and info["audio"] is None:
                info["audio"] = {
                    "codec": stream.codec_context.name,
                    "sample_rate": stream.codec_context.sample_rate,
                    "channels": stream.codec_context.channels,
                    "duration_s": float(stream.duration * stream.time_base) if stream.duration else None,
                }
    return info


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first audio stream of a container -> float32 mono at `sample_rate` (PyAV's resampler)."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise MediaError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts = []
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(-1))
        stream = container.streams.audio[0]
        duration = float(stream.duration * stream.time_base) if stream.duration else None
    wave = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    # the encoder pads its last frame; the stream's duration says where the real audio ends
    return wave[: int(round(duration * sample_rate))] if duration else wave


def decode_frames(path: str | Path) -> np.ndarray:
    """All frames of a (short) video as uint8 RGB [T,H,W,3], upright (display rotation applied); for tests and
    evaluation of generated clips."""
    with av.open(str(path)) as container:
        return np.stack(
            [
                np.rot90(f.to_ndarray(format="rgb24"), quarter_turns(f.rotation or 0))
                for f in container.decode(video=0)
            ]
        )
