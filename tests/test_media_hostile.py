"""Hostile and odd media made at test time from ../shared/media (issue 23): each must end as the right reject or a
correct segment, never as a wrong clean result."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from testkit import write_video

from preprocessing import schema
from preprocessing.decode import decode_video
from preprocessing.params import PreprocessParams
from preprocessing.sources import discover, hash_all


def process(path, tmp_path, **params):
    """Run one source through SourceProcessor (no Ray) -> (summary, rejects rows)."""
    from preprocessing.dataset import read_rows
    from preprocessing.pipeline import SourceProcessor

    (src,) = hash_all(discover(str(path)))
    out = tmp_path / "out"
    settings = {"max_seconds_per_video": 2.0, "pairs_per_segment": 0, "landmark_backend": "dlib", **params}
    summary = SourceProcessor(PreprocessParams(**settings).to_dict(), str(out))(src.to_dict())
    rejects = read_rows(str(out), "rejects") if (out / "rejects").exists() else []
    return summary, rejects


def first_frames(path, n):
    with av.open(str(path)) as container:
        out = []
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                break
    return out


# ---- 4. truncated file whose index survived --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["edge_cases/DPE__s.mp4", "videos/LivePortrait__d20.mp4"])
def test_truncated_mp4_with_its_index_is_unreadable(media_dir, tmp_path, name):
    data = (media_dir / name).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(0.3 * len(data))])  # these files keep their index (moov) in front
    with pytest.raises(schema.RejectError) as info:
        decode_video(str(path))
    assert info.value.reason == schema.UNREADABLE and "truncated" in info.value.message
    assert str(path) in info.value.message


# ---- 6. a tiny talking-head video --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size", [("videos/LivePortrait__d20.mp4", 56), ("videos/EDTalk__uncrop_Obama.mp4", 48)]
)
def test_tiny_talking_head_is_face_too_small(media_dir, tmp_path, name, size):
    """At these sizes dlib finds the face in no frame (it was rejected as no_face); the enlarged look finds it."""
    frames = first_frames(media_dir / name, 50)
    path = tmp_path / "tiny.mp4"
    write_video(path, [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])
    summary, (row,) = process(path, tmp_path)
    assert summary["reason"] == schema.FACE_TOO_SMALL, row["message"]
    assert "too small for the dlib face detector" in row["message"] and "min_face_px=48" in row["message"]


# ---- 7. rotation metadata ----------------------------------------------------------------------------------------


def rotated_clip(media_dir, tmp_path, angle: int, ext: str, n: int = 50):
    """A real clip (480x360 portrait crop of d20) re-encoded turned clockwise by `angle`, with a display matrix
    saying to turn it back, as phones store portrait video -> (path, the upright frames)."""
    upright = [f[:, 60:420].copy() for f in first_frames(media_dir / "videos" / "LivePortrait__d20.mp4", n)]
    path = tmp_path / f"phone_{angle}.{ext}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = np.rot90(upright[0], -angle // 90).shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(angle)
        for frame in upright:
            stored = np.ascontiguousarray(np.rot90(frame, -angle // 90))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    return path, np.stack(upright)


def assert_upright(frames, upright):
    assert frames.shape[1:] == upright.shape[1:], frames.shape
    assert np.abs(frames.astype(np.int16) - upright[: len(frames)]).mean() < 10


@pytest.mark.parametrize("angle, ext", [(90, "mp4"), (270, "mkv"), (180, "mkv"), (90, "mkv")])
def test_rotated_phone_clip_is_decoded_upright(media_dir, tmp_path, angle, ext):
    from preprocessing.decode import _decode_pyav

    path, upright = rotated_clip(media_dir, tmp_path, angle, ext, n=25)
    assert_upright(decode_video(str(path)).frames, upright)  # decord, turned where decord did not
    assert_upright(
        _decode_pyav(str(path), 25.0, 0.0, 60.0, time.monotonic()).frames, upright
    )  # the fallback decoder


def test_rotated_phone_clip_gives_segments(media_dir, tmp_path):
    path, _ = rotated_clip(media_dir, tmp_path, 90, "mkv")
    summary, rejects = process(path, tmp_path)
    assert summary["status"] == "segments", rejects  # was no_face: the face lay on its side


def test_generation_reads_rotated_driving_video_upright(media_dir, tmp_path):
    from pipelines.video_io import DrivingVideo, decode_frames

    path, upright = rotated_clip(media_dir, tmp_path, 270, "mkv", n=10)
    video = DrivingVideo(path)
    assert (video.height, video.width) == upright.shape[1:3]
    assert_upright(video.frames(0, 10), upright)
    assert_upright(decode_frames(path), upright)


# ---- 8. malformed sidecar contents -------------------------------------------------------------------------------

LANDMARKS_3 = [[[10.0, 20.0]] * 68] * 3


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"fps": "25"}, "fps"),
        ({"fps": -1}, "fps"),
        ({"landmarks": [[1, 2]]}, "landmarks"),
        ({"landmarks": "not a list"}, "landmarks"),
        ({"landmarks": [[["x", "y"]] * 68]}, "landmarks"),
        ({"fps": 25, "landmarks": LANDMARKS_3, "factors": {"yaw": 5}}, "factors.yaw"),
        ({"factors": [1, 2]}, "factors"),
        ({"speaker": {"name": "x"}}, "speaker"),
        ({"transcript": ["a", "b"]}, "transcript"),
        ([1, 2, 3], "top level"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_sidecar_is_rejected_naming_the_field(media_dir, tmp_path, doc, field):
    video = tmp_path / "clip.mp4"
    video.write_bytes((media_dir / "edge_cases" / "DPE__s.mp4").read_bytes())
    (tmp_path / "clip.json").write_text(json.dumps(doc))
    summary, rejects = process(video, tmp_path, landmark_backend="sidecar")
    (row,) = rejects
    assert summary["reason"] == schema.UNREADABLE and row["step"] == "sidecar", row["message"]
    assert f"'{field}'" in row["message"] or field in row["message"]
    assert "Traceback" not in row["message"] and str(tmp_path / "clip.json") in row["message"]
    assert not list((tmp_path / "out" / "rejects").glob("*.internal.parquet"))  # not retried on every run


# ---- 12. smaller: empty file, renamed clip, new labels, AAC padding ----------------------------------------------


def test_zero_byte_file_is_called_empty(tmp_path):
    path = tmp_path / "zero.mp4"
    path.write_bytes(b"")
    with pytest.raises(schema.RejectError) as info:
        decode_video(str(path))
    assert info.value.reason == schema.UNREADABLE and "empty file (0 bytes)" in info.value.message


def test_renamed_clip_gets_its_new_path_and_new_labels_are_reported(media_dir, tmp_path, caplog):
    """Finished videos are skipped by content hash; a rename is followed in the tables, a relabel is warned about."""
    from preprocessing.dataset import read_rows
    from preprocessing.pipeline import run

    first = tmp_path / "a" / "clip.mp4"
    first.parent.mkdir()
    first.write_bytes((media_dir / "edge_cases" / "DPE__s.mp4").read_bytes())
    summary, _ = process(first, tmp_path)
    assert summary["status"] == "segments"
    moved = tmp_path / "b" / "renamed.mp4"
    moved.parent.mkdir()
    first.rename(moved)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": str(moved), "speaker": "alice", "split": "val"}) + "\n")
    stats = run(
        str(manifest), str(tmp_path / "out"), PreprocessParams(landmark_backend="dlib"), progress=False
    )
    assert stats["processed"] == 0 and stats["renamed"] == [{"source": str(moved), "was": str(first)}]
    rows = read_rows(str(tmp_path / "out"), "segments")
    assert rows and {r["source"] for r in rows} == {str(moved)}
    (change,) = stats["label_changes"]
    assert change["speaker"] == {"recorded": "clip", "manifest": "alice"}
    assert change["split"]["manifest"] == "val" and {r["speaker"] for r in rows} == {"clip"}
    assert "NOT applied" in caplog.text and "to relabel" in caplog.text.lower()


@pytest.mark.parametrize("rate", [16000, 44100])
def test_m4a_of_3_seconds_gives_75_frames(media_dir, tmp_path, rate):
    """AAC pads its last frame (and may prime its first): only the samples the stream declares are kept."""
    import soxr

    from preprocessing.audio import SAMPLES_PER_FRAME, load_audio

    wave = load_audio(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav")[:48000]
    wave = soxr.resample(wave, 16000, rate).astype(np.float32) if rate != 16000 else wave
    path = tmp_path / "speech.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    got = load_audio(path)
    assert abs(len(got) - 48000) <= 1, len(got)
    assert -(-len(got) // SAMPLES_PER_FRAME) == 75
