"""Loss values on inputs whose answer is known by hand, and the gradients that must (not) flow."""

from __future__ import annotations

import math

import pytest
import torch

from edtalk import losses as L
from edtalk import vgg19 as vgg_mod


def test_feature_loss_exp_minus_cos():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    assert L.feature_loss(a, a).item() == pytest.approx(math.exp(-1.0), abs=1e-6)
    assert L.feature_loss(a, -a).item() == pytest.approx(math.e, abs=1e-5)
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert L.feature_loss(x, y).item() == pytest.approx(1.0, abs=1e-6)
    assert L.mouth_consistency_loss(2 * a, a).item() == pytest.approx(math.exp(-1.0), abs=1e-6)  # scale-free


def test_norm_and_l1_losses():
    w = torch.zeros(2, 4, 3)
    w_hat = w.clone()
    w_hat[..., 0] = 3.0
    w_hat[..., 1] = 4.0
    assert L.l2_norm_loss(w_hat, w).item() == pytest.approx(5.0)
    assert L.pose_reconstruction_loss is L.l2_norm_loss and L.mouth_weight_loss is L.l2_norm_loss
    assert L.expression_loss(torch.tensor([[1.0, -2.0]]), torch.zeros(1, 2)).item() == pytest.approx(3.0)
    assert L.l1_reconstruction_loss(torch.ones(1, 3, 4, 4), -torch.ones(1, 3, 4, 4)).item() == pytest.approx(
        2.0
    )
    with pytest.raises(ValueError, match="same shape"):
        L.l1_reconstruction_loss(torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 5))


def test_temporal_loss_ignores_offsets_and_sees_jitter():
    torch.manual_seed(0)
    w = torch.randn(2, 6, 4)
    assert L.temporal_loss(w + 5.0, w).item() == pytest.approx(0.0, abs=1e-6)
    jitter = w.clone()
    jitter[:, 3, 0] += 1.0  # one frame off by 1 -> two velocity errors of norm 1 among 5
    assert L.temporal_loss(jitter, w).item() == pytest.approx(2 / 5, abs=1e-6)
    with pytest.raises(ValueError, match="T >= 2"):
        L.temporal_loss(w[:, :1], w[:, :1])


def test_adversarial_values_and_r1():
    zero = torch.zeros(4, 1)
    assert L.generator_adversarial_loss(zero).item() == pytest.approx(math.log(2.0))
    assert L.discriminator_adversarial_loss(zero, zero).item() == pytest.approx(2 * math.log(2.0))
    # a confident, correct D has a small loss; the generator is then punished
    assert L.discriminator_adversarial_loss(torch.full((4, 1), 9.0), torch.full((4, 1), -9.0)).item() < 1e-3
    assert L.generator_adversarial_loss(torch.full((4, 1), -9.0)).item() > 8.9
    # R1 of a linear critic D(x) = <a, x> is ||a||^2
    a = torch.tensor([1.0, 2.0, -2.0])
    x = torch.randn(5, 3, requires_grad=True)
    assert L.r1_penalty(x @ a, x).item() == pytest.approx(9.0)
    with pytest.raises(ValueError, match="requires_grad"):
        L.r1_penalty(torch.zeros(2), torch.zeros(2, 3))


def test_sync_losses():
    v = torch.tensor([[1.0, 0.0], [0.3, 0.4]])
    assert L.sync_loss(v, v).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.tensor([[0.5, math.sqrt(3) / 2]])  # cos 60 degrees with [1, 0]
    assert L.sync_loss(torch.tensor([[1.0, 0.0]]), s).item() == pytest.approx(math.log(2.0), abs=1e-5)
    off = L.sync_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.isfinite(off) and off.item() == pytest.approx(-math.log(1e-6), rel=1e-4)
    score = torch.tensor([0.9, 0.1])
    expected = -(math.log(0.9) + math.log(0.9)) / 2
    assert L.sync_bce_loss(score, torch.tensor([1.0, 0.0])).item() == pytest.approx(expected, abs=1e-6)


def test_flow_nll_standard_normal_and_mask():
    z = torch.zeros(2, 3, 6)
    logdet = torch.zeros(2, 3)
    assert L.flow_nll(z, logdet).item() == pytest.approx(3.0 * math.log(2 * math.pi), abs=1e-5)
    logdet2 = torch.full((2, 3), 1.5)
    assert L.flow_nll(z, logdet2).item() == pytest.approx(3.0 * math.log(2 * math.pi) - 1.5, abs=1e-5)
    z2 = z.clone()
    z2[:, 2] = 100.0  # a padded frame far out must not count when masked
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert L.flow_nll(z2, logdet, mask).item() == pytest.approx(3.0 * math.log(2 * math.pi), abs=1e-5)


def test_landmark_mask_and_motion_loss():
    lm = torch.full((1, 68, 2), -1000.0)  # all points far outside ...
    lm[0, 60] = torch.tensor([20.0, 40.0])  # ... except one mouth point at x=20, y=40
    mask = L.landmark_heatmap_mask(lm, (64, 64), sigma=3.0)
    assert mask.shape == (1, 1, 64, 64)
    assert mask[0, 0, 40, 20].item() == pytest.approx(1.0) and mask[0, 0, 5, 5].item() < 1e-6

    loss = L.MotionLoss(L.MotionLossConfig(latent_weight=1.0, landmark_weight=1.0, sigma=0.05, regions=(60,)))
    img = torch.zeros(1, 3, 64, 64)
    lat = torch.randn(1, 16)
    assert loss(img, img, lat, lat, lm).item() == pytest.approx(0.0, abs=1e-7)
    far = img.clone()
    far[..., 0:10, 50:64] = 1.0  # a change away from the landmark
    near = img.clone()
    near[..., 36:45, 16:25] = 1.0  # the same amount of change at the landmark
    assert loss(near, img, driving_landmarks=lm).item() > 20 * loss(far, img, driving_landmarks=lm).item()
    lat2 = lat.clone()
    lat2[0, 0] += 2.0
    assert loss(img, img, lat2, lat).item() == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="nothing to compare"):
        loss(img, img)


def test_perceptual_loss_pyramid(monkeypatch, tmp_path):
    monkeypatch.delenv(vgg_mod.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(vgg_mod, "_warned_random", False)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="NO pretrained"):
        per = L.PerceptualLoss(L.PerceptualLossConfig.tiny())
    target = torch.rand(2, 3, 64, 64) * 2 - 1
    assert per(target, target).item() == pytest.approx(0.0, abs=1e-8)
    gen = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1).requires_grad_(True)
    value = per(gen, target)
    assert value.item() > 0
    value.backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert all(p.grad is None for p in per.parameters())
    per.train()
    assert not per.vgg.training
    with pytest.raises(ValueError, match="too small"):
        L.PerceptualLoss(L.PerceptualLossConfig(scales=(1.0, 0.125)))(target, target)


def test_configs_roundtrip_and_validate():
    for cls in (L.PerceptualLossConfig, L.MotionLossConfig):
        for cfg in (cls.tiny(), cls.paper()):
            assert cls.from_dict(cfg.to_dict()) == cfg
    import json

    assert L.PerceptualLossConfig.from_dict(
        json.loads(json.dumps(L.PerceptualLossConfig().to_dict()))
    ).scales == (
        1.0,
        0.5,
        0.25,
        0.125,
    )
    with pytest.raises(ValueError, match="distance"):
        L.PerceptualLossConfig(distance="l3")
    with pytest.raises(ValueError, match="unknown keys"):
        L.MotionLossConfig.from_dict({"sigmaa": 0.1})
