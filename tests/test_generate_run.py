"""`edtalk generate` end to end with a tiny random-weight model: every driving mode, A/V sync and length, audio
formats, streaming equals a single pass, and clear errors for bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from edtalk import EDTalk, ModelConfig
from pipelines import video_io
from pipelines.cli import cli
from pipelines.generate import GenerateError, GenerateParams, Request, plan_sources, run
from preprocessing.audio import load_audio
from preprocessing.params import PreprocessParams

PREP = PreprocessParams(landmark_backend="dlib")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = EDTalk(ModelConfig.preset("tiny")).eval()
    n_expr = model.config.navigation.expression
    model.emotion_means = {"happy": [0.5] * n_expr, "sad": [-0.5] * n_expr}
    folder = tmp_path_factory.mktemp("models") / "audio_eye"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tiny_model):
    return EDTalk.from_pretrained(tiny_model).eval()


@pytest.fixture(scope="module")
def short_speech(media_dir, tmp_path_factory):
    """1.5 s of a real English speech clip, as 16 kHz mono WAV."""
    wave = load_audio(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav")[16000 : int(2.5 * 16000)]
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    sf.write(path, wave, 16000)
    return path


def _identity(media_dir):
    return str(media_dir / "images" / "SadTalker__happy.png")


def _check_sync(out, audio_path, frames_expected=None):
    """The output's length matches the audio within one frame and its audio track is the input, aligned."""
    ref = load_audio(audio_path)
    info = video_io.probe(out)
    n_video = len(video_io.decode_frames(out))
    assert info["video"]["fps"] == 25.0 and info["audio"]["codec"] == "aac"
    assert abs(n_video - len(ref) / 640) <= 1.0, (n_video, len(ref) / 640)
    if frames_expected is not None:
        assert n_video == frames_expected
    got = video_io.decode_audio(out)
    assert abs(len(got) - len(ref)) <= 640
    n = min(len(got), len(ref))
    # best lag of the cross-correlation within +-20 ms is 0 (+-1 ms), and the signals match closely there
    lags = range(-320, 321, 4)
    scores = [float(np.dot(got[max(0, k) : n + min(0, k)], ref[max(0, -k) : n - max(0, k)])) for k in lags]
    best = list(lags)[int(np.argmax(scores))]
    assert abs(best) <= 16, f"audio is offset by {best} samples"
    assert np.corrcoef(got[:n], ref[:n])[0, 1] > 0.9


def test_audio_only(model, media_dir, short_speech, tmp_path):
    out = tmp_path / "a.mp4"
    req = Request(
        identity=_identity(media_dir),
        audio=str(short_speech),
        transcript="What a lovely day!",
        output=str(out),
    )
    res = run(req, model, GenerateParams(threads=1), PREP)
    assert res["sources"]["mouth"]["kind"] == "audio" and res["sources"]["expression"]["kind"] == "audio"
    assert res["sources"]["pose"]["kind"] == "sample" and res["sources"]["eye"]["kind"] == "sample"
    _check_sync(out, short_speech, frames_expected=38)  # 1.5 s -> ceil(37.5)
    frames = video_io.decode_frames(out)
    assert frames.shape[1:] == (64, 64, 3)
    assert frames.std(axis=0).mean() > 0.5  # the face moves: mouth, pose and eyes change over time


def test_audio_with_pose_video_and_preview(model, media_dir, short_speech, tmp_path):
    out = tmp_path / "p.mp4"
    pose = str(media_dir / "videos" / "LivePortrait__d20.mp4")  # 480x480: the face is found and cropped
    req = Request(
        identity=_identity(media_dir), audio=str(short_speech), pose=pose, output=str(out), preview=True
    )
    res = run(req, model, GenerateParams(chunk_frames=16, threads=1), PREP)
    assert res["sources"]["pose"] == {"kind": "video", "arg": pose}
    _check_sync(out, short_speech)
    preview = video_io.decode_frames(res["preview"])
    assert preview.shape[1:] == (64, 3 * 64, 3)  # identity | pose video crop | result
    result = video_io.decode_frames(out).astype(int)
    # the right panel is the result (re-encoded at another width, so not bit-equal); the middle one is not
    assert np.abs(preview[:, :, 128:] - result).mean() < 0.5 * np.abs(preview[:, :, 64:128] - result).mean()


def test_video_driven_with_all_four_sources(model, media_dir, tmp_path):
    out = tmp_path / "v.mp4"
    mouth = str(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4")  # 250 frames + its own AAC track
    req = Request(
        identity=str(media_dir / "images" / "LivePortrait__d19.jpg"),
        mouth=mouth,
        pose=str(media_dir / "videos" / "LivePortrait__d20.mp4"),
        eye=str(media_dir / "edge_cases" / "LivePortrait__d18.mp4"),  # 30 fps: resampled to 25
        expression=str(media_dir / "images" / "SadTalker__happy1.png"),
        output=str(out),
    )
    # the mouth video sets the length, its soundtrack is the audio (checked on the plan, no rendering needed)
    plan = plan_sources(req, model, load_audio)
    assert plan.num_frames == 250 and plan.audio_source == mouth and len(plan.audio) == 250 * 640
    res = run(
        req, model, GenerateParams(max_seconds=2.0, threads=1), PREP
    )  # render the first 2 s only (CPU budget)
    kinds = {s: v["kind"] for s, v in res["sources"].items()}
    assert kinds == {"mouth": "video", "pose": "video", "eye": "video", "expression": "image"}
    frames = video_io.decode_frames(out)
    assert len(frames) == 50 and frames.std(axis=0).mean() > 0.5
    info = video_io.probe(out)
    assert info["audio"] is not None and abs(info["audio"]["duration_s"] - 2.0) < 0.05


def test_emotion_by_name_seed_and_chunking(model, media_dir, short_speech, tmp_path):
    common = {"identity": _identity(media_dir), "audio": str(short_speech)}

    def gen(name, chunk, **kw):
        res = run(
            Request(**common, output=str(tmp_path / name), **kw),
            model,
            GenerateParams(chunk_frames=chunk, threads=1),
            PREP,
        )
        return res, video_io.decode_frames(res["output"]).astype(int)

    happy, f_happy = gen("h.mp4", 64, expression="happy", seed=3)
    assert happy["sources"]["expression"] == {"kind": "emotion", "arg": "happy"}
    _, f_sad = gen("s.mp4", 64, expression="sad", seed=3)
    _, f_chunked = gen("c.mp4", 5, expression="happy", seed=3)
    _, f_seed = gen("r.mp4", 64, expression="happy", seed=4)
    assert np.abs(f_happy - f_sad).mean() > 1.0  # the emotion changes the face
    assert np.abs(f_happy - f_chunked).mean() < 0.5  # chunk edges leave no trace (float rounding only)
    assert np.abs(f_happy - f_seed).mean() > 0.5  # another seed samples another pose/eye motion
    with pytest.raises(GenerateError, match=r"known emotions: \['happy', 'sad'\]"):
        run(
            Request(**common, expression="angry", output=str(tmp_path / "x.mp4")),
            model,
            GenerateParams(threads=1),
            PREP,
        )


def test_audio_formats_8khz_mono_and_48khz_24bit_stereo(model, media_dir, tmp_path):
    wave = load_audio(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav", sr=8000)[:8000]
    low = tmp_path / "low.wav"
    sf.write(low, wave, 8000, subtype="PCM_16")
    assert sf.info(low).samplerate == 8000 and sf.info(low).channels == 1
    res = run(
        Request(identity=_identity(media_dir), audio=str(low), output=str(tmp_path / "low.mp4")),
        model,
        GenerateParams(threads=1),
        PREP,
    )
    assert res["frames"] == 25
    _check_sync(res["output"], low, frames_expected=25)
    japanese = media_dir / "audio" / "SadTalker__japanese.wav"
    assert sf.info(japanese).samplerate == 48000 and sf.info(japanese).channels == 2
    assert sf.info(japanese).subtype == "PCM_24"
    res = run(
        Request(identity=_identity(media_dir), audio=str(japanese), output=str(tmp_path / "jp.mp4")),
        model,
        GenerateParams(chunk_frames=64, threads=1),
        PREP,
    )
    _check_sync(res["output"], japanese)


def _cli(args):
    return CliRunner().invoke(
        cli, ["generate", *args, "--set", "preprocess.landmark_backend=dlib", "--set", "generate.threads=1"]
    )


def test_cli_generates_and_rejects_bad_inputs_clearly(tiny_model, media_dir, short_speech, tmp_path):
    import cv2

    out = tmp_path / "cli.mp4"
    base = [
        "--model",
        str(tiny_model.parent),
        "--output",
        str(out),
    ]  # a models/ folder: the latest stage is used
    res = _cli(
        [*base, "--identity", _identity(media_dir), "--audio", str(short_speech), "--expression", "sad"]
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and len(video_io.decode_frames(out)) == 38

    gradient = tmp_path / "gradient.png"
    cv2.imwrite(str(gradient), np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3)))
    res = _cli([*base, "--identity", str(gradient), "--audio", str(short_speech)])
    assert res.exit_code != 0 and "gradient.png: no face found" in res.output

    a = cv2.imread(str(media_dir / "images" / "SadTalker__happy.png"))
    b = cv2.resize(cv2.imread(str(media_dir / "images" / "SadTalker__happy1.png")), a.shape[1::-1])
    two = tmp_path / "two.png"
    cv2.imwrite(str(two), np.concatenate([a, b], axis=1))
    res = _cli([*base, "--identity", str(two), "--audio", str(short_speech)])
    assert res.exit_code != 0 and "two.png: 2 faces found" in res.output

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 20)
    res = _cli([*base, "--identity", _identity(media_dir), "--audio", str(corrupt)])
    assert res.exit_code != 0 and "corrupt.wav" in res.output and "not a readable audio" in res.output

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    res = _cli([*base, "--identity", _identity(media_dir), "--audio", str(empty)])
    assert res.exit_code != 0 and "empty.wav: empty file" in res.output

    res = _cli(
        [*base, "--identity", _identity(media_dir), "--audio", str(short_speech), "--pose", "missing.mp4"]
    )
    assert res.exit_code != 0 and "--pose missing.mp4: no such file" in res.output
    res = _cli(
        [
            "--model",
            str(tmp_path / "nowhere"),
            "--output",
            str(out),
            "--identity",
            _identity(media_dir),
            "--audio",
            str(short_speech),
        ]
    )
    assert res.exit_code != 0 and "does not exist" in res.output
    assert not (tmp_path / "x.mp4").exists()


def test_identity_from_a_video_and_audio_from_its_track(model, media_dir, tmp_path):
    """As the DVC render stage calls it: a clip gives the identity (first frame) and the audio (its AAC track)."""
    clip = str(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4")
    res = run(
        Request(identity=clip, audio=clip, output=str(tmp_path / "c.mp4")),
        model,
        GenerateParams(max_seconds=0.4, threads=1),
        PREP,
    )
    assert res["frames"] == 10 and res["sources"]["mouth"]["kind"] == "audio"
    assert video_io.probe(res["output"])["audio"]["duration_s"] == pytest.approx(0.4, abs=0.03)


def test_streamed_mel_windows_equal_the_whole_clip(model, short_speech):
    """Audio features are computed chunk by chunk from slices of the audio: identical to mel_windows of it all."""
    from pipelines.generate import Drivers
    from preprocessing.audio import mel_windows

    req = Request(identity="unused.png", audio=str(short_speech), output="unused.mp4", expression="identity")
    plan = plan_sources(req, model, load_audio)
    drivers = Drivers(model, plan, req, GenerateParams(), None, 64, torch.device("cpu"))
    whole = mel_windows(plan.audio, plan.num_frames)
    for start, stop in ((0, 5), (5, 12), (12, 30), (30, plan.num_frames)):
        np.testing.assert_allclose(drivers.mel_chunk(start, stop)[0].numpy(), whole[start:stop], atol=1e-4)


def test_fast_path_generates_the_eager_video(model, media_dir, tmp_path, monkeypatch):
    """generate.fast_render (FastRenderer for the identity, the driving weights and the frames) renders what the
    eager model renders, video-driven with spaces from videos and an image. Compared before x264: a handful of
    uint8 rounding flips change the encoder's decisions, so decoded videos differ by more than the frames do."""
    import pipelines.generate as generate

    rendered: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    plain = generate.render_batched
    fast = True

    def recording(renderer, ident, weights, batch):  # the real render_batched, its output kept
        out = plain(renderer, ident, weights, batch)
        rendered[fast].append(out.clone())
        return out

    monkeypatch.setattr(generate, "render_batched", recording)
    req = dict(
        identity=str(media_dir / "images" / "LivePortrait__d19.jpg"),
        mouth=str(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4"),
        pose=str(media_dir / "videos" / "LivePortrait__d20.mp4"),
        expression=str(media_dir / "images" / "SadTalker__happy1.png"),
    )
    for fast in (True, False):
        out = tmp_path / f"fast_{fast}.mp4"
        run(Request(**req, output=str(out)), model, GenerateParams(max_seconds=0.4, fast_render=fast), PREP)
        assert len(video_io.decode_frames(out)) == 10
    a, b = torch.cat(rendered[True]), torch.cat(rendered[False])
    assert a.shape == b.shape == (10, 3, 64, 64)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    flips = (generate.to_uint8(a) != generate.to_uint8(b)).mean()
    assert flips < 1e-3, flips
    assert a.std(dim=0).mean() > 0.01  # frames that move, not a constant image
