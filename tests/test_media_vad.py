"""Speech activity: Silero VAD (numpy port of the weights its wheel ships) against music-like tones, SynthTalk
speech and the package's own TorchScript model."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing import vad
from preprocessing.audio import SAMPLE_RATE, SPEECH_MIN_RATIO, load_audio, speech_mask, speech_ratio
from preprocessing.synthtalk.audio import synthesize


def melody(seed: int, seconds: float = 5.0, note_s: float = 0.25) -> np.ndarray:
    """Plucked harmonic notes on a 2-octave scale, one every note_s: music-like, voiced, with speech's rhythm."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    out = np.zeros(len(t))
    step = int(note_s * SAMPLE_RATE)
    for s0 in range(0, len(t), step):
        f = 220 * 2 ** (rng.integers(0, 24) / 12)
        tt = t[s0 : s0 + step] - t[s0]
        k = np.arange(len(tt))
        note = sum(0.6**h * np.sin(2 * np.pi * f * (h + 1) * tt) for h in range(6))
        out[s0 : s0 + len(tt)] = note * np.minimum(1, k / 200) * np.exp(-k / (0.5 * step))
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def chords(seconds: float = 5.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = np.exp(-(t % 0.25) / 0.15)
    return (0.2 * sum(np.sin(2 * np.pi * f * t) for f in (262, 330, 392, 523)) * envelope).astype(np.float32)


@pytest.mark.parametrize(
    "make",
    [lambda: melody(1), lambda: melody(3, note_s=0.4), chords],
    ids=["melody", "slow-melody", "chords"],
)
def test_music_like_tones_are_not_speech(make):
    wave = make()
    assert speech_ratio(wave) < 0.1 < SPEECH_MIN_RATIO
    # the fallback energy rule is what counted these as speech (issue 23: 0.97)
    assert speech_ratio(wave, detector="energy") > SPEECH_MIN_RATIO


def test_synthtalk_speech_stays_speech():
    for seed in range(2):
        speech = synthesize(np.random.default_rng(seed), 125, seed, 0.5, 120.0 + 80 * seed, 1.0)
        assert speech_ratio(speech.waveform) > SPEECH_MIN_RATIO + 0.2


def test_numpy_port_matches_the_packages_torchscript_model(media_dir):
    """Our numpy network with the TorchScript model's weights gives that model's probabilities (works offline on
    this torch); the shipped safetensors weights give the same decisions on real speech."""
    torch = pytest.importorskip("torch")

    # loaded directly: importing the silero_vad package would set torch's thread count for the whole test session
    model = torch.jit.load(str(vad.weights_path().parent / "silero_vad.jit"), map_location="cpu").eval()
    names = {"stft.forward_basis_buffer": "stft_conv.weight", "decoder.decoder.2.weight": "final_conv.weight"}
    names["decoder.decoder.2.bias"] = "final_conv.bias"
    weights = {}
    for key, value in model._model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "encoder":
            name = f"conv{int(parts[1]) + 1}.{parts[-1]}"
        else:
            name = f"lstm_cell.{parts[-1]}" if parts[1] == "rnn" else names[key]
        weights[name] = value.detach().numpy().astype(np.float32)
    wave = load_audio(media_dir / "audio" / "SadTalker__RD_Radio34_002.wav")[: 94 * vad.CHUNK]  # ~3 s
    chunks = torch.from_numpy(wave).reshape(-1, vad.CHUNK)
    with torch.no_grad():
        ref = np.array([float(model(c[None], SAMPLE_RATE)) for c in chunks])
    assert np.abs(vad.speech_probs(wave, weights) - ref).max() < 1e-4
    shipped = vad.speech_probs(wave)
    assert np.mean((shipped >= 0.5) == (ref >= 0.5)) > 0.9


def test_mask_is_per_video_frame_and_false_past_the_end():
    wave = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), melody(2)])
    mask = speech_mask(wave, 200)
    assert mask.shape == (200,) and not mask[150:].any()
    assert speech_mask(np.zeros(0, np.float32), 5).tolist() == [False] * 5
