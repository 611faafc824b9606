"""Mel windows (shape, scale, centring) and the voice-activity detector on real speech, music and silence."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.audio import (
    HOP,
    MEL_SCALE,
    MEL_WINDOW,
    N_MELS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    SPEECH_MIN_RATIO,
    AudioError,
    audio_from_video,
    load_audio,
    log_mel,
    mel_window_starts,
    mel_windows,
    speech_mask,
    speech_ratio,
)

SPEECH_CLIPS = [
    "audio/SadTalker__RD_Radio34_002.wav",
    "audio/SadTalker__chinese_news.wav",
    "audio/SadTalker__japanese.wav",
    "videos/EDTalk__mouth_source.wav",
    "videos/EDTalk__uncrop_Obama.mp4",
    "videos/LivePortrait__d20.mp4",
    "videos/SadTalker__WDA_AlexandriaOcasioCortez_000.mp4",
    "videos/SadTalker__WDA_KatieHill_000.mp4",
]


def _burst(num_frames: int, frame: int, freq: float = 1000.0) -> np.ndarray:
    wave = np.zeros(num_frames * SAMPLES_PER_FRAME, np.float32)
    start = frame * SAMPLES_PER_FRAME
    t = np.arange(SAMPLES_PER_FRAME) / SAMPLE_RATE
    wave[start : start + SAMPLES_PER_FRAME] = 0.5 * np.sin(2 * np.pi * freq * t)
    return wave


def test_shape_dtype_and_scale():
    rng = np.random.default_rng(0)
    out = mel_windows(rng.standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1, 25)
    assert out.shape == (25, N_MELS, MEL_WINDOW) and out.dtype == np.float32
    assert out.min() >= -MEL_SCALE and out.max() <= MEL_SCALE
    assert out.std() > 0.1
    silent = mel_windows(np.zeros(SAMPLE_RATE, np.float32), 25)
    np.testing.assert_array_equal(silent, -MEL_SCALE)  # digital silence sits on the floor


def test_windows_follow_the_contract_indices():
    starts = mel_window_starts(50)
    assert starts[0] == -6  # frames -6..9 for t = 0 (docs/contracts.md)
    centre_mel = (np.arange(50) * SAMPLES_PER_FRAME + SAMPLES_PER_FRAME / 2) / HOP
    assert np.abs(starts + (MEL_WINDOW - 1) / 2 - centre_mel).max() <= 0.5


@pytest.mark.parametrize("frame", [5, 12, 18])
def test_window_is_centred_on_its_video_frame(frame):
    num_frames = 25
    out = mel_windows(_burst(num_frames, frame), num_frames)
    profile = out[frame].mean(axis=0) + MEL_SCALE  # loudness per window column, 0 where silent
    centre = float((profile * np.arange(MEL_WINDOW)).sum() / profile.sum())
    assert abs(centre - (MEL_WINDOW - 1) / 2) <= 0.5 + 1e-3, profile  # within half a mel frame
    assert profile[:3].max() == 0 and profile[-3:].max() == 0, profile  # silence on both sides
    # A frame 3 video frames away sees the burst ~9.6 mel frames off-centre, i.e. at the window's edge or beyond.
    if frame + 3 < num_frames:
        later = out[frame + 3].mean(axis=0) + MEL_SCALE
        assert later[:3].sum() > later[5:].sum()


def test_length_is_fitted_to_num_frames():
    rng = np.random.default_rng(1)
    wave = rng.standard_normal(10 * SAMPLES_PER_FRAME).astype(np.float32) * 0.1
    np.testing.assert_array_equal(mel_windows(wave, 6), mel_windows(wave[: 6 * SAMPLES_PER_FRAME], 6))
    padded = np.concatenate([wave, np.zeros(5 * SAMPLES_PER_FRAME, np.float32)])
    np.testing.assert_array_equal(mel_windows(wave, 15), mel_windows(padded, 15))
    with pytest.raises(AudioError):
        mel_windows(wave, 0)


def test_log_mel_matches_librosa_melspectrogram():
    import librosa

    rng = np.random.default_rng(2)
    wave = rng.standard_normal(SAMPLE_RATE).astype(np.float32) * 0.05
    ours = log_mel(wave)
    emph = np.append(wave[:1], wave[1:] - 0.97 * wave[:-1])
    ref = librosa.feature.melspectrogram(
        y=emph, sr=SAMPLE_RATE, n_fft=800, hop_length=200, n_mels=80, fmin=55, fmax=7600, power=1.0
    )
    ref_db = np.clip((20 * np.log10(np.maximum(ref, 1e-5)) - 20 + 100) / 100, 0, 1) * 8 - 4
    assert ours.shape == (80, SAMPLE_RATE // 200 + 1)
    np.testing.assert_allclose(ours, ref_db, atol=1e-3)


@pytest.fixture(scope="module")
def media_waves(media_dir):
    names = SPEECH_CLIPS + ["edge_cases/LivePortrait__d12.mp4", "edge_cases/LivePortrait__d18.mp4"]
    return {name: load_audio(media_dir / name) for name in names}


@pytest.mark.parametrize("name", SPEECH_CLIPS)
def test_speech_scores_high(media_waves, name):
    ratio = speech_ratio(media_waves[name])
    assert ratio > SPEECH_MIN_RATIO + 0.2, ratio  # MANIFEST VAD 0.74-0.89


def test_music_and_silence_score_low(media_waves):
    music = speech_ratio(media_waves["edge_cases/LivePortrait__d12.mp4"])
    assert music < SPEECH_MIN_RATIO - 0.15, music  # MANIFEST VAD 0.06-0.07
    silence = media_waves["edge_cases/LivePortrait__d18.mp4"]
    assert np.abs(silence).max() < 1e-3
    assert speech_ratio(silence) == 0.0


def test_five_second_segments_keep_their_side_of_the_threshold(media_waves):
    """Preprocessing judges <= 5 s segments; every segment of speech and of music stays on its side."""
    seg = 5 * SAMPLE_RATE
    for name, wave in media_waves.items():
        ratios = [speech_ratio(wave[i : i + seg]) for i in range(0, len(wave) - SAMPLE_RATE, seg)]
        if name in SPEECH_CLIPS:
            assert min(ratios) > SPEECH_MIN_RATIO + 0.1, (name, ratios)
        else:
            assert max(ratios) < SPEECH_MIN_RATIO - 0.15, (name, ratios)


def test_stationary_noise_and_empty_input_are_not_speech():
    rng = np.random.default_rng(3)
    assert speech_ratio(rng.standard_normal(5 * SAMPLE_RATE).astype(np.float32) * 0.2) < 0.05
    assert speech_ratio(np.zeros(0, np.float32)) == 0.0


def test_speech_mask_per_video_frame(media_waves):
    wave = media_waves["videos/EDTalk__mouth_source.wav"]
    mask = speech_mask(wave)
    assert mask.dtype == bool and len(mask) == -(-len(wave) // SAMPLES_PER_FRAME)
    assert abs(mask.mean() - speech_ratio(wave)) < 0.1
    assert (
        len(speech_mask(wave, 300)) == 300 and not speech_mask(wave, 300)[-40:].any()
    )  # past the audio's end
    # Putting 2 s of silence in front: those frames are not speech, the rest stays as it was.
    lead = np.concatenate([np.zeros(2 * SAMPLE_RATE, np.float32), wave])
    shifted = speech_mask(lead)
    assert not shifted[:45].any()


def test_mask_of_container_without_audio_is_not_computed(media_dir):
    assert audio_from_video(media_dir / "videos" / "EDTalk__mouth_source.mp4") is None
