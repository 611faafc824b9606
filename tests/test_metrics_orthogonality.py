"""max |QᵀQ − I| on known matrices and on the navigation's own QR banks."""

from __future__ import annotations

import pytest
import torch

from edtalk.metrics import orthogonality_error
from edtalk.navigation import orthonormalize


def test_orthonormal_is_zero_and_scaling_is_measured():
    q, _ = torch.linalg.qr(torch.randn(32, 10, dtype=torch.float64))
    assert orthogonality_error(q) < 1e-12
    scaled = q.clone()
    scaled[:, 3] *= 1.1
    assert orthogonality_error(scaled) == pytest.approx(0.21, abs=1e-9)  # 1.1^2 - 1


def test_banks_are_checked_across_spaces():
    q, _ = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64))
    assert orthogonality_error({"mouth": q[:, :5], "pose": q[:, 5:]}) < 1e-12
    # The same column in two banks: each bank alone is orthonormal, together they are not.
    assert orthogonality_error([q[:, :3], q[:, 2:4]]) == pytest.approx(1.0, abs=1e-9)


def test_navigation_qr_banks():
    torch.manual_seed(0)
    banks = [torch.randn(64, n) for n in (20, 6, 6, 10)]
    assert orthogonality_error(banks) > 0.5  # raw random banks
    assert orthogonality_error(orthonormalize(banks)) < 1e-5  # float32 round-off only


def test_bad_shapes():
    with pytest.raises(ValueError, match="cannot be orthonormal"):
        orthogonality_error(torch.randn(4, 6))
    with pytest.raises(ValueError, match="one D"):
        orthogonality_error([torch.randn(4, 2), torch.randn(5, 2)])
