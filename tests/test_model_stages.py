"""Every training stage's gradients reach exactly the modules it trains (tiny preset, one forward/backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edtalk import EDTalk, ModelConfig
from edtalk.stages import STAGES, Stage, apply_stage, get_stage


@pytest.fixture(scope="module")
def model() -> EDTalk:
    torch.manual_seed(0)
    return EDTalk(ModelConfig.preset("tiny"))


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g) * 2 - 1


def _adversarial(model: EDTalk, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    # Generator and discriminator non-saturating terms in one sum: enough to route gradients to both.
    return F.softplus(-model.discriminator(fake)).mean() + F.softplus(model.discriminator(real)).mean()


def _mel(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randn(b, t, 80, 16, generator=torch.Generator().manual_seed(seed))


def _stage_loss(model: EDTalk, stage: Stage) -> torch.Tensor:
    """A representative loss of each stage, through the public API."""
    a, b, ident_img = _images(2, 1), _images(2, 2), _images(1, 3)
    name = stage.name
    if name == "autoencoder":
        out = model.reconstruct_lia(a, b)
        return F.l1_loss(out, b) + _adversarial(model, out, b)
    if name in ("mouth_pose", "eye", "expression"):
        ident = model.encode_identity(ident_img)
        w = model.extract(a, stage.spaces)
        if name == "mouth_pose":  # cross reconstruction: b's mouth on a's pose
            w["mouth"] = model.extract(b, ("mouth",))["mouth"]
        out = model.render(ident, w)
        return F.l1_loss(out, a) + _adversarial(model, out, a)
    if name == "syncnet":
        cfg = model.syncnet.config
        mouths = torch.rand(2, cfg.n_frames, 3, cfg.mouth_height, cfg.mouth_width) * 2 - 1
        score = model.syncnet(mouths, _mel(2, 1, 4)[:, 0])
        return F.binary_cross_entropy(score.clamp(1e-4, 1 - 1e-4), torch.tensor([1.0, 0.0]))
    if name == "audio_lip":
        ident = model.encode_identity(ident_img)
        mel = _mel(1, 5, 5)
        w_m = model.audio_to_mouth(mel)[0]  # (5, n_mouth)
        out = model.render(ident, {"mouth": w_m})
        cfg = model.syncnet.config
        mouths = F.interpolate(out[:, :, 32:], size=(cfg.mouth_height, cfg.mouth_width), mode="bilinear")
        sync = model.syncnet(mouths.unsqueeze(0), mel[:, 2])
        target = model.extract(_images(5, 6), ("mouth",))["mouth"]
        return (
            F.mse_loss(w_m, target) + F.mse_loss(out, _images(5, 6)) - torch.log(sync.clamp_min(1e-4)).mean()
        )
    if name in ("audio_pose", "audio_eye"):
        space = "pose" if name == "audio_pose" else "eye"
        flow = model.pose_flow if space == "pose" else model.eye_flow
        frames = _images(4, 7)
        w = model.extract(frames, (space,))[space].unsqueeze(0)  # (1, T, n)
        cond = model.audio_to_mouth.features(_mel(1, 4, 8))
        return -flow.log_prob(w, cond).mean() + F.mse_loss(flow.inverse(flow(w, cond)[0], cond), w)
    if name == "audio_expression":
        ep = model.expression_predictor
        ids, mask, available = ep.tokenize(["so happy to see you", "well, fine", "this is awful"])
        speech = torch.randn(3, 8000, generator=torch.Generator().manual_seed(9))
        # p forces Eq. 15's draw: both kept, speech masked, text masked (so both mask vectors get gradients).
        w_hat = ep(speech, None, ids, mask, p=torch.tensor([0.9, 0.3, 0.1]), text_available=available)
        target = model.extract(_images(3, 10), ("expression",))["expression"]
        return F.l1_loss(w_hat, target)
    raise AssertionError(f"no representative loss for stage {name}")


@pytest.mark.parametrize("name", list(STAGES))
def test_gradients_reach_exactly_the_trained_modules(model: EDTalk, name: str) -> None:
    stage = get_stage(name)
    trainable = apply_stage(model, stage)
    assert trainable, f"stage {name} trains nothing"
    model.zero_grad(set_to_none=True)
    _stage_loss(model, stage).backward()
    trainable_ids = {id(p) for p in trainable}
    no_grad = [n for n, p in model.named_parameters() if id(p) in trainable_ids and p.grad is None]
    leaked = [n for n, p in model.named_parameters() if id(p) not in trainable_ids and p.grad is not None]
    assert not no_grad, f"{name}: trainable parameters without gradient: {no_grad[:8]}"
    assert not leaked, f"{name}: frozen parameters with gradient: {leaked[:8]}"
    # The trainable set is exactly the named modules' parameters (minus nested frozen ones).
    names = {n for n, p in model.named_parameters() if id(p) in trainable_ids}
    for n in names:
        assert any(n == t or n.startswith(t + ".") for t in stage.trainable), n
    for t in stage.frozen:
        assert not any(n.startswith(t + ".") for n in names), t
    if (
        name == "audio_expression"
    ):  # the HuBERT CNN feature encoder stays frozen (paper), the transformer trains
        assert not any(".feature_extractor." in n for n in names)
        assert any(n.startswith("expression_predictor.speech_encoder.encoder.") for n in names)


def test_navigation_spaces_are_separately_addressable(model: EDTalk) -> None:
    params = dict(model.named_parameters())
    for space in ("mouth", "pose", "eye", "expression"):
        assert f"navigation.{space}.bank" in params
        assert any(n.startswith(f"navigation.{space}.head.") for n in params)
    # Training the eye space leaves mouth/pose bases bitwise unchanged after an optimizer step.
    apply_stage(model, "eye")
    before = {s: q.detach().clone() for s, q in model.navigation.bases().items()}
    opt = torch.optim.SGD([p for p in model.navigation.parameters() if p.requires_grad], lr=0.1)
    model.zero_grad(set_to_none=True)
    model.navigation.bases()["eye"].pow(2).sum().backward()
    (
        model.navigation.eye.bank.sum() + sum(p.sum() for p in model.navigation.eye.head.parameters())
    ).backward()
    opt.step()
    after = model.navigation.bases()
    assert torch.equal(after["mouth"], before["mouth"]) and torch.equal(after["pose"], before["pose"])
    assert not torch.equal(after["eye"], before["eye"])


def test_apply_stage_errors_and_active_spaces(model: EDTalk) -> None:
    with pytest.raises(KeyError, match="unknown training stage 'lips'"):
        apply_stage(model, "lips")
    apply_stage(model, "mouth_pose")
    assert model.active_spaces == ("mouth", "pose")
    apply_stage(model, "expression")
    assert model.active_spaces == ("mouth", "pose", "eye", "expression")
    bad = Stage("x", ("navigation.lips",), (), False, (), "typo")
    with pytest.raises(ValueError, match="no submodule 'navigation.lips'"):
        apply_stage(model, bad)
    cfg = ModelConfig.preset("tiny")
    cfg.syncnet = None
    with pytest.raises(ValueError, match="built without it"):
        apply_stage(EDTalk(cfg), "syncnet")
