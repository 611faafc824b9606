"""LPIPS-VGG16: the distance's properties with random weights, file loading, and None (warned once) without files."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from edtalk.metrics import LPIPS, load_lpips, lpips_distance
from edtalk.metrics import lpips as lpips_module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """VGG16 on a shared 2-core machine: one intra-op thread avoids oversubscription (10x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LPIPS()
    for lin in m.lins:  # trained lin weights are non-negative
        lin.weight.data.abs_()
    return m


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 32, 32, generator=g)).clamp(-1, 1)
    return x, y


def test_identical_is_zero_and_symmetric(model, images):
    x, y = images
    with torch.no_grad():
        assert torch.allclose(model(x, x), torch.zeros(3), atol=1e-7)
        d_xy, d_yx = model(x, y), model(y, x)
    assert torch.allclose(d_xy, d_yx, atol=1e-6)
    assert (d_xy > 0).all()
    # More distortion, larger distance (same direction, twice the step).
    with torch.no_grad():
        assert (model(x, (x + 2 * (y - x)).clamp(-1, 1)) > d_xy).all()


def test_first_layer_by_hand(model, images):
    """Only lin0 on (weights 1): the distance is the spatial mean of squared differences of unit-norm relu1_2."""
    x, y = images
    m = copy.deepcopy(model)
    for i, lin in enumerate(m.lins):
        lin.weight.data.fill_(1.0 if i == 0 else 0.0)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    with torch.no_grad():
        fx = m.net.features[:4]((x - shift) / scale)
        fy = m.net.features[:4]((y - shift) / scale)
        nx = fx / fx.norm(dim=1, keepdim=True).clamp_min(1e-10)
        ny = fy / fy.norm(dim=1, keepdim=True).clamp_min(1e-10)
        expected = ((nx - ny) ** 2).sum(dim=1).mean(dim=(1, 2))
        assert torch.allclose(m(x, y), expected, rtol=1e-4, atol=1e-6)


def _save_weights(tmp_path, model):
    """A torchvision-format vgg16 file (with classifier keys, as torchvision ships) and a release-format lin file."""
    backbone = {f"features.{k}": v for k, v in model.net.features.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(4, 4)
    lin = {f"lin{i}.model.1.weight": lin_layer.weight.data.clone() for i, lin_layer in enumerate(model.lins)}
    torch.save(backbone, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg_lin.pth")
    return tmp_path / "vgg16.pth", tmp_path / "vgg_lin.pth"


def test_loads_files_and_takes_uint8_frames(tmp_path, model, images):
    backbone, lin = _save_weights(tmp_path, model)
    loaded = load_lpips(backbone, lin)
    assert loaded is not None
    x, y = images
    with torch.no_grad():
        expected = model(x, y).double().numpy()
    np.testing.assert_allclose(
        lpips_distance(x, y, backbone_path=backbone, lin_path=lin), expected, rtol=1e-5
    )
    # uint8 frames (N, H, W, 3), as decoded video, go through the same [-1, 1] conversion.
    u8x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    u8y = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(lpips_distance(u8x, u8y, model=loaded, batch_size=2), expected, rtol=0.05)


def test_wrong_files_are_explained(tmp_path, model):
    backbone, lin = _save_weights(tmp_path, model)
    torch.save(
        {f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))},
        tmp_path / "alex_lin.pth",
    )
    with pytest.raises(ValueError, match="AlexNet"):
        LPIPS.from_files(backbone, tmp_path / "alex_lin.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="torchvision-format vgg16"):
        LPIPS.from_files(tmp_path / "partial.pth", lin)


def test_missing_weights_give_none_and_warn_once(tmp_path, monkeypatch, images):
    monkeypatch.setattr(lpips_module, "_warned", set())
    monkeypatch.delenv(lpips_module.ENV_BACKBONE, raising=False)
    monkeypatch.delenv(lpips_module.ENV_LIN, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    x, y = images
    with pytest.warns(UserWarning, match="no VGG16 backbone weights"):
        assert lpips_distance(x, y) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lpips_distance(x, y) is None  # said once is enough
    with pytest.warns(UserWarning, match="does not exist"):
        assert load_lpips(tmp_path / "nope.pth", tmp_path / "nope_lin.pth") is None
