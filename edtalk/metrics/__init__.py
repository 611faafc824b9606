"""Evaluation metrics, pure numpy/torch: image quality, landmark distances, LPIPS, basis orthogonality."""

from edtalk.metrics.image import psnr, ssim, ssim_map
from edtalk.metrics.landmarks import MOUTH, f_lmd, landmark_distances, lmd, m_lmd
from edtalk.metrics.lpips import LPIPS, load_lpips, lpips_distance
from edtalk.metrics.orthogonality import orthogonality_error

__all__ = [
    "LPIPS",
    "MOUTH",
    "f_lmd",
    "landmark_distances",
    "lmd",
    "load_lpips",
    "lpips_distance",
    "m_lmd",
    "orthogonality_error",
    "psnr",
    "ssim",
    "ssim_map",
]
