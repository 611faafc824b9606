"""Audio encoder E_a, AudioToMouth and the conditional flow (Eq. 13-14): shapes, invertibility, exact log-det."""

from __future__ import annotations

import json

import pytest
import torch

from edtalk import losses as L
from edtalk.audio_encoder import AudioEncoderConfig, AudioToMouth, AudioToMouthConfig
from edtalk.flow import ConditionalFlow, ConditionalFlowConfig


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_audio_to_mouth_shapes(preset):
    cfg = getattr(AudioToMouthConfig, preset)()
    model = AudioToMouth(cfg)
    mel = torch.randn(2, 3, 80, 16)
    assert model(mel).shape == (2, 3, 20)
    assert model(mel[:, 0]).shape == (2, 20)
    assert model.features(mel).shape == (2, 3, cfg.encoder.feature_dim)
    assert model.encoder.features(mel[:, 0]).shape == (2, 1, cfg.encoder.feature_dim)
    # in eval mode frames are encoded independently: frame 1's output does not depend on frame 0's window
    model.eval()
    mel2 = mel.clone()
    mel2[:, 0] += 1.0
    assert torch.allclose(model(mel)[:, 1:], model(mel2)[:, 1:], atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B,80,16\]"):
        model(torch.randn(2, 80, 20))


def test_audio_configs_roundtrip_json():
    for cfg in (AudioToMouthConfig.tiny(), AudioToMouthConfig.paper()):
        again = AudioToMouthConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and isinstance(again.encoder, AudioEncoderConfig)
    assert AudioToMouthConfig().n_mouth == 20
    with pytest.raises(ValueError, match="divisible"):
        AudioEncoderConfig(channels=(8, 12), norm="group", norm_groups=8)
    with pytest.raises(ValueError, match="norm must be"):
        AudioEncoderConfig(norm="layer")
    with pytest.raises(ValueError, match="n_mels >= 8"):
        AudioEncoderConfig(n_mels=4)


def test_audio_to_mouth_learns_a_toy_mapping():
    """A few steps of Eq. 11's L^m_fea on a toy mapping (weights = band energies) must lower the loss."""
    torch.manual_seed(0)
    model = AudioToMouth(AudioToMouthConfig(encoder=AudioEncoderConfig.tiny(), n_mouth=4))
    mel = torch.randn(16, 80, 16)
    target = torch.stack([mel[:, 20 * i : 20 * (i + 1)].mean(dim=(1, 2)) for i in range(4)], dim=-1) * 5
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = L.mouth_weight_loss(model(mel), target).item()
    for _ in range(60):
        loss = L.mouth_weight_loss(model(mel), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def _randomised_flow(dim=4, cond_dim=5, seed=0) -> ConditionalFlow:
    torch.manual_seed(seed)
    cfg = ConditionalFlowConfig(
        dim=dim, cond_dim=cond_dim, context_dim=6, context_kernel=3, n_steps=3, hidden=16, coupling_layers=1
    )
    flow = ConditionalFlow(cfg).double()
    with torch.no_grad():  # a fresh flow is the identity; move every parameter so the test means something
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def test_flow_inverse_of_forward_is_identity():
    flow = _randomised_flow()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    cond = torch.randn(3, 7, 5, dtype=torch.float64)
    z, logdet = flow(x, cond)
    assert z.shape == x.shape and logdet.shape == (3, 7)
    assert (z - x).abs().max() > 1e-2  # not the identity
    assert torch.allclose(flow.inverse(z, cond), x, atol=1e-4)
    x32 = flow.float()
    xf = x.float()
    assert torch.allclose(x32.inverse(x32(xf, cond.float())[0], cond.float()), xf, atol=1e-4)


def test_flow_logdet_equals_brute_force_jacobian():
    flow = _randomised_flow(dim=4, cond_dim=5, seed=1)
    cond = torch.randn(1, 3, 5, dtype=torch.float64)
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    _, logdet = flow(x, cond)
    jac = torch.autograd.functional.jacobian(
        lambda v: flow(v.view(1, 3, 4), cond)[0].reshape(-1), x.reshape(-1)
    )
    sign, total = torch.linalg.slogdet(jac)
    assert sign.item() != 0
    assert total.item() == pytest.approx(logdet.sum().item(), abs=1e-8)
    for t in range(
        3
    ):  # each frame's map depends on its own weights only: per-frame blocks carry the log-dets
        _, block = torch.linalg.slogdet(jac[4 * t : 4 * t + 4, 4 * t : 4 * t + 4])
        assert block.item() == pytest.approx(logdet[0, t].item(), abs=1e-8)
    # log_prob = log N(z) + logdet, consistent with the loss of Eq. 13
    z, ld = flow(x, cond)
    assert torch.allclose(-flow.log_prob(x, cond).mean(), L.flow_nll(z, ld))


def test_flow_inverse_and_sample_run_through_forwards():
    """DeepSpeed ZeRO-3 gathers a parameter only around its module's forward: the inverse and sampling must call
    the forward of every module that owns parameters (tests/test_train_zero3.py runs them under a real engine)."""
    flow = _randomised_flow(seed=3)
    owners = {name for name, m in flow.named_modules() if list(m.parameters(recurse=False))}
    assert any(n.startswith("actnorms.") for n in owners) and any(n.startswith("couplings.") for n in owners)
    called: set[str] = set()
    for name, module in flow.named_modules():
        module.register_forward_pre_hook(lambda m, args, n=name: called.add(n))
    z = torch.randn(2, 6, 4, dtype=torch.float64)
    cond = torch.randn(2, 6, 5, dtype=torch.float64)
    x = flow.inverse(z, cond)
    assert owners <= called, sorted(owners - called)
    assert torch.equal(flow(z, cond, reverse=True), x)
    called.clear()
    flow.sample(cond, seed=0)
    assert owners <= called, sorted(owners - called)


def test_flow_condition_has_temporal_context():
    flow = _randomised_flow(seed=2)
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    cond = torch.randn(1, 9, 5, dtype=torch.float64)
    cond2 = cond.clone()
    cond2[0, 5] += 1.0  # change the audio of frame 5 only
    z1, _ = flow(x, cond)
    z2, _ = flow(x, cond2)
    changed = (z1 - z2).abs().amax(-1)[0]
    assert changed[4] > 1e-6 and changed[5] > 1e-6  # neighbours see it (kernel 3)
    assert changed[0] < 1e-12 and changed[8] < 1e-12  # far frames do not


def test_flow_sampling_seeds():
    flow = ConditionalFlow(ConditionalFlowConfig.tiny(dim=6))
    cond = torch.randn(2, 10, 64)
    a, b = flow.sample(cond, seed=1), flow.sample(cond, seed=1)
    c = flow.sample(cond, seed=2)
    assert a.shape == (2, 10, 6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(flow.sample(cond, generator=g1), flow.sample(cond, generator=g2))
    mode = flow.sample(cond, temperature=0.0)
    assert torch.allclose(mode, flow.inverse(torch.zeros(2, 10, 6), cond))
    with pytest.raises(ValueError, match="cond must be"):
        flow.sample(torch.randn(2, 10, 63))


def test_flow_fits_conditional_data():
    """Maximum likelihood (Eq. 13) on w = A f + noise: the NLL must drop well below its start."""
    torch.manual_seed(0)
    cfg = ConditionalFlowConfig.tiny(dim=6)
    cfg.cond_dim = 8
    flow = ConditionalFlow(cfg)
    cond = torch.randn(32, 12, 8)
    w = cond[..., :6] * 2.0 + 0.1 * torch.randn(32, 12, 6)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        z, ld = flow(w, cond)
        nll = L.flow_nll(z, ld)
        first = nll.item() if first is None else first
        opt.zero_grad()
        nll.backward()
        opt.step()
    assert nll.item() < first - 3.0


def test_flow_config_roundtrip_and_validation():
    for cfg in (ConditionalFlowConfig.tiny(), ConditionalFlowConfig.paper()):
        assert ConditionalFlowConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert cfg.dim == 6
    with pytest.raises(ValueError, match="odd"):
        ConditionalFlowConfig(context_kernel=4)
    with pytest.raises(ValueError, match=">= 2"):
        ConditionalFlowConfig(dim=1)
    sd = ConditionalFlow(ConditionalFlowConfig.tiny()).state_dict()
    assert "perm_1" in sd and "inv_perm_1" in sd
