"""Disentanglement measure on SynthTalk ground truth: identity on the true factors, zero on noise, and it can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edtalk.metrics.disentanglement import (
    Disentanglement,
    disentanglement,
    factor_groups,
    heatmap,
    ridge_r2,
)
from preprocessing.synthtalk import SynthConfig, clip_plan


@pytest.fixture(scope="module")
def truth() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """True factor groups of 40 planned clips (no drawing needed) and a mask holding out whole clips."""
    cfg = SynthConfig(identities=5, clips_per_identity=8, seconds=5.0, seed=11)
    docs, clip_of_frame = [], []
    for i in range(cfg.identities):
        for c in range(cfg.clips_per_identity):
            factors, _ = clip_plan(cfg, i, c)
            docs.append(json.dumps({"factors": {k: v.tolist() for k, v in factors.items()}}))
            clip_of_frame += [len(docs)] * cfg.frames_per_clip
    clip_of_frame = np.array(clip_of_frame)
    held = np.random.default_rng(0).choice(np.unique(clip_of_frame), 12, replace=False)
    return factor_groups(docs), ~np.isin(clip_of_frame, held)


def test_true_factors_against_themselves_give_the_identity(truth):
    groups, train = truth
    assert {k: v.shape[1] for k, v in groups.items()} == {"mouth": 2, "pose": 5, "eye": 4, "expression": 6}
    result = disentanglement(groups, groups, train=train)
    assert result.spaces == result.groups == ("mouth", "pose", "eye", "expression")
    diag = np.diag(result.matrix)
    off = result.matrix[~np.eye(4, dtype=bool)]
    assert diag.min() > 0.95, result.matrix
    assert off.max() < 0.05, result.matrix  # factors of different groups are (nearly) independent
    assert result.diagonal_mean == pytest.approx(diag.mean())
    assert result.leakage == pytest.approx(off.max())


def test_random_weights_explain_nothing(truth):
    groups, train = truth
    n = len(train)
    rng = np.random.default_rng(1)
    weights = {
        s: rng.standard_normal((n, k))
        for s, k in (("mouth", 20), ("pose", 6), ("eye", 6), ("expression", 10))
    }
    result = disentanglement(weights, groups, train=train)
    assert result.matrix.max() < 0.03, result.matrix


def test_a_leaky_space_is_caught(truth):
    groups, train = truth
    rng = np.random.default_rng(2)
    mix = rng.standard_normal((groups["mouth"].shape[1] + groups["pose"].shape[1], 8))
    weights = dict(groups)
    both = np.concatenate([groups["mouth"], groups["pose"]], axis=1)
    both = (both - both.mean(0)) / both.std(0)  # comparable scales, as a network's weights would have
    weights["mouth"] = both @ mix  # a mouth space that also holds the pose
    result = disentanglement(weights, groups, train=train)
    assert result.matrix[0, 1] > 0.8 and result.leakage > 0.8


def test_ridge_matches_least_squares_and_to_dict_roundtrips(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 5))
    y = x @ rng.standard_normal((5, 2)) + 0.5 * rng.standard_normal((400, 2))
    r2 = ridge_r2(x[:300], y[:300], x[300:], y[300:], alpha=1e-9)
    coef, *_ = np.linalg.lstsq(np.c_[x[:300], np.ones(300)], y[:300], rcond=None)
    pred = np.c_[x[300:], np.ones(100)] @ coef
    ref = np.mean(1 - ((y[300:] - pred) ** 2).sum(0) / ((y[300:] - y[300:].mean(0)) ** 2).sum(0))
    assert r2 == pytest.approx(ref, abs=1e-6)

    result = Disentanglement(np.array([[0.9, 0.1], [0.2, 0.8]]), ("mouth", "pose"), ("mouth", "pose"))
    d = json.loads(json.dumps(result.to_dict()))
    assert d["diagonal_mean"] == pytest.approx(0.85) and d["leakage"] == pytest.approx(0.2)
    png = heatmap(result, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="frames"):
        disentanglement({"mouth": np.zeros((10, 2))}, {"mouth": np.zeros((9, 2))})
    with pytest.raises(ValueError, match="NaN"):
        disentanglement({"mouth": np.full((10, 2), np.nan)}, {"mouth": np.zeros((10, 2))})
    with pytest.raises(KeyError, match="mouth_width"):
        factor_groups({"factors": {"mouth_open": [0.0]}})
