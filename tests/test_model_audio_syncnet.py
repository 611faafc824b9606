"""SyncNet: mouth crops, sync windows, embeddings/scores, and the Sync-confidence offset search."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from edtalk.syncnet import (
    SyncNet,
    SyncNetConfig,
    crop_mouths,
    offset_distances,
    sync_windows,
)


def test_crop_lower_half():
    faces = torch.full((2, 3, 3, 64, 64), -1.0)
    faces[..., 32:, :] = 1.0  # lower half white
    crops = crop_mouths(faces, (24, 48))
    assert crops.shape == (2, 3, 3, 24, 48)
    assert torch.allclose(crops, torch.ones_like(crops), atol=1e-5)


def test_crop_around_mouth_landmarks_is_differentiable():
    faces = torch.full((1, 3, 64, 64), -1.0)
    faces[:, :, 40:48, 24:40] = 1.0  # the "mouth": x 24..39, y 40..47
    lm = torch.zeros(1, 68, 2)
    xs = torch.linspace(24, 39, 20)
    lm[0, 48:68, 0] = xs
    lm[0, 48:68, 1] = torch.where(torch.arange(20) % 2 == 0, 41.0, 46.0)
    faces.requires_grad_(True)
    crop = crop_mouths(faces, (12, 24), landmarks=lm, margin=1.6)
    assert crop.shape == (1, 3, 12, 24)
    assert crop[0, :, 6, 12].min() > 0.9  # centre of the crop is on the mouth
    assert crop[0, :, 6, 1].max() < -0.9  # the box is wider than the mouth (margin)
    crop.sum().backward()
    assert faces.grad is not None and faces.grad[0, :, 44, 32].abs().sum() > 0
    with pytest.raises(ValueError, match="landmarks"):
        crop_mouths(faces.detach(), (12, 24), landmarks=torch.zeros(2, 68, 2))


def test_sync_windows_pair_centre_mel():
    mouths = torch.arange(2 * 9).float().view(2, 9, 1, 1, 1).expand(2, 9, 3, 4, 8)
    mel = torch.arange(2 * 9).float().view(2, 9, 1, 1).expand(2, 9, 80, 16)
    video, audio = sync_windows(mouths, mel, 5)
    assert video.shape == (2, 5, 5, 3, 4, 8) and audio.shape == (2, 5, 80, 16)
    for s in range(5):
        assert video[1, s, :, 0, 0, 0].tolist() == [9.0 + s + k for k in range(5)]
        assert audio[1, s, 0, 0].item() == 9.0 + s + 2
    with pytest.raises(ValueError, match="shorter"):
        sync_windows(mouths[:, :3], mel[:, :3], 5)


def test_offset_search_finds_a_constructed_shift():
    torch.manual_seed(0)
    b, t, n, e = 2, 40, 5, 16
    centre, shift = n // 2, 3
    video = F.normalize(torch.randn(b, t - n + 1, e), dim=-1)
    audio = F.normalize(torch.randn(b, t, e), dim=-1)
    # audio frame s+centre+shift carries video window s: the audio lags the video by `shift` frames
    for s in range(t - n + 1):
        if s + centre + shift < t:
            audio[:, s + centre + shift] = video[:, s]
    d = offset_distances(video, audio, centre, max_offset=6)
    assert d.shape == (b, 13)
    assert d.argmin(dim=1).tolist() == [6 + shift] * b
    assert d.min(dim=1).values.max() < 1e-5
    assert (d.median(dim=1).values > 1.0).all()  # random unit vectors are ~sqrt(2) apart
    with pytest.raises(ValueError, match="too wide"):
        offset_distances(video[:, :3], audio[:, :7], centre, max_offset=10)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_syncnet_scores_and_embeddings(preset):
    cfg = getattr(SyncNetConfig, preset)()
    net = SyncNet(cfg)
    mouths = torch.rand(2, 5, 3, cfg.mouth_height, cfg.mouth_width) * 2 - 1
    mel = torch.randn(2, 80, 16)
    score = net(mouths, mel)
    assert score.shape == (2,) and (score >= 0).all() and (score <= 1 + 1e-6).all()
    v, a = net.embed_video(mouths), net.embed_audio(mel)
    assert v.shape == (2, cfg.embed_dim) and torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert (v >= 0).all() and (a >= 0).all()
    with pytest.raises(ValueError, match="mouth crops"):
        net(mouths[:, :4], mel)


def test_gray_syncnet_and_config_roundtrip():
    cfg = SyncNetConfig.from_dict({**SyncNetConfig.tiny().to_dict(), "color": "gray"})
    net = SyncNet(cfg)
    assert net.face_encoder[0].in_channels == 5
    assert net(torch.rand(1, 5, 3, 24, 48), torch.randn(1, 80, 16)).shape == (1,)
    for c in (SyncNetConfig.tiny(), SyncNetConfig.paper(), cfg):
        assert SyncNetConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="odd"):
        SyncNetConfig(n_frames=4)


def test_confidence_on_clips():
    torch.manual_seed(0)
    net = SyncNet(SyncNetConfig.tiny())
    net.train()
    mouths = torch.rand(2, 30, 3, 24, 48) * 2 - 1
    mel = torch.randn(2, 30, 80, 16)
    res = net.confidence(mouths, mel, max_offset=4)
    assert net.training  # restored
    assert res.distances.shape == (2, 9) and res.offset.shape == (2,)
    assert ((res.offset >= -4) & (res.offset <= 4)).all()
    assert (res.confidence >= 0).all()
    assert torch.allclose(res.min_distance, res.distances.min(dim=1).values)
    single = net.confidence(mouths[0], mel[0], max_offset=4)
    assert torch.allclose(single.distances[0], res.distances[0], atol=1e-5)
