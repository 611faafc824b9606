"""load_audio / audio_from_video on the real media and on files written here in the formats users bring."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from preprocessing.audio import SAMPLE_RATE, AudioError, audio_from_video, load_audio


def _tone(rate: int, seconds: float, freq: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spec) * rate / len(wave))


@pytest.mark.parametrize(
    "name", ["SadTalker__RD_Radio34_002.wav", "SadTalker__chinese_news.wav", "SadTalker__japanese.wav"]
)
def test_shared_audio_files_load_to_16k_mono(media_dir, name):
    path = media_dir / "audio" / name
    info = sf.info(str(path))
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    expected = info.frames * SAMPLE_RATE / info.samplerate
    assert abs(len(wave) - expected) <= max(1.0, info.samplerate / SAMPLE_RATE)
    assert 0.05 < np.abs(wave).max() <= 1.5  # real content, not silence or an unscaled integer range
    # Averaging the channels, as soundfile reads them, then resampling gives the same signal.
    native, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate == SAMPLE_RATE:
        np.testing.assert_allclose(wave, native.mean(axis=1), atol=1e-6)


def test_8khz_mono_16bit_is_resampled(tmp_path):
    path = tmp_path / "tone8k.wav"
    sf.write(path, _tone(8000, 1.0, 440.0), 8000, subtype="PCM_16")
    wave = load_audio(path)
    assert abs(len(wave) - SAMPLE_RATE) <= 2
    assert abs(_peak_hz(wave) - 440.0) < 2.0
    assert abs(np.abs(wave[1000:-1000]).max() - 0.5) < 0.01  # soxr keeps the amplitude


def test_48khz_24bit_stereo_is_mixed_to_mono(tmp_path):
    path = tmp_path / "stereo48k.wav"
    left = _tone(48000, 1.0, 1000.0, amp=0.6)
    sf.write(path, np.stack([left, 0.5 * left], axis=1), 48000, subtype="PCM_24")
    wave = load_audio(path)
    assert abs(len(wave) - SAMPLE_RATE) <= 3
    assert abs(_peak_hz(wave) - 1000.0) < 2.0
    assert abs(np.abs(wave[1000:-1000]).max() - 0.45) < 0.01  # (0.6 + 0.3) / 2


@pytest.mark.parametrize(
    ("ext", "subtype"), [("flac", "PCM_16"), ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III")]
)
def test_compressed_formats(tmp_path, ext, subtype):
    path = tmp_path / f"tone.{ext}"
    sf.write(path, _tone(22050, 1.0, 300.0), 22050, subtype=subtype)
    wave = load_audio(path)
    assert abs(len(wave) - SAMPLE_RATE) < 0.05 * SAMPLE_RATE  # codecs pad a little
    assert abs(_peak_hz(wave) - 300.0) < 3.0


def test_bytes_and_file_uri_give_the_same_wave(media_dir):
    path = media_dir / "videos" / "EDTalk__mouth_source.wav"
    from_path = load_audio(path)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), from_path)
    np.testing.assert_array_equal(load_audio("file://" + str(path.resolve())), from_path)


def test_muxed_mp4_matches_its_wav_sample_aligned(media_dir):
    wav = load_audio(media_dir / "videos" / "EDTalk__mouth_source.wav")
    muxed = audio_from_video(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4")
    assert muxed is not None and len(muxed) == len(wav)
    np.testing.assert_array_equal(load_audio(media_dir / "videos" / "EDTalk__mouth_source_muxed.mp4"), muxed)
    # AAC is lossy, so compare by correlation; a one-sample shift would drop it well below 0.999.
    assert np.corrcoef(muxed, wav)[0, 1] > 0.999
    assert np.corrcoef(muxed[1:], wav[:-1])[0, 1] < np.corrcoef(muxed, wav)[0, 1] - 1e-4


def test_44k_stereo_aac_container_resampled(media_dir):
    wave = audio_from_video(media_dir / "videos" / "LivePortrait__d20.mp4")
    assert wave is not None
    assert abs(len(wave) / SAMPLE_RATE - 7.01) < 0.05  # stream duration 309185 samples at 44.1 kHz


def test_video_without_audio_stream(media_dir):
    path = media_dir / "edge_cases" / "DPE__s.mp4"
    assert audio_from_video(path) is None
    with pytest.raises(AudioError, match="no audio stream") as err:
        load_audio(path)
    assert "DPE__s.mp4" in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty") as err:
        load_audio(path)
    assert str(path) in str(err.value)
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


@pytest.mark.parametrize(
    "content",
    [
        b"this is a transcript, not a wav file\n" * 20,
        bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)),
    ],
    ids=["text", "random"],
)
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match="not a readable audio file") as err:
        audio_from_video(path)
    assert str(path) in str(err.value)


def test_truncated_wav_header(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, _tone(16000, 0.5, 200.0), 16000)
    path = tmp_path / "truncated.wav"
    path.write_bytes(good.read_bytes()[:30])
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_zero_length_wav(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="zero length") as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="not supported"):
        load_audio(12345)  # type: ignore[arg-type]
    assert issubclass(AudioError, ValueError)
