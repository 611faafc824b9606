"""The visual core at the tiny preset: ops, orthogonality, shapes, EEM, cached identity, config."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from edtalk import EDTalk, Identity, ModelConfig
from edtalk.eem import EEM
from edtalk.generator import FlowHead
from edtalk.navigation import SPACES, LatentNavigation, orthonormalize
from edtalk.ops import ModulatedConv2d, upfirdn2d


@pytest.fixture(scope="module")
def model() -> EDTalk:
    torch.manual_seed(0)
    return EDTalk(ModelConfig.preset("tiny")).eval()


def _images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---- ops ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upsample", [False, True])
def test_modulated_conv_equals_per_sample_weight_form(upsample: bool) -> None:
    """Our activation-scaling form equals StyleGAN2's per-sample modulated, demodulated weights."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, 8, upsample=upsample)
    x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 8)
    out = conv(x, style)
    ref = []
    for i in range(3):
        s = conv.modulation(style[i : i + 1])[0]
        w = conv.weight * conv.scale * s.view(1, -1, 1, 1)
        w = w * torch.rsqrt(w.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        if upsample:
            y = conv.blur(F.conv_transpose2d(x[i : i + 1], w.transpose(0, 1), stride=2))
        else:
            y = F.conv2d(x[i : i + 1], w, padding=1)
        ref.append(y)
    ref = torch.cat(ref)
    assert out.shape == ref.shape == (3, 5, 16 if upsample else 8, 16 if upsample else 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_upfirdn2d_is_a_normalised_filter() -> None:
    x = torch.ones(1, 2, 8, 8)
    k = torch.tensor([[1.0, 3.0, 3.0, 1.0]]).T @ torch.tensor([[1.0, 3.0, 3.0, 1.0]])
    k = k / k.sum()
    down = upfirdn2d(x, k, down=2, pad=(1, 1))
    assert down.shape == (1, 2, 4, 4)
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    up = upfirdn2d(x, k * 4, up=2, pad=(2, 1))
    assert up.shape == (1, 2, 16, 16)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))


def test_flow_head_zero_offset_is_the_identity_warp_and_offsets_move_it() -> None:
    torch.manual_seed(0)
    head = FlowHead(4, 8)
    gen, feat, style = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 8)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 0.0, 30.0]))  # no offset, mask ~1: the warped identity feature
        out, warped, _ = head(gen, style, feat)
        torch.testing.assert_close(out, feat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(warped, feat, atol=1e-5, rtol=1e-5)
        head.bias.copy_(torch.tensor([0.3, 0.0, 30.0]))  # shift right by 0.3 * (W-1)/2 pixels
        out, warped, _ = head(gen, style, feat)
        assert not torch.allclose(out, feat, atol=1e-2)
        assert not torch.allclose(warped, feat, atol=1e-2)
        head.bias.copy_(torch.tensor([0.0, 0.0, -30.0]))  # mask ~0: the generated feature; nothing for ToRGB
        out, warped, _ = head(gen, style, feat)
        torch.testing.assert_close(out, gen, atol=1e-5, rtol=1e-5)
        assert warped.abs().max() < 1e-5


# ---- navigation -----------------------------------------------------------------------------------------------
def test_generator_paint_scales_let_the_finest_torgb_see_generated_features() -> None:
    """paint_scales=0: the image is warped identity features only (zero identity features -> the same image for
    any generated content); paint_scales=1: the finest ToRGB also sees the generated features."""
    from edtalk.generator import Generator

    torch.manual_seed(0)
    g0 = Generator(32, (16, 16, 8, 8), 16)
    torch.manual_seed(0)
    g1 = Generator(32, (16, 16, 8, 8), 16, paint_scales=1)
    assert g0.state_dict().keys() == g1.state_dict().keys()
    feats = [torch.zeros(2, c, 4 * 2**i, 4 * 2**i) for i, c in enumerate((16, 8, 8), start=1)]
    lat_a, lat_b = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        # with no identity features the warp-only image depends on the latent only through ToRGB's modulation
        # of zeros (its bias): the same for any two latents
        assert torch.allclose(g0(lat_a, feats), g0(lat_b, feats))
        assert not torch.allclose(g1(lat_a, feats), g1(lat_b, feats))
    with pytest.raises(ValueError, match="paint_scales"):
        ModelConfig.from_dict({**ModelConfig.preset("tiny").to_dict(), "generator": {"paint_scales": -1}})


def test_orthogonality_error_across_all_banks(model: EDTalk) -> None:
    assert model.orthogonality_error() <= 1e-5
    q = torch.cat(list(model.navigation.bases().values()), dim=1)
    assert q.shape == (64, sum(model.config.navigation.num_bases().values()))
    # Nearly dependent raw banks (a later bank copying an earlier one, plus noise) stay exactly orthogonal.
    nav = LatentNavigation(32, {"mouth": 5, "pose": 3, "eye": 3, "expression": 4}, 1, 1)
    with torch.no_grad():
        nav.expression.bank.copy_(nav.mouth.bank[:, :4] + 1e-3 * torch.randn(32, 4))
    assert nav.orthogonality_error() <= 1e-5


def test_bases_stay_float32_and_orthogonal_under_bf16_autocast(model: EDTalk) -> None:
    """bf16 autocast (GPU training) must not run the ordered QR's projections in bf16: the bases, the error and
    the gradient path are those of float32."""
    plain = model.navigation.bases()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model.navigation.bases()
        err = model.orthogonality_error()
    for s in plain:
        assert auto[s].dtype == torch.float32
        torch.testing.assert_close(auto[s], plain[s], atol=0, rtol=0)
    assert err <= 1e-5
    # the bf16 rounding it guards against is far above that bound (~1e-3)
    q = torch.cat(list(plain.values()), dim=1).bfloat16()
    assert float((q.t() @ q - torch.eye(q.shape[1], dtype=q.dtype)).abs().max()) > 1e-4


def test_later_bank_never_changes_earlier_bases_bitwise() -> None:
    torch.manual_seed(3)
    d = 512
    banks = [torch.randn(d, n) for n in (20, 6, 6, 10)]
    full = orthonormalize(banks)
    for k in range(1, 4):
        partial = orthonormalize(banks[:k])
        for a, b in zip(partial, full[:k], strict=True):
            assert torch.equal(a, b)
    changed = orthonormalize([*banks[:3], torch.randn(d, 10)])
    for a, b in zip(changed[:3], full[:3], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(changed[3], full[3])
    # The ordered QR spans: the first k blocks span the same space as the first k raw banks.
    q = torch.cat(full[:2], 1)
    a = torch.cat(banks[:2], 1)
    assert torch.allclose(q @ (q.t() @ a), a, atol=1e-3)


def test_later_bank_gradient_does_not_reach_earlier_banks() -> None:
    nav = LatentNavigation(16, {"mouth": 3, "pose": 2, "eye": 2, "expression": 2}, 1, 1)
    nav.bases()["expression"].sum().backward()
    assert nav.expression.bank.grad is not None and nav.expression.bank.grad.abs().sum() > 0
    # Earlier banks shape the later basis (it is projected against them), never the other way round.
    nav.zero_grad()
    nav.bases()["mouth"].sum().backward()
    assert nav.pose.bank.grad is None or nav.pose.bank.grad.abs().sum() == 0


# ---- shapes and API -------------------------------------------------------------------------------------------
def test_shapes_through_every_network_tiny(model: EDTalk) -> None:
    x = _images(3)
    with torch.no_grad():
        latent, feats = model.encoder(x)
        assert latent.shape == (3, 64)
        assert [tuple(f.shape[1:]) for f in feats] == [(64, 8, 8), (64, 16, 16), (32, 32, 32), (16, 64, 64)]
        w = model.extract(x)
        assert {k: tuple(v.shape) for k, v in w.items()} == {
            "mouth": (3, 20),
            "pose": (3, 6),
            "eye": (3, 6),
            "expression": (3, 10),
        }
        f_rd = model.motion_features(w)
        assert f_rd.shape == (3, 64)
        assert [tuple(f.shape) for f in model.eem(feats, f_rd)] == [tuple(f.shape) for f in feats]
        img = model.generator(latent + f_rd, feats)
        assert img.shape == (3, 3, 64, 64) and torch.isfinite(img).all()
        assert model.discriminator(img).shape == (3, 1)
        assert model.reconstruct_lia(x, x.flip(0)).shape == (3, 3, 64, 64)
        assert model(x, x).shape == (3, 3, 64, 64)
        assert model(x[:1], {"mouth": x, "pose": x.flip(0)}).shape == (3, 3, 64, 64)


def test_motion_is_the_sum_of_spaces(model: EDTalk) -> None:
    w = model.extract(_images(2))
    total = model.motion_features(w)
    parts = sum(model.motion_features({s: w[s]}) for s in SPACES)
    torch.testing.assert_close(total, parts, atol=1e-5, rtol=1e-5)
    # Orthogonal bases: each space's weights are recoverable from f^{r->d} alone.
    q = model.navigation.bases()
    torch.testing.assert_close(total @ q["pose"], w["pose"], atol=1e-4, rtol=1e-4)


def test_render_from_cached_identity_equals_full_forward(model: EDTalk) -> None:
    # Equal up to float32 rounding, whatever batch sizes the convolutions see.
    src, drv = _images(1, seed=4), _images(5, seed=5)
    with torch.no_grad():
        full = model(src, drv)
        ident = model.encode_identity(src)
        w = model.extract(drv)
        cached = torch.cat([model.render(ident, {k: v[i : i + 2] for k, v in w.items()}) for i in (0, 2)])
        cached = torch.cat([cached, model.render(ident, {k: v[4:] for k, v in w.items()})])
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    # Batch-1 identity broadcast equals an identity encoded from the repeated image.
    with torch.no_grad():
        rep = model.render(model.encode_identity(src.expand(5, -1, -1, -1)), w)
    torch.testing.assert_close(rep, full, atol=1e-4, rtol=1e-4)


def test_spaces_not_given_come_from_the_identity(model: EDTalk) -> None:
    src, drv = _images(1, seed=6), _images(2, seed=7)
    with torch.no_grad():
        ident = model.encode_identity(src)
        assert set(ident.weights) == set(SPACES)
        w_m = model.extract(drv, ("mouth",))
        only_mouth = model.render(ident, w_m)
        explicit = model.render(ident, {**{s: ident.weights[s].expand(2, -1) for s in SPACES}, **w_m})
        own = model.render(ident, {})
    torch.testing.assert_close(only_mouth, explicit)
    assert own.shape == (1, 3, 64, 64)
    assert not torch.allclose(only_mouth[0], own[0])  # the mouth weights did change the image


def test_bad_inputs_name_the_problem(model: EDTalk) -> None:
    with pytest.raises(ValueError, match=r"identity image must be a float tensor \[B, 3, 64, 64\]"):
        model.encode_identity(torch.zeros(1, 3, 32, 32))
    with pytest.raises(KeyError, match="unknown latent space 'lips'"):
        model.extract(_images(1), ("lips",))
    ident = model.encode_identity(_images(2))
    with pytest.raises(ValueError, match="batch sizes"):
        model.render(ident, {"mouth": torch.zeros(3, 20)})
    with pytest.raises(ValueError, match="its bank has 20"):
        model.render(ident, {"mouth": torch.zeros(2, 7)})
    assert isinstance(ident, Identity) and ident.batch_size == 2


# ---- EEM ------------------------------------------------------------------------------------------------------
def test_eem_both_branches_and_condition_affect_the_output() -> None:
    torch.manual_seed(0)
    eem = EEM([8, 4], cond_dim=16, hidden=8)
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 4, 16, 16)]
    cond = torch.randn(2, 16)
    base = eem(feats, cond)

    def changed(mutate) -> bool:
        saved = {k: v.clone() for k, v in eem.state_dict().items()}
        with torch.no_grad():
            mutate()
        out = eem(feats, cond)
        eem.load_state_dict(saved)
        return not torch.allclose(out[0], base[0]) and not torch.allclose(out[1], base[1])

    blocks = eem.blocks
    assert changed(
        lambda: [b.conv1.weight.mul_(1.5) for b in blocks]
    )  # first AdaIN branch reaches the output
    assert changed(lambda: [b.norm1.gamma.bias.add_(0.5) for b in blocks])
    assert changed(lambda: [b.conv2.weight.mul_(-1.0) for b in blocks])  # second branch
    assert changed(lambda: [b.norm2.beta.bias.add_(0.5) for b in blocks])
    # The identity path: with the second conv silenced, its AdaIN sees a constant (normalised to 0), so the block
    # returns f^id plus a per-channel shift: f^id passes through unchanged.
    with torch.no_grad():
        for b in blocks:
            b.conv2.weight.zero_()
    silenced = eem(feats, cond)
    for out, f in zip(silenced, feats, strict=True):
        shift = out - f
        torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-5, rtol=1e-5)
    # And the expression feature conditions it.
    other = eem(feats, torch.randn(2, 16))
    assert not torch.allclose(other[0], base[0])


def test_eem_acts_only_when_the_expression_space_takes_part(model: EDTalk) -> None:
    src, drv = _images(1, seed=8), _images(2, seed=9)
    with torch.no_grad():
        ident = model.encode_identity(src)
        w = model.extract(drv)
        saved = model.active_spaces
        try:
            model.active_spaces = ("mouth", "pose")
            no_exp = model.render(ident, {s: w[s] for s in ("mouth", "pose")})
            latent = ident.latent + model.motion_features({s: w[s] for s in ("mouth", "pose")})
            plain = model.generator(latent, ident.features)
        finally:
            model.active_spaces = saved
        with_exp = model.render(ident, w)
        latent_all = ident.latent + model.motion_features(w)
        eem_feats = model.eem(ident.features, model.motion_features({"expression": w["expression"]}))
        expected = model.generator(latent_all, eem_feats)
    torch.testing.assert_close(no_exp, plain)
    torch.testing.assert_close(with_exp, expected)


# ---- config ---------------------------------------------------------------------------------------------------
def test_config_round_trip_and_validation() -> None:
    for name in ("tiny", "paper"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    paper = ModelConfig.preset("paper")
    assert (paper.image_size, paper.latent_dim) == (256, 512)
    assert paper.navigation.num_bases() == {"mouth": 20, "pose": 6, "eye": 6, "expression": 10}
    assert len(paper.channels) == int(math.log2(256)) - 1
    with pytest.raises(ValueError, match="power of two"):
        ModelConfig(image_size=48)
    with pytest.raises(ValueError, match="model.channels must list 5"):
        ModelConfig(image_size=64, channels=(8, 8))
    with pytest.raises(ValueError, match="latent_dim=16 is too small"):
        ModelConfig(latent_dim=16)
    with pytest.raises(ValueError, match="unknown keys \\['chanels'\\]"):
        ModelConfig.from_dict({"chanels": [1]})
    with pytest.raises(ValueError, match="navigation.pose must be >= 1"):
        ModelConfig.from_dict({"navigation": {"pose": 0}})
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")
    cfg = ModelConfig.from_params({"preset": "tiny", "overrides": {"navigation": {"eye": 8}}})
    assert cfg.navigation.eye == 8
    assert cfg.eye_flow is None or cfg.eye_flow.dim == 8  # the flow follows the bank it drives
    with pytest.raises(ValueError, match="unknown key 'eyes'"):
        ModelConfig.from_params({"preset": "tiny", "overrides": {"navigation": {"eyes": 8}}})


def test_inference_memo_of_eem_matches_and_follows_weight_changes() -> None:
    torch.manual_seed(0)
    model = EDTalk(ModelConfig.preset("tiny")).eval()
    src, drv = _images(1, seed=11), _images(4, seed=12)
    w = model.extract(drv)
    w_const = {**w, "expression": w["expression"][:1].expand(4, -1)}  # one clip-level expression
    with torch.enable_grad():  # the plain path, no memo
        ref = model.render(model.encode_identity(src), w_const).detach()
        ref_var = model.render(model.encode_identity(src), w).detach()
    with torch.no_grad():
        ident = model.encode_identity(src)
        first = model.render(ident, w_const)
        again = model.render(ident, w_const)  # served from the memo
        varying = model.render(ident, w)
        assert "eem_prepared" in ident.cache and "eem_last" in ident.cache
        model.eem.blocks[0].norm2.beta.bias.add_(0.5)  # weights change: the memo must not be reused
        changed = model.render(ident, w_const)
    torch.testing.assert_close(first, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(varying, ref_var, atol=1e-4, rtol=1e-4)
    with torch.enable_grad():
        fresh = model.render(model.encode_identity(src), w_const).detach()
    torch.testing.assert_close(changed, fresh, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(changed, ref, atol=1e-3)
