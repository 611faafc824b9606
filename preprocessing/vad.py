"""Silero VAD (v6, 16 kHz) run in numpy from the safetensors weights its wheel ships: speech probability per 32 ms.

The `silero-vad` package ships the network as TorchScript, ONNX and safetensors. We read only the safetensors (plain
tensors: loading them runs no code) and evaluate the small network here in numpy, so a preprocessing worker needs
neither torch (a dlib worker never imports it) nor onnxruntime. The network, per 512-sample chunk with the 64
samples before it as context: right reflect-pad by 64, a 256-point STFT as a strided convolution (stride 128, 4
frames), magnitudes of 129 bins, four 3-tap convolutions with ReLU (strides 1, 2, 2, 1 -> one 128-d vector), an
LSTM cell carried across chunks, ReLU, a 1x1 convolution and a sigmoid. Everything before the LSTM is computed for
all chunks at once; only the LSTM runs chunk by chunk. tests/test_media_vad.py checks the result against the
package's own TorchScript model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
CHUNK = 512  # samples per decision (32 ms)
CONTEXT = 64  # samples of the previous chunk each chunk sees
WEIGHTS = "silero_vad_16k.safetensors"

_WEIGHTS: dict[str, np.ndarray] | None = None


class VadUnavailableError(RuntimeError):
    """The silero-vad package (its weights file) is not installed."""


def weights_path() -> Path:
    """The safetensors file inside the installed silero-vad package, found without importing it (its __init__
    imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailableError("the silero-vad package is not installed (pip install silero-vad)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / WEIGHTS
    if not path.is_file():
        raise VadUnavailableError(f"{path} is missing; reinstall silero-vad")
    return path


def available() -> bool:
    try:
        weights_path()
    except VadUnavailableError:
        return False
    return True


def _weights() -> dict[str, np.ndarray]:
    global _WEIGHTS
    if _WEIGHTS is None:
        from safetensors.numpy import load_file

        _WEIGHTS = {k: v.astype(np.float32) for k, v in load_file(str(weights_path())).items()}
    return _WEIGHTS


def _conv3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """1-D convolution, kernel 3, padding 1: x (N, T, Cin) -> (N, T', Cout), ReLU applied."""
    n, t, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    out_len = (t + 2 - 3) // stride + 1
    taps = [padded[:, k : k + stride * (out_len - 1) + 1 : stride] for k in range(3)]
    out = sum(taps[k] @ weight[:, :, k].T for k in range(3)) + bias
    return np.maximum(out, 0.0)


def _features(wave: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """(samples,) -> (chunks, 128): the network up to the LSTM, for every chunk at once."""
    n = -(-len(wave) // CHUNK)
    padded = np.zeros(CONTEXT + n * CHUNK, np.float32)
    padded[CONTEXT : CONTEXT + len(wave)] = wave
    span = CONTEXT + CHUNK
    windows = np.lib.stride_tricks.sliding_window_view(padded, span)[::CHUNK][:n]  # (n, 576)
    reflected = windows[:, -2 : -2 - CONTEXT : -1]  # reflect padding on the right (edge not repeated)
    x = np.concatenate([windows, reflected], axis=1)  # (n, 640)
    frames = np.lib.stride_tricks.sliding_window_view(x, 256, axis=1)[:, ::128]  # (n, 4, 256)
    spec = frames @ w["stft_conv.weight"][:, 0, :].T  # (n, 4, 258): real and imaginary parts
    half = spec.shape[-1] // 2
    mag = np.sqrt(spec[..., :half] ** 2 + spec[..., half:] ** 2)
    h = _conv3(mag, w["conv1.weight"], w["conv1.bias"], 1)
    h = _conv3(h, w["conv2.weight"], w["conv2.bias"], 2)
    h = _conv3(h, w["conv3.weight"], w["conv3.bias"], 2)
    h = _conv3(h, w["conv4.weight"], w["conv4.bias"], 1)
    return h[:, 0, :]


def speech_probs(wave: np.ndarray, weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """16 kHz mono waveform -> (ceil(len / 512),) float32 speech probability of each 32 ms chunk.

    `weights` (tensor name -> array, the safetensors names) replaces the shipped weights (tests).
    """
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        return np.zeros(0, np.float32)
    w = _weights() if weights is None else weights
    feats = _features(wave, w)
    gates_in = feats @ w["lstm_cell.weight_ih"].T + w["lstm_cell.bias_ih"] + w["lstm_cell.bias_hh"]
    w_hh = w["lstm_cell.weight_hh"].T
    size = w_hh.shape[0]
    h = np.zeros(size, np.float32)
    c = np.zeros(size, np.float32)
    hs = np.empty((len(feats), size), np.float32)
    for k in range(len(feats)):
        g = gates_in[k] + h @ w_hh
        i, f, o = _sigmoid(g[:size]), _sigmoid(g[size : 2 * size]), _sigmoid(g[3 * size :])
        c = f * c + i * np.tanh(g[2 * size : 3 * size])
        h = o * np.tanh(c)
        hs[k] = h
    logits = np.maximum(hs, 0.0) @ w["final_conv.weight"][0, :, 0] + w["final_conv.bias"][0]
    return _sigmoid(logits).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|
