"""`edtalk generate` with an imported reference model (fixture weights): audio-driven through the authors'
Audio2Lip (their mel, windows and smoothing), pose from an image, a predefined expression preset, rendered by
the CPU fast path (tests/test_reference_fast.py checks it against the eager reference variant)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from reference_kit import fixture, run_import, write_pt

from edtalk import EDTalk
from edtalk.reference.audio import lip_weights
from pipelines import video_io
from pipelines.generate import GenerateError, GenerateParams, Request, plan_sources, run
from preprocessing.audio import load_audio
from preprocessing.params import PreprocessParams

PREP = PreprocessParams(landmark_backend="dlib")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref_generate")
    presets = tmp / "exp"
    presets.mkdir()
    np.save(presets / "angry.npy", fixture("predefined_exp_weights.npz")["angry"])
    a2l = write_pt(tmp / "Audio2Lip.pt", "audio2lip")
    ckpt = write_pt(tmp / "EDTalk.pt", "edtalk")
    result = run_import(ckpt, "--output", tmp / "model", "--audio2lip", a2l, "--expressions", presets)
    assert result.exit_code == 0, result.output
    assert result.output.count("licence:") == 1 and "non-commercial" in result.output
    return tmp / "model"


@pytest.fixture(scope="module")
def speech(media_dir, tmp_path_factory):
    wave = load_audio(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav")[16000 : 16000 + 3200]  # 5 frames
    path = tmp_path_factory.mktemp("ref_audio") / "speech.wav"
    sf.write(path, wave, 16000)
    return path


@pytest.mark.slow  # 256 px rendering on CPU
def test_generate_audio_driven_with_preset_expression(imported, media_dir, speech, tmp_path):
    out = tmp_path / "ref.mp4"
    req = Request(
        identity=str(media_dir / "images" / "SadTalker__happy.png"),
        audio=str(speech),
        pose=str(media_dir / "images" / "LivePortrait__d19.jpg"),
        expression="angry",
        output=str(out),
    )
    model = EDTalk.from_pretrained(imported).eval()
    res = run(req, model, GenerateParams(threads=2, chunk_frames=3), PREP)
    assert res["sources"]["mouth"]["kind"] == "audio" and res["sources"]["expression"]["kind"] == "emotion"
    assert "eye" not in res["sources"]  # EDTalk.pt has no eye space
    frames = video_io.decode_frames(out)
    assert frames.shape == (5, 256, 256, 3)
    # the mouth follows the reference lip coefficients of this audio: frames differ where they differ
    lips = lip_weights(model.audio_to_mouth, load_audio(speech))
    assert lips.shape == (5, 20) and float((lips[1:] - lips[:-1]).abs().max()) > 0
    assert frames.astype(np.float32).std(axis=0).mean() > 0.1


def test_a_space_the_model_lacks_is_a_clear_error(imported, media_dir, speech):
    model = EDTalk.from_pretrained(imported)
    req = Request(
        identity="x.png",
        audio=str(speech),
        eye=str(media_dir / "images" / "SadTalker__happy.png"),
        output="o.mp4",
    )
    with pytest.raises(GenerateError, match="no eye space"):
        plan_sources(req, model, load_audio)


def test_video_driven_plan_drives_every_space_the_model_has(imported, media_dir):
    model = EDTalk.from_pretrained(imported)
    video = str(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4")
    plan = plan_sources(Request(identity="x.png", video=video, output="o.mp4"), model, load_audio)
    assert plan.kinds == {s: ("video", video) for s in ("mouth", "pose", "expression")}
