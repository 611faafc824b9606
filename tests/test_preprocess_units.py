"""Preprocessing pieces on real media, without Ray: params, sources, decoding, landmarks, swaps, schema, sidecars."""

from __future__ import annotations

import json
import shutil

import av
import cv2
import numpy as np
import pytest
from testkit import save_tiny_hubert

from preprocessing import schema
from preprocessing.decode import decode_video
from preprocessing.landmarks import (
    DlibBackend,
    FaceNotFoundError,
    LandmarkBackendError,
    MultipleFacesError,
    detect_single_face,
    make_backend,
    missing_face_alignment_weights,
)
from preprocessing.params import ParamsError, PreprocessParams, load_section
from preprocessing.sources import discover, hash_all


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def dlib_backend():
    return DlibBackend()


# ---- params ----------------------------------------------------------------------------------------------------


def test_load_section_applies_overrides_of_its_section_only(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preprocess:\n  size: 128\n  workers: 3\ntrain:\n  lr: 0.1\n")
    values = load_section(
        path, "preprocess", ["preprocess.size=64", "train.lr=1", "preprocess.nested.key=[1, 2]"]
    )
    assert values == {"size": 64, "workers": 3, "nested": {"key": [1, 2]}}
    assert load_section(path, "train", ["train.lr=0.5"]) == {"lr": 0.5}
    with pytest.raises(ParamsError, match="SECTION.KEY=VALUE"):
        load_section(path, "preprocess", ["size"])


def test_preprocess_params_validate_and_name_unknown_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preprocess:\n  size: 256\n")
    assert PreprocessParams.load(path, ["preprocess.detect_every=5"]).detect_every == 5
    with pytest.raises(ParamsError, match="unknown key.*colour"):
        PreprocessParams.load(path, ["preprocess.colour=1"])
    with pytest.raises(ParamsError, match="landmark_backend"):
        PreprocessParams(landmark_backend="mediapipe2")
    with pytest.raises(ParamsError, match="size"):
        PreprocessParams(size=7)


def test_repo_params_yaml_loads():
    params = PreprocessParams.load("params.yaml")
    assert params.size == 256 and params.fps == 25.0


# ---- sources -----------------------------------------------------------------------------------------------------


def test_sources_from_dir_glob_and_manifests_find_sidecars(media_dir, tmp_path):
    videos = discover(str(media_dir / "videos"))
    names = {v.uri.rsplit("/", 1)[1]: v for v in videos}
    assert "EDTalk__mouth_source.mp4" in names and not any(n.endswith(".wav") for n in names)
    assert names["EDTalk__mouth_source.mp4"].wav.endswith("EDTalk__mouth_source.wav")
    assert names["EDTalk__uncrop_Obama.mp4"].wav is None

    globbed = discover(str(media_dir / "videos" / "EDTalk__*.mp4"))
    assert {v.uri.rsplit("/", 1)[1] for v in globbed} == {n for n in names if n.startswith("EDTalk__")}

    csv_path = tmp_path / "m.csv"
    csv_path.write_text(
        "path,speaker,emotion,split,transcript\n"
        f"{media_dir / 'videos' / 'EDTalk__mouth_source.mp4'},anna,happy,val,hello there\n"
    )
    (row,) = discover(str(csv_path))
    assert (row.speaker, row.emotion, row.split, row.transcript) == ("anna", "happy", "val", "hello there")
    assert row.wav and row.wav.endswith(".wav")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        json.dumps({"path": str(media_dir / "edge_cases" / "DPE__s.mp4"), "speaker": "s1"}) + "\n"
    )
    (row,) = discover(str(jsonl))
    assert row.speaker == "s1" and row.wav is None

    hashed = hash_all(discover(str(media_dir / "edge_cases")))
    assert len({s.hash for s in hashed}) == 3 and all(len(s.hash) == 32 for s in hashed)


def test_missing_input_is_a_clear_error(tmp_path):
    from preprocessing.sources import SourceError

    with pytest.raises(SourceError, match="does not exist"):
        discover(str(tmp_path / "nope"))


# ---- decoding ----------------------------------------------------------------------------------------------------


def test_30fps_video_resampled_to_25fps_by_timestamps(media_dir):
    video = decode_video(str(media_dir / "edge_cases" / "LivePortrait__d18.mp4"))
    assert video.source_fps == pytest.approx(30.0)
    assert len(video.frames) == round(video.duration * 25) == 180
    capped = decode_video(str(media_dir / "edge_cases" / "LivePortrait__d18.mp4"), max_seconds=2.0)
    assert len(capped.frames) == 50
    # frame k shows the source frame at time k/25: frame 5 (0.2 s) is source frame 6 (0.2 s at 30 fps)
    ref = decode_video(str(media_dir / "edge_cases" / "LivePortrait__d18.mp4"), fps=30.0, max_seconds=1.0)
    assert np.array_equal(capped.frames[5], ref.frames[6])


def test_variable_frame_rate_input_follows_timestamps(tmp_path):
    # frames with distinct grey levels shown for 1, 3, 1, 3, ... ticks of 1/50 s: a VFR stream
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=50)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = __import__("fractions").Fraction(1, 50)
        pts = 0
        for i in range(20):
            img = np.full((64, 64, 3), 10 * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = pts
            frame.time_base = stream.codec_context.time_base
            pts += 1 if i % 2 == 0 else 3
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = decode_video(str(path), fps=25.0)
    starts = np.cumsum([0] + [1 if i % 2 == 0 else 3 for i in range(19)]) / 50
    for k, frame in enumerate(video.frames):
        expected = int(np.searchsorted(starts, k / 25 + 1e-6, side="right") - 1)
        assert abs(int(frame[32, 32, 0]) - 10 * expected) <= 4, (k, expected)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p, m: p.write_bytes(b""), schema.UNREADABLE),
        (
            lambda p, m: p.write_bytes((m / "videos" / "EDTalk__uncrop_Obama.mp4").read_bytes()[:100_000]),
            schema.UNREADABLE,
        ),
        (lambda p, m: p.write_text("this is not a video\n"), schema.UNREADABLE),
        (lambda p, m: p.write_bytes((m / "images" / "SadTalker__happy.png").read_bytes()), schema.UNREADABLE),
    ],
    ids=["zero-bytes", "truncated", "text", "image"],
)
def test_bad_files_are_rejected_with_a_reason(tmp_path, media_dir, make, reason):
    path = tmp_path / "bad.mp4"
    make(path, media_dir)
    with pytest.raises(schema.RejectError) as info:
        decode_video(str(path))
    assert info.value.reason == reason and str(path) in info.value.message


def test_audio_only_file_has_no_video_stream(media_dir, tmp_path):
    path = tmp_path / "speech.mp4"
    shutil.copy(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav", path)
    with pytest.raises(schema.RejectError) as info:
        decode_video(str(path))
    assert info.value.reason == schema.NO_VIDEO_STREAM


def test_decode_timeout(media_dir):
    with pytest.raises(schema.RejectError) as info:
        decode_video(str(media_dir / "edge_cases" / "DPE__s.mp4"), timeout_s=1e-9)
    assert info.value.reason == schema.DECODE_TIMEOUT


# ---- landmarks ---------------------------------------------------------------------------------------------------


def test_single_face_in_a_still_image(media_dir, dlib_backend):
    img = read_rgb(media_dir / "images" / "LivePortrait__d8.jpg")
    face = detect_single_face(img, dlib_backend, name="d8.jpg")
    x0, y0, x1, y1 = face.box
    assert face.landmarks.shape == (68, 2)
    inside = (face.landmarks[:, 0] > x0 - 0.2 * (x1 - x0)) & (face.landmarks[:, 0] < x1 + 0.2 * (x1 - x0))
    assert inside.all()
    mouth_y, eye_y = face.landmarks[48:68, 1].mean(), face.landmarks[36:48, 1].mean()
    assert mouth_y > eye_y + 0.2 * (y1 - y0)


def test_still_image_errors_name_the_problem(media_dir, dlib_backend):
    a = cv2.resize(read_rgb(media_dir / "images" / "SadTalker__happy.png"), (256, 256))
    b = cv2.resize(read_rgb(media_dir / "images" / "SadTalker__happy1.png"), (256, 256))
    with pytest.raises(MultipleFacesError, match="two.png: 2 faces"):
        detect_single_face(np.concatenate([a, b], axis=1), dlib_backend, name="two.png")
    with pytest.raises(FaceNotFoundError, match="wall.png: no face"):
        detect_single_face(np.full((200, 200, 3), 128, np.uint8), dlib_backend, name="wall.png")


def test_face_alignment_without_weights_says_where_to_put_them():
    if not missing_face_alignment_weights():
        pytest.skip("face_alignment weights are present here")
    with pytest.raises(LandmarkBackendError, match="s3fd-619a316812.pth.*checkpoints"):
        make_backend("face_alignment")
    assert make_backend("auto").name == "dlib"


def test_tracked_landmarks_match_per_frame_detection(media_dir, dlib_backend):
    # d12 moves fast: tracking must not drift away from what per-frame detection finds
    video = decode_video(str(media_dir / "edge_cases" / "LivePortrait__d12.mp4"), max_seconds=2.0)
    track = dlib_backend.track(video.frames)
    assert track.valid.all() and track.hits == track.probes
    for t in range(0, len(video.frames), 7):
        gray = cv2.cvtColor(video.frames[t], cv2.COLOR_RGB2GRAY)
        ref = dlib_backend.shape(gray, dlib_backend.detect(gray)[0])
        side = np.ptp(ref[:, 0])
        assert np.linalg.norm(track.landmarks[t] - ref, axis=1).mean() < 0.05 * side, t


# ---- swaps and schema --------------------------------------------------------------------------------------------


def test_similarity_transform_recovers_rotation_scale_shift():
    from preprocessing.swaps import similarity

    src = np.array([[10.0, 20.0], [50.0, 22.0], [30.0, 60.0]])
    ang, scale, shift = 0.3, 1.2, np.array([5.0, -7.0])
    rot = scale * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    m = similarity(src, src @ rot.T + shift)
    assert np.allclose(m[:, :2], rot, atol=1e-9) and np.allclose(m[:, 2], shift, atol=1e-9)


def test_schema_roundtrip_of_a_segment_row():
    t, s = 3, 32
    ramp = np.linspace(0, 255, s, dtype=np.float32)
    frames = np.stack([np.stack([ramp[None, :] + 0 * ramp[:, None]] * 3, -1) * (i + 1) / t for i in range(t)])
    frames = frames.astype(np.uint8)
    row = {
        "segment_id": "x_000",
        "num_frames": t,
        "frames": [schema.encode_jpeg(f, 100) for f in frames],
        "landmarks": schema.f32_bytes(np.arange(t * 136, dtype=np.float32).reshape(t, 68, 2)),
        "box": [0.0, 1.0, 2.0, 3.0],
        "audio": schema.f32_bytes(np.ones(t * 640)),
        "mel": schema.f32_bytes(np.zeros((t, 80, 16))),
        "speech_states": schema.f32_bytes(np.ones((t, 4))),
        "speech_states_dim": 4,
        "factors": json.dumps({"yaw": [0.1, 0.2, 0.3]}),
        "flags": ["no_speech"],
    }
    out = schema.decode_segment(row)
    assert out["frames"].shape == (t, s, s, 3) and np.abs(out["frames"].astype(int) - frames).mean() < 3
    assert out["landmarks"][2, 67, 1] == t * 136 - 1
    assert out["mel"].shape == (t, 80, 16) and out["speech_states"].shape == (t, 4)
    assert out["factors"] == {"yaw": [0.1, 0.2, 0.3]}
    with pytest.raises(ValueError, match="unknown reject reason"):
        schema.RejectError("bad", "x", "y")


# ---- the sidecar backend and factors (SynthTalk's format), one source without Ray ---------------------------------


def test_sidecar_landmarks_labels_factors_and_transcript(media_dir, tmp_path, dlib_backend):
    from preprocessing.pipeline import SourceProcessor
    from preprocessing.sources import Source

    video = tmp_path / "clip.mp4"
    shutil.copy(media_dir / "edge_cases" / "DPE__s.mp4", video)
    frames = decode_video(str(video), max_seconds=2.0).frames
    lms = dlib_backend.track(frames).landmarks
    factors = {"yaw": [float(i) for i in range(len(frames))]}
    (tmp_path / "clip.json").write_text(
        json.dumps(
            {
                "speaker": "synth_007",
                "emotion": "happy",
                "split": "test",
                "fps": 25.0,
                "landmarks": lms.tolist(),
                "factors": factors,
                "transcript": "from the sidecar",
            }
        )
    )
    (src,) = hash_all(discover(str(tmp_path)))
    out = tmp_path / "out"
    params = PreprocessParams(max_seconds_per_video=2.0, landmark_backend="sidecar", pairs_per_segment=1)
    summary = SourceProcessor(params.to_dict(), str(out))(Source(**src.to_dict()).to_dict())
    assert summary["status"] == "segments", summary
    from preprocessing.dataset import read_rows

    (row,) = read_rows(str(out), "segments")
    seg = schema.decode_segment(row)
    assert (seg["speaker"], seg["emotion"], seg["split"]) == ("synth_007", "happy", "test")
    assert seg["transcript"] == "from the sidecar"
    assert seg["factors"]["yaw"] == factors["yaw"][: seg["num_frames"]]
    assert "no_audio" in seg["flags"] and not seg["audio_usable"]
    assert len(read_rows(str(out), "pairs")) == 2  # one mouth + one eye


def test_speech_encoder_states_per_segment(media_dir, tmp_path):
    """preprocess.speech_encoder set: each segment carries (T, D) hidden states at 25 fps (tiny random HuBERT)."""
    from preprocessing.dataset import read_rows
    from preprocessing.pipeline import SourceProcessor

    model_dir = save_tiny_hubert(tmp_path / "hubert", layers=1)
    (src,) = hash_all(discover(str(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4")))
    params = PreprocessParams(max_seconds_per_video=2.0, speech_encoder=str(model_dir), pairs_per_segment=0)
    summary = SourceProcessor(params.to_dict(), str(tmp_path / "out"))(src.to_dict())
    assert summary["status"] == "segments", summary
    for row in read_rows(str(tmp_path / "out"), "segments"):
        seg = schema.decode_segment(row)
        assert seg["has_audio"] and seg["speech_states"].shape == (seg["num_frames"], 16)
        assert np.isfinite(seg["speech_states"]).all() and seg["speech_states"].std() > 0


def test_done_markers_make_reruns_skip_and_interrupted_runs_resume(tmp_path):
    """A source is done only when its segments or rejects file exists; a pairs file alone (a run stopped between
    the two writes) or a temp file of an unfinished atomic write does not count."""
    from preprocessing import storage
    from preprocessing.pipeline import done_hashes

    out = tmp_path / "out"
    storage.write_bytes_atomic(str(out / "segments" / "aaa.parquet"), b"x")
    storage.write_bytes_atomic(str(out / "rejects" / "bbb.parquet"), b"x")
    storage.write_bytes_atomic(str(out / "pairs" / "ccc.parquet"), b"x")
    (out / "segments" / ".ddd.parquet.tmp-123").write_bytes(b"partial")
    storage.write_bytes_atomic(str(out / "rejects" / "eee.internal.parquet"), b"x")  # a bug: retried
    assert done_hashes(str(out)) == {"aaa", "bbb"}
    assert done_hashes(str(tmp_path / "empty")) == set()


def test_cli_fails_fast_on_a_backend_that_cannot_run(tmp_path, media_dir):
    from click.testing import CliRunner

    from pipelines.cli import cli

    if not missing_face_alignment_weights():
        pytest.skip("face_alignment weights are present here")
    args = ["preprocess", "--input", str(media_dir / "edge_cases"), "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [*args, "--set", "preprocess.landmark_backend=face_alignment"])
    assert result.exit_code != 0 and "2DFAN4-11f355bf06.pth.tar" in result.output
    assert not (tmp_path / "out" / "rejects").exists()  # nothing was rejected for a configuration problem


WORKER_PROBE = """
import json, sys
from preprocessing.landmarks import torch_checkpoint_dir
from preprocessing.params import PreprocessParams
from preprocessing.pipeline import SourceProcessor
from preprocessing.sources import discover, hash_all

found = str(torch_checkpoint_dir())
(src,) = hash_all(discover(sys.argv[1]))
params = PreprocessParams(landmark_backend=sys.argv[2], cpus_per_worker=0.5, max_seconds_per_video=1.0)
summary = SourceProcessor(params.to_dict(), sys.argv[3])(src.to_dict())
torch_imported = "torch" in sys.modules
import torch

print(json.dumps({"status": summary["status"], "torch_imported": torch_imported, "found": found,
                  "torch_says": torch.hub.get_dir() + "/checkpoints"}))
"""


@pytest.mark.parametrize("home", ["TORCH_HOME", "XDG_CACHE_HOME", None])
def test_a_dlib_worker_never_imports_torch(media_dir, tmp_path, home):
    """Choosing and running the dlib backend leaves torch unimported (start-up and memory of every worker), and
    the checkpoint folder found without torch is the one torch.hub uses, whichever variable places it."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_HOME", "XDG_CACHE_HOME")}
    if home:
        env[home] = str(tmp_path / "cache")
    backend = "auto" if missing_face_alignment_weights() else "dlib"
    video = media_dir / "videos" / "LivePortrait__d20.mp4"
    proc = subprocess.run(
        [sys.executable, "-c", WORKER_PROBE, str(video), backend, str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["status"] == "segments", got
    assert not got["torch_imported"], "a dlib worker imported torch"
    assert os.path.normpath(got["found"]) == os.path.normpath(got["torch_says"]), got
