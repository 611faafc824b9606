"""The reference's audio path (Wav2Lip-style preprocessing of the EDTalk demos), reproduced exactly.

16 kHz mono float -> pre-emphasis (IIR, float64) -> |STFT| (n_fft 800, hop 200, periodic Hann, centre padding with
*reflect*, the librosa <= 0.9 default) -> Slaney mel (80 bins, 55..7600 Hz) -> dB - 20 -> clip(8 (dB+100)/100 - 4)
-> float32; one 80x16 window per 25 fps video frame starting at int(80 (i-2)/25) (truncated toward zero) with
indices clamped to the mel range; the lip coefficients are then smoothed along time by a zero-padded 3-tap
Gaussian. This differs from our own preprocessing (preprocessing/audio.py), which the reference weights never saw.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
N_FFT, HOP, N_MELS, FMIN, FMAX = 800, 200, 80, 55.0, 7600.0
WINDOW = 16  # mel frames per video frame
MEL_PER_SECOND = 80  # mel frames per second (16000 / 200)


def fit_audio(wav: np.ndarray) -> tuple[np.ndarray, int]:
    """(the wav cropped or zero-padded to int(len / 640) * 640 samples, that number of video frames)."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    frames = int(len(wav) / SAMPLES_PER_FRAME)
    n = frames * SAMPLES_PER_FRAME
    return (wav[:n] if len(wav) >= n else np.pad(wav, (0, n - len(wav)))), frames


def stft_magnitude(wav: np.ndarray) -> np.ndarray:
    """|STFT| (401, 1 + len/200) of the pre-emphasised wav, float64."""
    import librosa
    from scipy.signal import lfilter

    emphasised = lfilter([1.0, -0.97], [1.0], np.asarray(wav, dtype=np.float64))
    spec = librosa.stft(
        emphasised, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, center=True, pad_mode="reflect"
    )
    return np.abs(spec)


def mel_basis() -> np.ndarray:
    """The librosa Slaney mel filter bank (80, 401), float32 as the reference builds it."""
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)


def reference_mel(wav: np.ndarray) -> np.ndarray:
    """16 kHz wav -> normalised log-mel (frames, 80), computed in float64 and returned as float32."""
    mel = np.dot(mel_basis(), stft_magnitude(wav))
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - 20.0
    return np.clip(8.0 * ((db + 100.0) / 100.0) - 4.0, -4.0, 4.0).T.astype(np.float32)


def window_index(num_frames: int, num_mel: int) -> tuple[np.ndarray, np.ndarray]:
    """(start of each frame's window, int(80 (i-2)/25) truncated toward zero; its 16 indices clamped)."""
    starts = np.array(
        [int(MEL_PER_SECOND * ((i - 2) / float(FPS))) for i in range(num_frames)], dtype=np.int64
    )
    index = np.clip(starts[:, None] + np.arange(WINDOW)[None, :], 0, num_mel - 1)
    return starts, index


def mel_windows(mel: np.ndarray, num_frames: int) -> np.ndarray:
    """(frames, 80) mel -> (num_frames, 1, 80, 16) windows, one per video frame."""
    _, index = window_index(num_frames, mel.shape[0])
    return np.ascontiguousarray(mel[index].transpose(0, 2, 1)[:, None], dtype=np.float32)


def audio_windows(wav: np.ndarray) -> np.ndarray:
    """16 kHz wav -> its (frames, 1, 80, 16) mel windows (frames = int(len / 640))."""
    wav, frames = fit_audio(wav)
    return mel_windows(reference_mel(wav), frames)


def smoothing_kernel() -> torch.Tensor:
    """[e^-1/2, 1, e^-1/2] / sum, built in float64 and cast to float32."""
    k = np.array([math.exp(-0.5), 1.0, math.exp(-0.5)], dtype=np.float64)
    return torch.from_numpy((k / k.sum()).astype(np.float32))


def smooth_lip(alpha: torch.Tensor) -> torch.Tensor:
    """(T, n) lip coefficients -> each filtered along time by the 3-tap kernel with zero padding 1."""
    n = alpha.shape[1]
    weight = smoothing_kernel().to(alpha).view(1, 1, 3).repeat(n, 1, 1)
    return F.conv1d(alpha.t().unsqueeze(0), weight, padding=1, groups=n)[0].t()


def lip_weights(audio_to_mouth: torch.nn.Module, wav: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The reference audio-driven mouth: 16 kHz wav -> smoothed lip coefficients (int(len / 640), n) from the
    Audio2Lip network `audio_to_mouth` (windows run in batches; BatchNorm in eval mode is per window)."""
    windows = torch.from_numpy(audio_windows(wav))[:, 0]
    device = next(audio_to_mouth.parameters()).device
    with torch.no_grad():
        raw = torch.cat(
            [audio_to_mouth(windows[a : a + batch].to(device)) for a in range(0, len(windows), batch)]
        )
    return smooth_lip(raw)


def is_audio2lip(audio_to_mouth: torch.nn.Module | None) -> bool:
    """Whether this mouth network is the reference Audio2Lip (it then needs this module's mel and smoothing)."""
    return audio_to_mouth is not None and audio_to_mouth.config.encoder.architecture == "wav2lip"
