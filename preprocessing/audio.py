"""Audio for the pipeline: any file or container -> 16 kHz mono float32, mel windows, speech activity, encoders.

Everything downstream sees one audio convention (docs/contracts.md): 16 kHz mono float32 in [-1, 1], 640 samples
per 25 fps video frame. Decoding tries libsndfile first (wav/flac/ogg/mp3 and most PCM variants) and falls back to
PyAV for containers (mp4/mov/mkv/m4a/aac); there is no ffmpeg binary, so librosa.load cannot read containers.
Resampling uses soxr (high quality), the same engine librosa uses.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing import storage

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # Hz, the pipeline's audio rate
FPS = 25  # video frames per second on the pipeline's timeline
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 audio samples per video frame

# Mel settings (DESIGN.md section 2, the Wav2Lip convention): 80 mel frames/s, 3.2 per video frame.
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
MEL_WINDOW = 16  # mel frames per video frame window
PREEMPHASIS = 0.97  # first-order high-pass before the STFT: lifts the weak high formants of speech
# Log-amplitude scale: dB = 20*log10(max(mel, 1e-5)) - REF_DB, clipped to [MIN_DB, 0] and mapped linearly onto
# [-MEL_SCALE, MEL_SCALE]; so -4 is silence (<= -100 dB) and +4 is a full-scale spectral peak.
REF_DB = 20.0
MIN_DB = -100.0
MEL_SCALE = 4.0

# Voice activity: Silero VAD (preprocessing/vad.py, weights shipped in the silero-vad wheel) decides per 32 ms chunk;
# a video frame is speech when a chunk overlapping it has probability >= VAD_THRESHOLD (Silero's own default).
# Measured against the energy rule and WebRTC VAD in docs/preprocessing.md: the energy rule below counted steady
# music and tones as speech (0.8-0.99) and WebRTC VAD counts any tone, music or noise (1.00); Silero gives them
# <= 0.06 and real or SynthTalk speech 0.71-0.90. The energy rule stays as the fallback when silero-vad is missing.
VAD_THRESHOLD = 0.5
# Fallback energy rule (see _energy_vad_frames). Calibrated on the real clips of ../shared/media (whole clips):
# speech 0.66 (news over background music) to 0.88, music (LivePortrait__d12) 0.06, digital silence (d18) 0.0.
VAD_FRAME = 320  # samples per decision frame (20 ms at 16 kHz)
VAD_FLOOR_PERCENTILE = 20.0  # the clip's noise floor: this percentile of its non-silent frame energies
VAD_ABOVE_FLOOR_DB = 8.0  # a speech frame is this much louder than the floor
VAD_MIN_DB = -55.0  # and louder than this (dBFS), so hiss on a silent track never counts
VAD_MAX_FLATNESS = 0.3  # spectral flatness (300-4000 Hz) above this is noise-like, not voiced/formant speech
VAD_MAX_ZCR = 0.35  # zero-crossing rate above this (> 5.6 kHz dominant) is hiss/clicks, not speech
VAD_HANGOVER = 5  # frames (100 ms) each side of an active frame that also count: bridges syllable gaps
SPEECH_MIN_RATIO = 0.35  # a clip/segment with a lower speech_ratio is not used by the audio stages

_CONTAINER_HINT = "re-encode it as 16-bit PCM WAV, or give a NAME.wav sidecar next to the video"


class AudioError(ValueError):
    """An input that cannot be turned into a waveform; the message names the input, the problem and a fix."""


def _read_source(src: Any) -> tuple[str, bytes | None, str | None]:
    """-> (name for messages, bytes or None, local path or None). Remote URIs are read through pyarrow."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise AudioError("<bytes input>: empty (0 bytes); pass the file's content")
        return "<bytes input>", bytes(src), None
    if not isinstance(src, (str, os.PathLike)):
        raise AudioError(
            f"audio input of type {type(src).__name__} is not supported; pass a path, URI or bytes"
        )
    name = os.fspath(src)
    if storage.is_remote(name):
        try:
            return name, storage.read_bytes(name), None
        except (OSError, ValueError) as exc:  # pyarrow raises these for missing objects and bad URIs
            raise AudioError(
                f"{name}: cannot read ({exc}); check the URI and the storage credentials"
            ) from exc
    local = storage.local_path_or_none(name)
    assert local is not None  # not remote, so a local path
    if not local.is_file():
        raise AudioError(f"{name}: file not found; check the path")
    if local.stat().st_size == 0:
        raise AudioError(f"{name}: empty file (0 bytes); re-export or re-download it")
    return name, None, str(local)


def _mono(x: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) -> (samples,) float32, channels averaged."""
    x = np.asarray(x, dtype=np.float32)
    return x.mean(axis=1) if x.ndim == 2 else x


def _decode_soundfile(name: str, data: bytes | None, path: str | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(data) if data is not None else path, dtype="float32", always_2d=True)
    return _mono(wave), int(rate)


def _decode_pyav(name: str, data: bytes | None, path: str | None) -> tuple[np.ndarray, int] | None:
    """Decode the first audio stream of a container; None when it has no audio stream."""
    import av

    with av.open(io.BytesIO(data) if data is not None else path, mode="r") as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.codec_context.sample_rate)
        # Convert every frame to planar float at its own rate; channel mixing and resampling happen in numpy/soxr.
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        first_time = None
        for frame in container.decode(stream):
            if first_time is None and frame.time is not None:
                first_time = float(frame.time)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().mean(axis=0))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().mean(axis=0))
        wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        return _stream_span(wave, rate, stream, first_time), rate


def _stream_span(wave: np.ndarray, rate: int, stream: Any, first_time: float | None) -> np.ndarray:
    """Keep only the samples the stream declares: an encoder's priming samples before the stream's start time
    (when the demuxer has not dropped them) and the padding of its last frame past start + duration are cut (an
    AAC file of 3.00 s decodes to 3.02 s, which made 76 video frames of a 75-frame clip)."""
    base = stream.time_base
    start = float(stream.start_time * base) if stream.start_time is not None and base else None
    if start is not None and first_time is not None and first_time < start:
        wave = wave[int(round((start - first_time) * rate)) :]
    if stream.duration and base:
        wave = wave[: int(round(float(stream.duration * base) * rate))]
    return wave


def _decode_decord(path: str) -> np.ndarray | None:
    """Last resort for containers PyAV cannot open; decord resamples itself. None when there is no audio."""
    import decord

    try:
        reader = decord.AudioReader(path, sample_rate=SAMPLE_RATE, mono=True)
    except decord.DECORDError as exc:
        if "audio stream" in str(exc).lower():
            return None
        raise
    return reader[:].asnumpy().reshape(-1).astype(np.float32)


def resample(wave: np.ndarray, rate: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with soxr (HQ); a no-op when the rates match."""
    wave = np.asarray(wave, dtype=np.float32)
    if rate == sr:
        return wave
    import soxr

    return soxr.resample(wave, rate, sr, quality="HQ").astype(np.float32)


def _decode(src: Any, sr: int, allow_missing_stream: bool) -> np.ndarray | None:
    name, data, path = _read_source(src)
    errors: list[str] = []
    try:
        wave, rate = _decode_soundfile(name, data, path)
        return _finish(name, wave, rate, sr)
    except AudioError:
        raise
    except Exception as exc:  # libsndfile does not read containers: try PyAV, then decord
        errors.append(f"soundfile: {exc}")
    got: tuple[np.ndarray, int] | None = None
    decoded = False
    try:
        got = _decode_pyav(name, data, path)
        decoded = True
    except Exception as exc:
        errors.append(f"PyAV: {exc}")
    if not decoded and path is not None:
        try:
            wave = _decode_decord(path)
            got = None if wave is None else (wave, SAMPLE_RATE)
            decoded = True
        except Exception as exc:
            errors.append(f"decord: {exc}")
    if not decoded:
        raise AudioError(
            f"{name}: not a readable audio file or media container (corrupt, truncated or an unknown format: "
            f"{'; '.join(errors)}); {_CONTAINER_HINT}"
        )
    if got is None:
        if allow_missing_stream:
            return None
        raise AudioError(
            f"{name}: the container has no audio stream; give the audio as a NAME.wav sidecar next to it"
        )
    return _finish(name, *got, sr)


def _finish(name: str, wave: np.ndarray, rate: int, sr: int) -> np.ndarray:
    if wave.size == 0:
        raise AudioError(f"{name}: the audio has zero length (no samples decoded); check the recording")
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"{name}: the audio contains NaN or infinite samples; re-export it as PCM")
    return resample(wave, rate, sr)


def load_audio(src: str | os.PathLike | bytes, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio file, container audio track, URI or bytes -> mono float32 waveform at `sr` Hz.

    Channels are averaged. Raises AudioError (a ValueError) naming the input when it is missing, empty, corrupt,
    has no audio stream or decodes to nothing.
    """
    if sr <= 0:
        raise AudioError(f"sample rate {sr} is not positive; use e.g. {SAMPLE_RATE}")
    wave = _decode(src, sr, allow_missing_stream=False)
    assert wave is not None
    return wave


def audio_from_video(path: str | os.PathLike | bytes) -> np.ndarray | None:
    """The audio track of a video container at 16 kHz mono, or None when the container has no audio stream."""
    return _decode(path, SAMPLE_RATE, allow_missing_stream=True)


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad a waveform to exactly `num_samples`."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if len(wave) >= num_samples:
        return wave[:num_samples]
    return np.pad(wave, (0, num_samples - len(wave)))


# ----------------------------------------------------------------------------------------------------- mel windows
_MEL_BASIS: np.ndarray | None = None


def _mel_basis() -> np.ndarray:
    global _MEL_BASIS
    if _MEL_BASIS is None:
        import librosa

        _MEL_BASIS = librosa.filters.mel(
            sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX
        ).astype(np.float32)
    return _MEL_BASIS


def log_mel(wave: np.ndarray) -> np.ndarray:
    """16 kHz waveform -> (80, M) log-mel on the scale documented at MEL_SCALE, M = len // 200 + 1.

    Mel frame j is centred on sample 200*j (STFT with centre padding).
    """
    import librosa

    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    emphasised = np.append(wave[:1], wave[1:] - PREEMPHASIS * wave[:-1]).astype(np.float32)
    spec = np.abs(librosa.stft(emphasised, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, center=True))
    mel = _mel_basis() @ spec
    db = 20.0 * np.log10(np.maximum(mel, 1e-5)) - REF_DB
    norm = np.clip((db - MIN_DB) / -MIN_DB, 0.0, 1.0)
    return (2.0 * MEL_SCALE * norm - MEL_SCALE).astype(np.float32)


def mel_window_starts(num_frames: int) -> np.ndarray:
    """First mel frame of each video frame's window.

    Video frame t covers samples [640t, 640t + 640), centred on mel position c = (640t + 320) / 200 = 3.2t + 1.6;
    its 16-frame window starts at floor(c) - 7, so the window's centre (start + 7.5) is within half a mel frame of c.
    t = 0 -> frames -6..9 (edge-padded).
    """
    t = np.arange(num_frames, dtype=np.int64)
    return (16 * t + 8) // 5 - 7


def mel_windows(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """16 kHz waveform -> (num_frames, 80, 16) float32 log-mel windows, one centred on each video frame.

    The audio is padded/trimmed to num_frames * 640 samples first; windows reaching past either end repeat the edge
    frame.
    """
    if num_frames <= 0:
        raise AudioError(f"mel_windows: num_frames must be positive, got {num_frames}")
    mel = log_mel(fit_length(wave, num_frames * SAMPLES_PER_FRAME))
    idx = mel_window_starts(num_frames)[:, None] + np.arange(MEL_WINDOW)[None, :]
    idx = np.clip(idx, 0, mel.shape[1] - 1)
    return np.ascontiguousarray(mel[:, idx].transpose(1, 0, 2), dtype=np.float32)


# ------------------------------------------------------------------------------------------------- speech activity
_FALLBACK_WARNED = False


def _silero_mask(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """Per video frame: a 32 ms Silero chunk overlapping it has speech probability >= VAD_THRESHOLD."""
    from preprocessing import vad

    probs = vad.speech_probs(wave)
    first = np.arange(num_frames) * SAMPLES_PER_FRAME // vad.CHUNK
    last = ((np.arange(num_frames) + 1) * SAMPLES_PER_FRAME - 1) // vad.CHUNK
    active = np.append(probs >= VAD_THRESHOLD, False)  # index len(probs): past the audio's end
    n = len(probs)
    return active[np.minimum(first, n)] | active[np.minimum(last, n)]


def _energy_vad_frames(wave: np.ndarray) -> np.ndarray:
    """Fallback rule when silero-vad is not installed: per 20 ms frame speech decision (bool), hangover applied.

    A frame is active when all hold: its energy is VAD_ABOVE_FLOOR_DB over the clip's noise floor (a low percentile
    of the non-silent frames' energies, so a track that never falls quiet, like continuous music, has a high floor)
    and above VAD_MIN_DB; its spectral flatness over 300-4000 Hz is low (formants/harmonics, not noise); its
    zero-crossing rate is below hiss level. Active frames then also mark VAD_HANGOVER frames each side. Steady
    music and tones pass all of these (docs/preprocessing.md): this is why Silero decides when it is installed.
    """
    n = len(wave) // VAD_FRAME
    if n == 0:
        return np.zeros(0, dtype=bool)
    frames = wave[: n * VAD_FRAME].reshape(n, VAD_FRAME).astype(np.float64)
    energy_db = 10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    live = energy_db[energy_db > -90.0]  # digital silence is no noise floor
    if live.size == 0:
        return np.zeros(n, dtype=bool)
    floor_db = np.percentile(live, VAD_FLOOR_PERCENTILE)
    spec = np.abs(np.fft.rfft(frames * np.hanning(VAD_FRAME), n=512, axis=1)) ** 2 + 1e-12
    band = spec[:, 10:129]  # bins of 31.25 Hz: ~300-4000 Hz
    flatness = np.exp(np.mean(np.log(band), axis=1)) / np.mean(band, axis=1)
    zcr = np.mean(np.abs(np.diff(np.signbit(frames), axis=1)), axis=1)
    active = (
        (energy_db > floor_db + VAD_ABOVE_FLOOR_DB)
        & (energy_db > VAD_MIN_DB)
        & (flatness < VAD_MAX_FLATNESS)
        & (zcr < VAD_MAX_ZCR)
    )
    if VAD_HANGOVER:
        kernel = np.ones(2 * VAD_HANGOVER + 1)
        active = np.convolve(active.astype(np.float64), kernel, mode="same") > 0
    return active


def _energy_mask(wave: np.ndarray, num_frames: int) -> np.ndarray:
    active = _energy_vad_frames(wave)
    per = SAMPLES_PER_FRAME // VAD_FRAME
    padded = np.zeros(num_frames * per, dtype=bool)
    m = min(len(active), len(padded))
    padded[:m] = active[:m]
    return padded.reshape(num_frames, per).any(axis=1)


def speech_mask(wave: np.ndarray, num_frames: int | None = None, detector: str = "auto") -> np.ndarray:
    """Per 40 ms video frame of a 16 kHz waveform: True when it holds speech. Length num_frames (default
    ceil(len / 640)); frames past the end of the audio are False.

    detector: "silero" (Silero VAD), "energy" (the fallback rule) or "auto" (Silero when silero-vad is installed).
    Silero carries state along the waveform, so pass a whole clip and slice the mask per segment.
    """
    global _FALLBACK_WARNED
    from preprocessing import vad

    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if num_frames is None:
        num_frames = -(-len(wave) // SAMPLES_PER_FRAME)
    if num_frames == 0 or wave.size == 0:
        return np.zeros(num_frames, dtype=bool)
    if detector == "auto":
        detector = "silero" if vad.available() else "energy"
        if detector == "energy" and not _FALLBACK_WARNED:
            _FALLBACK_WARNED = True
            log.warning(
                "silero-vad is not installed: speech activity uses the energy rule, which counts music"
            )
    if detector == "silero":
        return _silero_mask(wave, num_frames)
    if detector == "energy":
        return _energy_mask(wave, num_frames)
    raise ValueError(f"unknown speech detector {detector!r}: use auto, silero or energy")


def speech_ratio(wave: np.ndarray, detector: str = "auto") -> float:
    """Fraction of the 40 ms video frames of a 16 kHz waveform judged speech (see speech_mask); 0.0 when empty.
    Compare with SPEECH_MIN_RATIO."""
    mask = speech_mask(wave, detector=detector)
    return float(mask.mean()) if mask.size else 0.0


# --------------------------------------------------------------------------------------------- pretrained encoders
def _check_model_dir(model_path: str | os.PathLike, what: str) -> Path:
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} model folder {path} not found or has no config.json; download the model once "
            f"(e.g. huggingface-cli download NAME --local-dir {path}) and pass that folder"
        )
    return path


class SpeechEncoder:
    """A transformers audio encoder (HuBERT, wav2vec2, ...) from a local folder -> hidden states at 25 fps."""

    def __init__(self, model_path: str | os.PathLike, layer: int = -1):
        from transformers import Wav2Vec2FeatureExtractor

        from preprocessing.hf_loading import load, speech_model_class

        path = _check_model_dir(model_path, "speech encoder")
        self.layer = layer  # which hidden state: -1 the last, 0 the CNN features after projection
        # The feature extractor only normalises the waveform; a folder without one gets the same normalisation.
        has_extractor = (path / "preprocessor_config.json").is_file()
        self.extractor = load(Wav2Vec2FeatureExtractor, path) if has_extractor else None
        self.model = load(speech_model_class(path), path).eval()  # concrete classes: no code from the folder

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def to(self, device: Any) -> SpeechEncoder:
        self.model.to(device)
        return self

    def states(self, wave: np.ndarray, num_frames: int) -> np.ndarray:
        """16 kHz waveform -> (num_frames, D) float32, the encoder's states linearly interpolated to 25 fps."""
        import torch
        import torch.nn.functional as F

        if num_frames <= 0:
            raise AudioError(f"SpeechEncoder.states: num_frames must be positive, got {num_frames}")
        wave = fit_length(wave, num_frames * SAMPLES_PER_FRAME)
        if self.extractor is not None:
            values = self.extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_values"]
        else:
            values = torch.from_numpy((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7))[None]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model(values.to(device), output_hidden_states=self.layer != -1)
            hidden = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
            hidden = F.interpolate(
                hidden.transpose(1, 2).float(), size=num_frames, mode="linear", align_corners=False
            )
        return hidden[0].transpose(0, 1).cpu().numpy().astype(np.float32)


class Transcriber:
    """Speech recognition with a transformers Whisper model from a local folder (model + processor files)."""

    CHUNK_SECONDS = 30  # Whisper's fixed input length

    def __init__(self, model_path: str | os.PathLike, language: str | None = None, max_new_tokens: int = 128):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from preprocessing.hf_loading import load

        path = _check_model_dir(model_path, "Whisper")
        self.language = language  # e.g. "en"; None lets a multilingual model detect it
        self.max_new_tokens = max_new_tokens  # per 30 s chunk
        try:
            self.processor = load(WhisperProcessor, path)
        except Exception as exc:
            raise FileNotFoundError(
                f"Whisper folder {path}: cannot load the processor ({exc}); it needs preprocessor_config.json and "
                "the tokenizer files (vocab.json, merges.txt, ...) saved with WhisperProcessor.save_pretrained"
            ) from exc
        self.model = load(WhisperForConditionalGeneration, path).eval()

    def to(self, device: Any) -> Transcriber:
        self.model.to(device)
        return self

    def transcribe(self, wave: np.ndarray) -> str:
        """16 kHz waveform -> text (30 s chunks decoded greedily and joined)."""
        import torch

        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            return ""
        step = self.CHUNK_SECONDS * SAMPLE_RATE
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.language:
            kwargs.update(language=self.language, task="transcribe")
        texts = []
        for start in range(0, len(wave), step):
            feats = self.processor.feature_extractor(
                wave[start : start + step], sampling_rate=SAMPLE_RATE, return_tensors="pt"
            ).input_features
            with torch.no_grad():
                ids = self.model.generate(feats.to(device), **kwargs)
            texts.append(self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
        return " ".join(t for t in texts if t)
