"""M-LMD / F-LMD on hand-made landmark sets with known distances."""

from __future__ import annotations

import numpy as np
import pytest

from edtalk.metrics import f_lmd, landmark_distances, m_lmd


def _face(frames: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    pts = rng.uniform(60, 200, size=(frames, 68, 2))
    pts[:, 36] = (100.0, 110.0)  # outer eye corners 50 px apart
    pts[:, 45] = (150.0, 110.0)
    return pts


def test_mouth_only_offset():
    target = _face()
    pred = target.copy()
    pred[:, 48:68] += (3.0, 4.0)  # 5 px on each of the 20 mouth points
    assert m_lmd(pred, target) == pytest.approx(5.0)
    assert f_lmd(pred, target) == pytest.approx(5.0 * 20 / 68)


def test_per_frame_and_normalisations():
    target = _face(3)
    pred = target.copy()
    pred[1] += (0.0, 2.0)  # only frame 1 moves, every point by 2 px
    np.testing.assert_allclose(landmark_distances(pred, target), [0.0, 2.0, 0.0])
    assert f_lmd(pred, target) == pytest.approx(2.0 / 3)
    assert f_lmd(pred, target, normalize="size", image_size=256) == pytest.approx(2.0 / 3 / 256)
    assert f_lmd(pred, target, normalize="interocular") == pytest.approx(2.0 / 3 / 50)


def test_single_frame_and_identity():
    target = _face(1)[0]
    assert f_lmd(target, target) == 0.0
    pred = target.copy()
    pred[60] += (6.0, 8.0)  # one inner-lip point 10 px off
    assert m_lmd(pred, target) == pytest.approx(10.0 / 20)


def test_bad_input_is_explained():
    target = _face()
    with pytest.raises(ValueError, match=r"\(T, 68, 2\)"):
        f_lmd(target[:, :67], target[:, :67])
    with pytest.raises(ValueError, match="differ in shape"):
        f_lmd(target[:2], target)
    broken = target.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m_lmd(broken, target)
    with pytest.raises(ValueError, match="image_size"):
        f_lmd(target, target, normalize="size")
    with pytest.raises(ValueError, match="normalize must be"):
        f_lmd(target, target, normalize="iod")
