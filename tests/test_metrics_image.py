"""PSNR and SSIM against scikit-image on real frames decoded with decord."""

from __future__ import annotations

import decord
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from edtalk.metrics import psnr, ssim, ssim_map


@pytest.fixture(scope="module")
def frames(media_dir):
    """Pairs of real frames: nearby frames of one talking-face clip (similar) and frames far apart (less so)."""
    reader = decord.VideoReader(str(media_dir / "videos" / "EDTalk__mouth_source.mp4"))
    batch = reader.get_batch([0, 2, 60, 200]).asnumpy()
    return batch[[0, 0, 2]], batch[[1, 3, 3]]


def _sk_ssim(a, b, data_range=255, channel_axis=-1):
    return structural_similarity(
        a,
        b,
        data_range=data_range,
        channel_axis=channel_axis,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )


def test_ssim_matches_skimage_on_real_frames(frames):
    a, b = frames
    ours = ssim(a, b)
    ref = np.array([_sk_ssim(x, y) for x, y in zip(a, b, strict=True)])
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert ours[0] > ours[1]  # two frames apart vs 200 frames apart
    assert ssim(a[0], b[0]) == pytest.approx(ref[0], abs=1e-9)  # one image -> a float


def test_psnr_matches_skimage_on_real_frames(frames):
    a, b = frames
    ours = psnr(a, b)
    ref = np.array([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b, strict=True)])
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert psnr(a[0], a[0]) == np.inf


def test_float_and_nchw_inputs_agree_with_uint8(frames):
    a, b = frames
    ref_ssim, ref_psnr = ssim(a, b), psnr(a, b)
    # The model's convention: float NCHW tensors in [-1, 1].
    ta = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(ssim(ta, tb, data_range=(-1, 1), channel_axis=1), ref_ssim, atol=1e-6)
    np.testing.assert_allclose(psnr(ta, tb, data_range=(-1, 1), channel_axis=1), ref_psnr, atol=1e-4)
    fa, fb = a / 255.0, b / 255.0
    ref_float = _sk_ssim(fa[1], fb[1], data_range=1.0)
    assert ssim(fa[1], fb[1], data_range=1.0) == pytest.approx(ref_float, abs=1e-9)


def test_grey_images(frames):
    a, b = frames[0][..., 1], frames[1][..., 1]
    ours = ssim(a, b, channel_axis=None)
    ref = [_sk_ssim(x, y, channel_axis=None) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert ssim_map(a, b, channel_axis=None).shape == (3, 1, 246, 246)  # valid region of an 11x11 window


def test_ssim_is_one_for_identical_and_drops_with_noise(frames):
    a = frames[0][:1]
    assert ssim(a, a)[0] == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(0)
    noisy = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    noisier = np.clip(a + rng.normal(0, 60, a.shape), 0, 255).astype(np.uint8)
    assert 1.0 > ssim(a, noisy)[0] > ssim(a, noisier)[0]
    assert psnr(a, noisy)[0] > psnr(a, noisier)[0]


def test_bad_input_is_explained(frames):
    a, b = frames
    with pytest.raises(ValueError, match="data_range is required"):
        ssim(a / 255.0, b / 255.0)
    with pytest.raises(ValueError, match="negative values"):
        ssim(a / 127.5 - 1, b / 127.5 - 1, data_range=2.0)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:, :128])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :8, :8], b[:, :8, :8])
