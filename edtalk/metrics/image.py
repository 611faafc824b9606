"""Image-quality metrics on frames: PSNR and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004), batched over video frames.

Inputs are numpy arrays or torch tensors, uint8 or float, of one image or a batch of frames:
  (H, W) grey, (H, W, C) or (N, H, W, C) with channel_axis=-1 (the default, decoded video), or (N, C, H, W) with
  channel_axis=1 (model tensors). With channel_axis=None, (H, W) is one grey image and (N, H, W) a batch of them.
data_range is the range of possible values: 255 for uint8 (the default there); float input must state it (1.0 for
[0, 1], the pair (-1, 1) for the model's tensors) because it cannot be guessed safely. A (low, high) pair shifts the
values to start at 0 first: SSIM's luminance term depends on the absolute level, not only on differences.

SSIM follows the paper: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
statistics, computed per channel on the "valid" region where the window fits entirely, then averaged over pixels
and channels. The paper's reference code also downsamples large images first; like scikit-image we do not.
"""

from __future__ import annotations

import numpy as np
import torch

SSIM_SIGMA = 1.5  # Gaussian window width in pixels (Wang et al. 2004)
SSIM_RADIUS = 5  # window half-size: 11 taps, the truncation scikit-image also uses for sigma 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
FRAMES_PER_CHUNK = 8  # frames per pass, so a long video never holds all its moment maps in float64 at once


def _as_nchw(x, channel_axis: int | None) -> tuple[np.ndarray, bool]:
    """-> (float64 array [N, C, H, W], whether the input was a single image)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float64, copy=False)
    if channel_axis is None:
        if arr.ndim == 2:
            return arr[None, None], True
        if arr.ndim == 3:
            return arr[:, None], False
        raise ValueError(f"grey images (channel_axis=None) must be (H, W) or (N, H, W), got {arr.shape}")
    if arr.ndim == 2:
        return arr[None, None], True
    single = arr.ndim == 3
    axis = channel_axis
    if single:
        arr = arr[None]
        axis = channel_axis if channel_axis < 0 else channel_axis + 1
    if arr.ndim != 4:
        raise ValueError(f"expected an image (H, W[, C]) or a batch of frames (4 dims), got {arr.shape}")
    return np.moveaxis(arr, axis, 1), single


def _prepare(a, b, data_range, channel_axis: int | None) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """-> (x, y shifted so the range starts at 0, the range's span, single image?)."""
    is_uint8 = (isinstance(a, torch.Tensor) and a.dtype == torch.uint8) or (
        not isinstance(a, torch.Tensor) and np.asarray(a).dtype == np.uint8
    )
    x, single = _as_nchw(a, channel_axis)
    y, _ = _as_nchw(b, channel_axis)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape} (as N, C, H, W)")
    if data_range is None:
        if not is_uint8:
            raise ValueError(
                "data_range is required for float images: 1.0 for [0, 1], (-1, 1) for [-1, 1], 255 for 0-255"
            )
        data_range = 255.0
    lo, hi = (
        (0.0, float(data_range)) if np.isscalar(data_range) else (float(data_range[0]), float(data_range[1]))
    )
    if hi <= lo:
        raise ValueError(f"data_range must be a positive span or a (low, high) pair, got {data_range}")
    if lo == 0.0 and min(x.min(), y.min()) < 0:
        # SSIM's luminance term is not shift-invariant: [-1, 1] data must say where its range starts.
        raise ValueError("images have negative values: pass data_range as (low, high), e.g. (-1, 1)")
    return x - lo, y - lo, hi - lo, single


def psnr(a, b, data_range=None, channel_axis: int | None = -1) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB, 10 log10(L^2 / MSE), per image; inf where the images are identical.

    Returns a float for one image, an (N,) array for a batch of frames (average it yourself: the mean of per-frame
    PSNR is the usual video convention).
    """
    x, y, rng, single = _prepare(a, b, data_range, channel_axis)
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(rng**2 / mse)
    return float(out[0]) if single else out


def _gaussian_window() -> np.ndarray:
    r = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    g = np.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _blur_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter of [..., H, W] without padding: only where the whole window fits.

    A sum of shifted slices: exact in float64 and vectorised (numpy has no 2-D convolution of its own).
    """
    k = len(g)
    h, w = x.shape[-2:]
    rows = g[0] * x[..., : h - k + 1, :]
    for i in range(1, k):
        rows = rows + g[i] * x[..., i : i + h - k + 1, :]
    out = g[0] * rows[..., : w - k + 1]
    for i in range(1, k):
        out = out + g[i] * rows[..., i : i + w - k + 1]
    return out


def _ssim_map(x: np.ndarray, y: np.ndarray, rng: float) -> np.ndarray:
    h, w = x.shape[-2:]
    if min(h, w) < 2 * SSIM_RADIUS + 1:
        raise ValueError(
            f"SSIM needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1}, got {h}x{w}"
        )
    g = _gaussian_window()
    c1 = (SSIM_K1 * rng) ** 2
    c2 = (SSIM_K2 * rng) ** 2
    out = []
    for i in range(0, len(x), FRAMES_PER_CHUNK):
        xs, ys = x[i : i + FRAMES_PER_CHUNK], y[i : i + FRAMES_PER_CHUNK]
        mu_x, mu_y = _blur_valid(xs, g), _blur_valid(ys, g)
        var_x = _blur_valid(xs * xs, g) - mu_x**2
        var_y = _blur_valid(ys * ys, g) - mu_y**2
        cov = _blur_valid(xs * ys, g) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
        den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        out.append(num / den)
    return np.concatenate(out)


def ssim_map(a, b, data_range=None, channel_axis: int | None = -1) -> np.ndarray:
    """Per-pixel SSIM, [N, C, H - 10, W - 10] float64 (N = 1 for one image)."""
    x, y, rng, _ = _prepare(a, b, data_range, channel_axis)
    return _ssim_map(x, y, rng)


def ssim(a, b, data_range=None, channel_axis: int | None = -1) -> float | np.ndarray:
    """Mean SSIM per image (Gaussian window, as in Wang et al. 2004): a float for one image, (N,) for frames."""
    x, y, rng, single = _prepare(a, b, data_range, channel_axis)
    values = _ssim_map(x, y, rng)
    values = values.reshape(len(values), -1).mean(axis=1)
    return float(values[0]) if single else values
