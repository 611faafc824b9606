"""The inference fast path (edtalk/fast.py) at the tiny preset: Winograd conv against F.conv2d, FastRenderer against
EDTalk.render (every code path: Winograd on/off, oneDNN prepacked or plain convs, per-frame and per-clip
expression, batches, a non-trivial warp), and its rebuild after a weight change."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from edtalk import EDTalk, ModelConfig, fast
from edtalk.fast import FastRenderer, _var_mean, warp_bilinear, winograd_conv3x3, winograd_weight
from edtalk.ops import LRELU_SLOPE

# Every eligible layer on the Winograd path and every upsampling conv in polyphase form (tiny sizes included).
ALL_WINOGRAD = {"winograd_min_channels": 1, "winograd_sizes": (4, 4096), "polyphase_min_size": 1}


@pytest.fixture(scope="module")
def model() -> EDTalk:
    torch.manual_seed(0)
    m = EDTalk(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        # The flow heads start as the identity warp; give them a real (small) warp and mask so the fast path's
        # grid_sample / mask / blend algebra is exercised, and non-zero biases everywhere. Small: a strong random
        # warp amplifies float32 rounding ~10x per scale (at 0.3 the eager model itself is 5e-4 off float64).
        for flow in m.generator.flows:
            flow.conv.weight.normal_(0.0, 0.05)
            flow.bias.normal_(0.0, 0.05)
        for name, p in m.generator.named_parameters():
            if name.endswith("activate.bias"):
                p.normal_(0.0, 0.2)
    return m


def _inputs(model: EDTalk, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ident = model.encode_identity(img)
    weights = {s: w + 0.5 * torch.randn(n, w.shape[1], generator=g) for s, w in ident.weights.items()}
    return ident, weights


@pytest.mark.parametrize(("h", "w", "batch"), [(8, 8, 1), (13, 10, 2), (4, 4, 1), (33, 17, 1)])
def test_winograd_conv_equals_conv2d(h: int, w: int, batch: int) -> None:
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(batch, 6, h, w, generator=g)
    weight = torch.randn(5, 6, 3, 3, generator=g) / 4
    scale = torch.rand(batch, 6, generator=g) + 0.5
    out = winograd_conv3x3(x, winograd_weight(weight), scale)
    ref = F.conv2d(x * scale[:, :, None, None], weight, padding=1)
    assert out.shape == ref.shape
    # F(4x4, 3x3) rounds a little more than direct convolution (transform entries up to 8): ~1e-5 on values ~3.
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=0)
    # Not a coincidence of symmetric data: a flipped kernel (convolution instead of correlation) differs.
    flipped = winograd_conv3x3(x, winograd_weight(weight.flip(2, 3)), scale)
    assert (flipped - ref).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("chunk", "h", "w", "batch"),
    [(3, 16, 12, 2), (8, 8, 8, 3), (1, 8, 16, 1), (128, 16, 16, 2)],
)
def test_winograd_chunks_epilogue_and_moments(
    monkeypatch: pytest.MonkeyPatch, chunk: int, h: int, w: int, batch: int
) -> None:
    """Chunked tiles (rows of a frame, or several frames, per chunk) give the same conv; the fused epilogue
    (* out_scale, + bias, leaky ReLU) and the moments equal the same steps done afterwards on F.conv2d."""
    monkeypatch.setattr(fast, "WINO_CHUNK_TILES", chunk)
    g = torch.Generator().manual_seed(chunk + h)
    x = torch.randn(batch, 6, h, w, generator=g)
    weight = torch.randn(5, 6, 3, 3, generator=g) / 4
    scale = torch.rand(batch, 6, generator=g) + 0.5
    d = torch.rand(batch, 5, generator=g) + 0.5
    bias = torch.randn(5, generator=g)
    u = winograd_weight(weight)
    conv = F.conv2d(x * scale[:, :, None, None], weight, padding=1)
    ref = F.leaky_relu(conv * d[:, :, None, None] + bias.view(1, -1, 1, 1), LRELU_SLOPE)
    out = winograd_conv3x3(x, u, scale, out_scale=d, bias=bias, lrelu=True)
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=0)
    y, mean, sq = winograd_conv3x3(x, u, scale, moments=True)
    torch.testing.assert_close(y, conv, atol=5e-5, rtol=0)
    torch.testing.assert_close(mean, conv.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(sq, conv.square().mean(dim=(2, 3)), atol=1e-4, rtol=1e-5)
    # The EEM's input stage: one identity feature, per-frame AdaIN scale and shift, leaky ReLU before the padding.
    shift = torch.randn(batch, 6, generator=g)
    hidden = F.leaky_relu(x[:1] * scale[:, :, None, None] + shift[:, :, None, None], LRELU_SLOPE)
    out = winograd_conv3x3(x[:1], u, scale, shift=shift, in_lrelu=True)
    torch.testing.assert_close(out, F.conv2d(hidden, weight, padding=1), atol=5e-5, rtol=0)
    shifted = winograd_conv3x3(x, u, shift=shift)
    torch.testing.assert_close(
        shifted, F.conv2d(x + shift[:, :, None, None], weight, padding=1), atol=5e-5, rtol=0
    )
    spans = fast._wino_spans(batch, h // 4, w // 4)
    tiles = sum((f1 - f0) * (t1 - t0) for f0, f1, t0, t1 in spans) * (w // 4)
    assert tiles == batch * (h // 4) * (w // 4) and (chunk >= 128 or len(spans) > 1)


def test_winograd_conv_returns_channels_last() -> None:
    x = torch.randn(2, 8, 12, 12)
    out = winograd_conv3x3(x, winograd_weight(torch.randn(4, 8, 3, 3)))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("h", "w", "ho", "wo", "batch"), [(8, 8, 8, 8, 1), (9, 13, 7, 11, 2), (16, 16, 16, 16, 3)]
)
def test_sparse_warp_equals_grid_sample(h: int, w: int, ho: int, wo: int, batch: int) -> None:
    """warp_bilinear == F.grid_sample(align_corners=True, zero padding), also where the grid leaves the image
    (every corner case of the zero padding: left, right, top, bottom, far outside)."""
    g = torch.Generator().manual_seed(h * w + batch)
    feat = torch.randn(batch, 5, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    grid = torch.rand(batch, ho, wo, 2, generator=g) * 2.6 - 1.3  # ~1/5 of the taps outside the source
    grid[0, 0, 0] = torch.tensor([-3.0, 0.2])
    grid[0, 0, 1] = torch.tensor([1.0, 1.0])  # exactly on the last pixel
    ref = F.grid_sample(feat.contiguous(), grid, align_corners=True)
    out = warp_bilinear(feat, grid)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    one = warp_bilinear(feat[:1], grid)  # one source broadcast over a batch of grids
    torch.testing.assert_close(
        one, F.grid_sample(feat[:1].expand(batch, -1, -1, -1), grid, align_corners=True)
    )


def test_instance_norm_statistics() -> None:
    """The single-pass E[y^2] - E[y]^2 statistics match F.instance_norm, also for a mean several times the spread."""
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(2, 6, 32, 32, generator=g) + 4.0).contiguous(memory_format=torch.channels_last)
    var, mean = _var_mean(y)
    normed = (y - mean[:, :, None, None]) * torch.rsqrt(var[:, :, None, None] + 1e-5)
    torch.testing.assert_close(normed, F.instance_norm(y.contiguous()), atol=1e-4, rtol=0)


def test_winograd_rejects_mismatched_weight() -> None:
    with pytest.raises(ValueError, match="3x3"):
        winograd_weight(torch.randn(2, 2, 1, 1))
    with pytest.raises(ValueError, match="input channels"):
        winograd_conv3x3(torch.randn(1, 4, 8, 8), winograd_weight(torch.randn(2, 3, 3, 3)))


@pytest.mark.parametrize(
    "options",
    [
        {},
        ALL_WINOGRAD,
        {"winograd": False},
        {**ALL_WINOGRAD, "use_mkldnn": False},
        {"use_mkldnn": False},
        {"polyphase_min_size": 1},
        {"batch_max_size": 1, "sparse_warp_min_size": 1},
        {"batch_max_size": 1 << 30, "sparse_warp_min_size": 1 << 30},
    ],
    ids=[
        "default",
        "all-winograd",
        "no-winograd",
        "winograd-plain-conv",
        "plain-conv",
        "polyphase",
        "per-frame-sparse-warp",
        "batched-grid-sample",
    ],
)
def test_fast_render_equals_eager_render(model: EDTalk, options: dict) -> None:
    renderer = FastRenderer(model, **options)
    if options.get("winograd_min_channels") == 1:
        assert any(lv["conv"].winograd is not None for lv in renderer.generator.levels)
        assert all(block.winograd is not None for block in renderer.eem)
    ident, weights = _inputs(model, 3)
    clip = {**weights, "expression": weights["expression"][:1].expand(3, -1)}
    with torch.no_grad():
        for w in (weights, clip, {"mouth": weights["mouth"]}, {}):
            ref = model.render(ident, w)
            out = renderer.render(ident, w)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
            assert ref.abs().max() > 0.5  # a real image, not a degenerate zero


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_fast_render_in_concurrent_frame_groups(model: EDTalk, groups: int) -> None:
    """Frames split into groups that run in threads of their own (frame_groups): the same images and driving
    weights as the eager model, for per-frame and clip expressions and an identity batch; torch's thread count is
    left as it was, for the caller and for threads started later."""
    renderer = FastRenderer(model, frame_groups=groups)
    ident, weights = _inputs(model, 5)
    clip = {**weights, "expression": weights["expression"][:1].expand(5, -1)}
    threads = torch.get_num_threads()
    with torch.no_grad():
        for w in (weights, clip):
            torch.testing.assert_close(renderer.render(ident, w), model.render(ident, w), atol=1e-4, rtol=0)
        if groups > 1:  # the groups' threads did the work
            assert renderer._pool is not None
            assert renderer._pool[0] == groups
        frames = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
        ref_w = model.extract(frames)
        for space, w in renderer.extract(frames).items():
            torch.testing.assert_close(w, ref_w[space], atol=1e-4, rtol=0)
        two = model.encode_identity(frames[:2])
        w2 = {"expression": weights["expression"][:2], "pose": weights["pose"][:2]}
        torch.testing.assert_close(renderer.render(two, w2), model.render(two, w2), atol=1e-4, rtol=0)
    assert torch.get_num_threads() == threads
    seen = []

    def new_thread() -> None:
        torch.ones(512, 512).sum()  # a parallel op: a new thread takes its thread count here
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=new_thread)
    t.start()
    t.join()
    assert seen == [threads]  # the groups' own counts did not leak into threads started later


def test_fast_render_with_styles_folded_into_weights(model: EDTalk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every one-frame conv and transposed conv on the folded-weight branch (s and d in a per-call weight copy)."""
    monkeypatch.setattr(fast, "FOLD_RATIO", 0)
    ident, weights = _inputs(model, 2)
    with torch.no_grad():
        ref = model.render(ident, weights)
    out = FastRenderer(model, batch_max_size=1).render(ident, weights)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "options", [{}, ALL_WINOGRAD, {"use_mkldnn": False}], ids=["default", "winograd", "plain"]
)
def test_fast_encoder_equals_encoder(model: EDTalk, options: dict) -> None:
    """FastRenderer.encode_identity / extract == EDTalk's (latent, features, weights), with non-zero biases."""
    torch.manual_seed(2)
    enc_model = EDTalk(model.config).eval()
    enc_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in enc_model.encoder.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.3)
    renderer = FastRenderer(enc_model, **options)
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        ref = enc_model.encode_identity(imgs)
        ref_w = enc_model.extract(imgs, ("mouth", "pose"))
    fast = renderer.encode_identity(imgs)
    torch.testing.assert_close(fast.latent, ref.latent, atol=1e-4, rtol=0)
    assert len(fast.features) == len(ref.features)
    for a, b in zip(fast.features, ref.features, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for space in ref.weights:
        torch.testing.assert_close(fast.weights[space], ref.weights[space], atol=1e-4, rtol=0)
    fast_w = renderer.extract(imgs, ("mouth", "pose"))
    assert set(fast_w) == {"mouth", "pose"}
    for space, w in ref_w.items():
        torch.testing.assert_close(fast_w[space], w, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="driving frames"):
        renderer.extract(imgs[:, :, :32])
    with pytest.raises(KeyError):
        renderer.extract(imgs, ("nose",))


def test_fast_render_follows_paint_scales(model: EDTalk) -> None:
    """A generator whose finest ToRGB sees the blended features (generator.paint_scales) renders the same image
    through the fast path."""
    painted = EDTalk(
        ModelConfig.from_dict({**model.config.to_dict(), "generator": {"paint_scales": 2}})
    ).eval()
    painted.load_state_dict(model.state_dict())
    ident, weights = _inputs(painted, 2)
    with torch.no_grad():
        ref = painted.render(ident, weights)
        assert (ref - model.render(ident, weights)).abs().max() > 1e-3  # the option changes the image
        torch.testing.assert_close(painted.fast_renderer().render(ident, weights), ref, atol=1e-4, rtol=0)


def test_fast_generator_batch_path(model: EDTalk) -> None:
    """The batched (B > 1) branches, used on GPUs, agree with the eager generator too."""
    renderer = FastRenderer(model, **ALL_WINOGRAD)
    ident, weights = _inputs(model, 2, seed=3)
    with torch.no_grad():
        latent = ident.latent + model.motion_features(weights)
        feats = [f.expand(2, -1, -1, -1) for f in ident.features]
        ref = model.generator(latent, feats)
    with torch.inference_mode():
        out = renderer.generator(latent, feats)
        ref_eem = model.eem(ident.features, latent)
        prepared = [b.prepare(f) for b, f in zip(renderer.eem, ident.features, strict=True)]
        out_eem = [b(f, latent, p) for b, f, p in zip(renderer.eem, ident.features, prepared, strict=True)]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    for a, b in zip(out_eem, ref_eem, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_fast_render_identity_batch(model: EDTalk) -> None:
    g = torch.Generator().manual_seed(5)
    imgs = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ident = model.encode_identity(imgs)
        weights = {"expression": torch.randn(2, ident.weights["expression"].shape[1], generator=g)}
        ref = model.render(ident, weights)
    out = FastRenderer(model).render(ident, weights)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_fast_renderer_rebuilds_after_weight_change() -> None:
    torch.manual_seed(0)
    model = EDTalk(ModelConfig.preset("tiny")).eval()
    renderer = model.fast_renderer()
    assert model.fast_renderer() is renderer  # cached on the model
    ident, weights = _inputs(model, 2)
    before = renderer.render(ident, weights)
    with torch.no_grad():
        model.generator.convs[-1].conv.weight.mul_(1.5).add_(0.1)
        model.eem.blocks[-1].conv1.weight.add_(0.2)
        ref = model.render(ident, weights)
    after = renderer.render(ident, weights)
    assert (after - before).abs().max() > 1e-3  # the snapshot was not reused
    torch.testing.assert_close(after, ref, atol=1e-4, rtol=0)
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    latent_before = renderer.encode_identity(img).latent
    with torch.no_grad():
        model.encoder.blocks[0].conv1[0].weight.mul_(1.3)
        latent_ref = model.encode_identity(img).latent
    latent_after = renderer.encode_identity(img).latent
    assert (latent_after - latent_before).abs().max() > 1e-4  # the encoder snapshot was rebuilt too
    torch.testing.assert_close(latent_after, latent_ref, atol=1e-4, rtol=0)
