"""Generation I/O without a model: the streaming H.264 + AAC writer, the 25 fps driving-video reader, the face
crop of identity images and its errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines import video_io
from pipelines.generate import FaceCropper, GenerateError, classify_source
from preprocessing.landmarks import FaceNotFoundError, MultipleFacesError
from preprocessing.params import PreprocessParams

SR = video_io.SAMPLE_RATE


def _tone_with_onset(seconds: float, onset_s: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * 330 * t) * (t >= onset_s)).astype(np.float32)


def test_writer_streams_aligned_audio_and_video(tmp_path):
    wave = _tone_with_onset(2.37, onset_s=1.0)
    frames_total = -(-len(wave) // video_io.SAMPLES_PER_FRAME)
    out = tmp_path / "w.mp4"
    with video_io.VideoWriter(out, 48, 32) as writer:
        for start in range(0, frames_total, 7):  # odd chunk size: chunk edges never meet AAC frame edges
            stop = min(frames_total, start + 7)
            frames = np.zeros((stop - start, 32, 48, 3), np.uint8)
            frames[:, :, :, 0] = np.arange(start, stop, dtype=np.uint8)[:, None, None] * 4
            writer.write(frames, wave[start * 640 : stop * 640])
    info = video_io.probe(out)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert info["video"]["fps"] == 25.0
    decoded = video_io.decode_frames(out)
    assert len(decoded) == frames_total
    # frame order survives the encoder: the red ramp increases
    reds = decoded[:, :, :, 0].mean(axis=(1, 2))
    assert np.all(np.diff(reds) > 0)
    audio = video_io.decode_audio(out)
    assert abs(len(audio) - len(wave)) <= video_io.SAMPLES_PER_FRAME
    onset = int(np.argmax(np.abs(audio) > 0.1))
    assert abs(onset - SR) <= 16, f"audio onset at sample {onset}, expected {SR} (1 ms tolerance)"
    n = min(len(audio), len(wave))
    corr = np.corrcoef(audio[:n], wave[:n])[0, 1]
    assert corr > 0.95


def test_writer_rejects_wrong_frames_and_removes_partial_file(tmp_path):
    out = tmp_path / "bad.mp4"
    with pytest.raises(video_io.MediaError, match="uint8"), video_io.VideoWriter(out, 32, 32) as writer:
        writer.write(np.zeros((2, 32, 32, 3), np.float32))
    assert not out.exists()
    with pytest.raises(video_io.MediaError, match="even"):
        video_io.VideoWriter(tmp_path / "odd.mp4", 33, 32)


def test_driving_video_resamples_30fps_to_25fps_and_ping_pongs(media_dir):
    video = video_io.DrivingVideo(media_dir / "edge_cases" / "LivePortrait__d18.mp4")  # 216 frames at 30 fps
    assert video.source_fps == pytest.approx(30.0)
    assert video.num_frames == 180
    idx = video.source_index(np.arange(0, 400))
    assert idx.min() >= 0 and idx.max() <= video.source_frames - 1
    assert idx[25] == 30  # one second in
    assert np.all(np.abs(np.diff(idx)) <= 2)  # past the end it runs back, never jumps
    chunk = video.frames(170, 190)
    assert chunk.shape == (20, 480, 480, 3)


def test_driving_video_errors_name_the_file(tmp_path):
    with pytest.raises(video_io.MediaError, match="does not exist"):
        video_io.DrivingVideo(tmp_path / "nope.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(video_io.MediaError, match="junk.mp4"):
        video_io.DrivingVideo(junk)


@pytest.fixture(scope="module")
def cropper():
    return FaceCropper(PreprocessParams(landmark_backend="dlib"))


def test_identity_crop_of_a_real_portrait(media_dir, cropper):
    image = video_io.read_image(media_dir / "images" / "LivePortrait__d19.jpg")  # 720x720
    crop = cropper.identity(image, "d19", 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    # the crop is centred on the face: the detector finds it again, large and central
    big = cv2.resize(crop, (256, 256), interpolation=cv2.INTER_CUBIC)
    from preprocessing.landmarks import detect_single_face

    face = detect_single_face(big, cropper.backend)
    cx, cy = (face.box[:2] + face.box[2:]) / 2
    assert abs(cx - 128) < 40 and abs(cy - 128) < 50


def test_identity_without_a_face_is_a_clear_error(cropper):
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], (200, 1, 3))
    with pytest.raises(FaceNotFoundError, match="gradient.png: no face"):
        cropper.identity(gradient, "gradient.png", 64)


def test_identity_with_two_faces_is_a_clear_error(media_dir, cropper):
    a = video_io.read_image(media_dir / "images" / "SadTalker__happy.png")
    b = cv2.resize(video_io.read_image(media_dir / "images" / "SadTalker__happy1.png"), a.shape[1::-1])
    with pytest.raises(MultipleFacesError, match="two.png: 2 faces"):
        cropper.identity(np.concatenate([a, b], axis=1), "two.png", 64)


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(video_io.MediaError, match="broken.png"):
        video_io.read_image(bad)


def test_source_values_are_checked(tmp_path):
    assert classify_source("pose", "sample", True, None) == ("sample", None)
    with pytest.raises(GenerateError, match="needs audio"):
        classify_source("mouth", "audio", False, None)
    with pytest.raises(GenerateError, match="no such file"):
        classify_source("pose", "missing.mp4", True, None)
    with pytest.raises(GenerateError, match="known emotions: \\['angry', 'happy'\\]"):
        classify_source("expression", "sad", True, ["angry", "happy"])
    with pytest.raises(GenerateError, match="emotion_means"):
        classify_source("expression", "happy", True, None)
    assert classify_source("expression", "happy", True, ["happy"]) == ("emotion", "happy")


def test_render_in_per_frame_calls_equals_one_batched_call():
    """generate renders one frame per call on a CPU (faster there): the frames must equal a single batched call."""
    import torch

    from edtalk import EDTalk, ModelConfig
    from pipelines.generate import render_batched

    torch.manual_seed(0)
    model = EDTalk(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        for head in model.generator.flows:  # non-zero warps, so every frame differs
            head.conv.weight.normal_(0, 0.1)
        ident = model.encode_identity(torch.rand(1, 3, 64, 64) * 2 - 1)
        weights = {s: w + 0.5 * torch.randn(5, w.shape[1]) for s, w in ident.weights.items()}
        whole = model.render(ident, weights)
        for batch in (1, 2, 5, 8):
            torch.testing.assert_close(render_batched(model, ident, weights, batch), whole, atol=1e-4, rtol=0)
    assert not torch.allclose(whole[0], whole[1])
